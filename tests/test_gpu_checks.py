"""scripts/gpu_checks.sh fits its window and keeps what finished: its parts' timeouts add up to
at most 420 s (a lent machine's command may run 600 s), the quick checks write a row per check,
and the benchmarks save their report after every case, so that a kill keeps what was measured."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_bench import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
SHELL_SCRIPT = SCRIPTS / "gpu_checks.sh"
QUICK_CHECKS = SCRIPTS / "gpu_quick_checks.py"
WINDOW_S = 420  # 600 s a command, less the machine's start and a rerun's margin


def shell_commands(text: str) -> list[str]:
    """The script's commands: comments dropped, continued lines joined."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [c.strip() for c in "\n".join(lines).replace("\\\n", " ").splitlines() if c.strip()]


def timeouts_s(commands: list[str]) -> list[int]:
    return [int(s) for c in commands for s in re.findall(r"\btimeout\s+(\d+)\b", c)]


def test_the_parts_timeouts_fit_the_window():
    commands = shell_commands(SHELL_SCRIPT.read_text(encoding="utf-8"))
    parts = [c for c in commands if c.startswith("part ")]
    assert len(parts) == 8, parts  # gpu, environment, quick checks, tests, 3 benchmarks, finetune
    assert all(len(timeouts_s([p])) == 1 for p in parts), "every part needs its own timeout"
    assert sum(timeouts_s(commands)) <= WINDOW_S, timeouts_s(commands)


def test_the_header_still_tells_how_to_run_it():
    header = SHELL_SCRIPT.read_text(encoding="utf-8").split("\nset -u")[0]
    assert "make-gpu-kit.sh" in header and "$OUT" in header and "--dry-run" in header


def test_the_quick_checks_write_a_row_per_check_on_the_cpu(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    run = [sys.executable, str(QUICK_CHECKS)]
    subprocess.run([*run, "--make-tiny-folder", str(data)], check=True, timeout=60)
    done = subprocess.run(
        [*run, "--device", "cpu", "--data", str(data / "train"), "--out", str(out)],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "2"},
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr[-2000:]  # 1: some check failed
    names = list(load_script("gpu_quick_checks").CHECKS)
    rows = (out / "quick_checks.md").read_text(encoding="utf-8").splitlines()[2:]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [c[0] for c in cells] == names
    for name, result, figure, seconds in cells:
        assert result in ("ok", "FAIL") and figure and float(seconds) >= 0, name
        assert re.search(rf"^{re.escape(name)}: {result} — ", done.stdout, re.M), done.stdout
    assert done.returncode == (0 if all(c[1] == "ok" for c in cells) else 1)


def test_a_killed_bench_step_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    module = load_script("bench_step")
    measured = module.Row(32, "one", 8, step_s=0.5, aug_s=0.1, peak_gib=1.0, growth_gib=0.5)
    calls = []

    def run_isolated(row, args):
        calls.append(row)
        if len(calls) > 1:
            raise KeyboardInterrupt  # the timeout's kill, in the second row
        return measured

    monkeypatch.setattr(module, "run_isolated", run_isolated)
    output = tmp_path / "step.md"
    argv = ["--device", "cpu", "--sizes", "32", "--batch", "8", "--micro-batches", "4"]
    monkeypatch.setattr(sys, "argv", ["bench_step.py", *argv, "--output", str(output)])
    with pytest.raises(KeyboardInterrupt):
        module.main()
    report = output.read_text(encoding="utf-8")
    assert report.startswith("# The training step")
    assert "| 32 | one pass | 8 | 0.500 | 16.0 | 0.100 | 1.00 | 0.50 | – | – | – |" in report


def test_a_killed_bench_presets_keeps_the_cases_it_measured(tmp_path, monkeypatch):
    module = load_script("bench_presets")
    calls = []

    def run_isolated(setting, steps, env=None):
        calls.append(setting)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return {"measured_gib": 0.5, "estimated_gib": 0.4}

    monkeypatch.setattr(module, "run_isolated", run_isolated)
    output = tmp_path / "presets.md"
    argv = ["--device", "cpu", "--presets", "cpu", "--output", str(output)]
    monkeypatch.setattr(sys, "argv", ["bench_presets.py", *argv])
    with pytest.raises(KeyboardInterrupt):
        module.main()
    report = output.read_text(encoding="utf-8")
    assert report.count("| cpu | CPU | resnet18 |") == 2  # the estimates, both sizes
    assert "| 2 × 32 px | 256-512 | 64 / one pass | off | 0.400 | 0.500 | 1.25 |" in report


@pytest.mark.slow
def test_the_dry_run_exercises_every_part_on_the_cpu(tmp_path):
    """The whole script in its CPU form (about 3 minutes on 2 cores)."""
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(SHELL_SCRIPT), "--dry-run"], cwd=ROOT, capture_output=True, text=True,
        timeout=420, env={**os.environ, "OUT": str(out)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    summary = (out / "summary.md").read_text(encoding="utf-8").splitlines()[2:]
    parts = [row.strip("|").split("|")[0].strip() for row in summary]
    assert parts == ["gpu", "environment", "quick checks", "CUDA tests", "bench_step",
                     "bench_layout", "bench_presets", "finetune 8gb"]  # fmt: skip
    names = ("environment.txt", "quick_checks.md", "bench_step.md", "bench_layout.md",
             "bench_presets.md")  # fmt: skip
    for name in names:
        assert (out / name).stat().st_size > 0, name
    assert (out / "ft8gb" / "summary.json").exists()
