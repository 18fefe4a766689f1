"""scripts/bench_step.py measures what it says (tiny rows, in-process; no timings asserted)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_step"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_rows_run_and_the_table_relates_them(bench):
    rows = [
        bench.Row(32, "one", 8),
        bench.Row(32, "cache", 8, 4),
        bench.Row(32, "cache", 8, 4, views="held"),
        bench.Row(32, "plain", 4),
    ]
    rows = [bench.measure(r, "cpu", "32-64", warmup=0, steps=1) for r in rows]
    for r in rows:
        assert not r.error and r.step_s > 0 and r.peak_gib > 0 and r.aug_s > 0
    lines = bench.table(rows, "cpu")
    assert len(lines) == 2 + len(rows)
    cache = lines[3].split("|")
    assert cache[2].strip() == "cache 4"
    assert all(c.strip() != "–" for c in cache[9:12])  # both ratios and the memory ratio
    assert "held views" in lines[4]


def test_the_grid_covers_each_size_and_micro_batch(bench):
    rows = bench.grid("cuda")
    assert {r.size for r in rows} == {32, 96}
    assert {r.micro for r in rows if r.mode == "cache"} == {64, 128, 256}
    assert all(r.batch == 1024 for r in rows if r.mode != "plain")


def test_a_row_measured_in_a_fresh_process_comes_back_measured(bench):
    args = argparse.Namespace(device="cpu", projector="32-64", warmup=0, steps=1)
    row = bench.run_isolated(bench.Row(32, "plain", 4), args)
    assert not row.error
    assert row.step_s > 0 and row.peak_gib > 0 and row.growth_gib == row.growth_gib  # not NaN


def test_a_row_whose_process_fails_carries_the_error(bench):
    args = argparse.Namespace(device="cpu", projector="not-widths", warmup=0, steps=1)
    row = bench.run_isolated(bench.Row(32, "plain", 4), args)
    assert row.error and row.step_s != row.step_s  # NaN: nothing measured


def test_the_report_names_the_machine_and_the_setting(bench):
    from lowres_ssl import bench as shared

    rows = [bench.Row(32, "one", 8, step_s=0.5, aug_s=0.1, peak_gib=1.0, growth_gib=0.5)]
    rows.append(bench.Row(32, "plain", 4, error="out of memory"))
    args = argparse.Namespace(device="cpu", projector="32-64", warmup=1, steps=2)
    lines = bench.report_lines(rows, args, load=0.0)
    assert lines[0].startswith("# The training step") and lines[-1] == ""
    assert shared.machine_lines("cpu")[0] in lines
    assert any("projector 32-64" in line for line in lines)
    assert "| 32 | one pass | 8 | 0.500 | 16.0 | 0.100 | 1.00 | 0.50 | – | – | – |" in lines
    assert "| 32 | plain 4 | 4 | out of memory |" + "  |" * 7 in lines
