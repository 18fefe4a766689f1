"""Tests of lowres_ssl.plots on metrics.jsonl files written by hand (no training)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from lowres_ssl.errors import UserError
from lowres_ssl.plots import _run_labels, panels_for, plot_runs, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _step(step: int, **extra: float | str) -> dict:
    return {"kind": "step", "step": step, "epoch": 0, "loss": 30.0 - step, "lr": 0.1, **extra}


def _write_run(folder: Path, records: list[dict], tail: str = "") -> Path:
    folder.mkdir(parents=True)
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (folder / "metrics.jsonl").write_text(lines + tail, encoding="utf-8")
    return folder


def _cpu_sfrik_run(folder: Path) -> Path:
    terms = {"invariance": 1.2, "mmd": 16.0, "images_per_s": 30.0, "cpu_rss_gib": 0.9}
    records = [_step(s, **terms) for s in range(1, 5)]
    records.append({"kind": "epoch", "step": 4, "epoch": 1, "loss_mean": 28.0, "bad_steps": 0})
    return _write_run(folder, records)


def _gpu_barlow_run_with_knn(folder: Path) -> Path:
    memory = {"gpu_allocated_gib": 3.1, "gpu_reserved_gib": 4.0, "images_per_s": 900.0}
    records = [
        _step(1, on_diagonal=0.5, off_diagonal=0.1, **memory),
        _step(2, loss="nan"),  # a skipped step: loss and lr only
        _step(3, on_diagonal=0.4, off_diagonal=0.09, **memory),
        {"kind": "epoch", "step": 3, "epoch": 1, "loss_mean": 27.5},
        {"kind": "knn", "step": 3, "epoch": 1, "knn_top1": 0.41, "k": 200, "knn20_top1": 0.43},
    ]
    return _write_run(folder, records)


def test_read_metrics_groups_by_kind_and_reads_non_finite_values(tmp_path: Path) -> None:
    metrics = read_metrics(_gpu_barlow_run_with_knn(tmp_path / "run"))
    assert {kind: len(records) for kind, records in metrics.items()} == {
        "step": 3,
        "epoch": 1,
        "knn": 1,
    }
    assert math.isnan(metrics["step"][1]["loss"])


def test_a_line_cut_short_is_skipped(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run", [_step(1), _step(2)], tail='{"kind": "step", "step": 3, "lo')
    assert [r["step"] for r in read_metrics(run)["step"]] == [1, 2]


def test_missing_folder_or_metrics_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nowhere"):
        read_metrics(tmp_path / "nowhere")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(UserError, match=r"empty_run holds no metrics\.jsonl"):
        read_metrics(tmp_path / "empty_run")
    # Only a line cut short: the run was killed before its first complete record.
    _write_run(tmp_path / "killed_run", [], tail='{"kind": "st')
    with pytest.raises(UserError, match=r"killed_run.*no records"):
        read_metrics(tmp_path / "killed_run")


def test_panels_follow_the_metrics_present(tmp_path: Path) -> None:
    cpu = read_metrics(_cpu_sfrik_run(tmp_path / "cpu"))
    gpu = read_metrics(_gpu_barlow_run_with_knn(tmp_path / "gpu"))
    assert panels_for([cpu]) == [
        "loss",
        "term:invariance",
        "term:mmd",
        "lr",
        "images_per_s",
        "cpu_memory",
    ]
    assert panels_for([gpu]) == [
        "loss",
        "term:on_diagonal",
        "term:off_diagonal",
        "knn",
        "lr",
        "images_per_s",
        "gpu_memory",
    ]
    # Overlaid: the union, each panel once.
    both = panels_for([cpu, gpu])
    assert sorted(both) == sorted(set(panels_for([cpu]) + panels_for([gpu])))


def test_runs_of_the_same_name_get_distinct_labels(tmp_path: Path) -> None:
    paths = [tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "a" / "other"]
    assert _run_labels(paths) == ["a/run", "b/run", "other"]


def test_plot_runs_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    runs = [
        _cpu_sfrik_run(tmp_path / "a" / "run"),
        _gpu_barlow_run_with_knn(tmp_path / "b" / "run"),
    ]
    out = plot_runs(runs, tmp_path / "plots" / "curves.png", dpi=40)
    assert out == tmp_path / "plots" / "curves.png"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 10_000  # nine panels of text and lines, not an empty canvas
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temporary file left


def test_plot_runs_refuses_a_name_that_is_not_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    with pytest.raises(UserError, match=r"\*\.png"):
        plot_runs([_cpu_sfrik_run(tmp_path / "run")], tmp_path / "curves.pdf")


def test_without_matplotlib_the_error_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match=r"matplotlib.*\[plot\]"):
        plot_runs([_cpu_sfrik_run(tmp_path / "run")], tmp_path / "curves.png")
