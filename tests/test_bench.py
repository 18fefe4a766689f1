"""lowres_ssl.bench (the fresh-process runner, the peak-memory reader, the report writer) and
the benchmark scripts' use of it: registry-built losses, reports that name the machine."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lowres_ssl import bench, device
from lowres_ssl.losses import OBJECTIVES

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
MIB = 2**20


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_loss():
    return load_script("bench_loss")


def child_script(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(body))
    return script


# --------------------------------------------------------------------------------------------
# The fresh-process runner


def test_the_runner_returns_what_the_child_computed(tmp_path):
    script = child_script(
        tmp_path,
        """
        import json, os, sys
        print("a library's chatter on stdout")
        print(json.dumps({"sum": sum(map(int, sys.argv[1:])), "pid": os.getpid(),
                          "env": os.environ.get("BENCH_TEST_VALUE")}))
        """,
    )
    child = bench.run_fresh_process(script, ["2", "3", "37"], env={"BENCH_TEST_VALUE": "x1"})
    assert child.failure == ""
    assert child.result["sum"] == 42
    assert child.result["env"] == "x1"
    assert child.result["pid"] != os.getpid()
    assert child.returncode == 0 and child.wall_s > 0


def test_send_result_to_parent_is_what_the_runner_reads(tmp_path):
    script = child_script(
        tmp_path,
        """
        from lowres_ssl import bench
        bench.send_result_to_parent({"rows": [1, 2], "name": "a|b"})
        """,
    )
    assert bench.run_fresh_process(script, []).result == {"rows": [1, 2], "name": "a|b"}


def test_a_failing_child_says_why(tmp_path):
    script = child_script(tmp_path, "raise ValueError('no such setting')\n")
    child = bench.run_fresh_process(script, [])
    assert child.result is None and child.returncode == 1
    assert child.failure == "ValueError: no such setting"


def test_a_child_without_a_result_fails_even_when_it_exits_0(tmp_path):
    child = bench.run_fresh_process(child_script(tmp_path, "print('no json')\n"), [])
    assert child.result is None and child.failure == "exit 0 without a result"


def test_a_child_past_its_timeout_is_killed(tmp_path):
    script = child_script(tmp_path, "import time\ntime.sleep(60)\n")
    child = bench.run_fresh_process(script, [], timeout_s=1.0)
    assert child.timed_out and child.result is None
    assert child.wall_s < 30
    assert child.failure.startswith("timed out")


def test_a_child_killed_by_sigkill_reads_as_killed(tmp_path):
    script = child_script(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    child = bench.run_fresh_process(script, [])
    assert child.killed and not child.timed_out and child.failure


# --------------------------------------------------------------------------------------------
# Peak memory


RSS_CHILD = """
import torch
from lowres_ssl import bench, device

MIB = 2**20
reader = device.PeakMemoryReader("cpu")
baseline = reader.start()
rss = device.proc_status_kib()["VmRSS"] * 1024
block = torch.ones(64 * MIB // 4)  # 64 MiB, every page written
del block
peak = reader.read()
reader.start()  # the high-water mark starts again from the RSS now
again = reader.read()
bench.send_result_to_parent({
    "method": reader.method, "baseline": baseline, "rss": rss, "peak_baseline": peak.baseline,
    "reserved": peak.reserved, "growth": peak.growth, "growth_again": again.growth,
})
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_the_rss_reader_sees_an_allocation_grow_the_peak(tmp_path):
    # In a fresh process, as the benchmarks measure: in a long test session the allocator may
    # serve the block from memory the process already holds, and the RSS would not grow.
    script = tmp_path / "child.py"
    script.write_text(RSS_CHILD)
    r = bench.run_fresh_process(script, [], timeout_s=120).result
    assert r["method"] == "VmHWM"
    assert abs(r["baseline"] - r["rss"]) < 16 * MIB
    assert r["peak_baseline"] == r["baseline"] and r["reserved"] is None
    assert r["growth"] >= 60 * MIB
    assert r["growth_again"] < 32 * MIB  # the freed block is not counted again


def test_the_reader_must_start_before_it_reads():
    with pytest.raises(RuntimeError, match="start"):
        device.PeakMemoryReader("cpu").read()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_reader_counts_the_allocator_peak_over_the_baseline():
    reader = device.PeakMemoryReader("cuda")
    kept = torch.ones(16 * MIB // 4, device="cuda")  # before the start: in the baseline
    reader.start()
    block = torch.ones(64 * MIB // 4, device="cuda")
    del block
    peak = reader.read()
    assert peak.method == "cuda" and peak.growth >= 64 * MIB
    assert peak.baseline >= 16 * MIB and peak.reserved >= peak.peak
    del kept


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_mmap_threshold_is_set_on_glibc():
    assert bench.set_mmap_threshold(32 * MIB) is True


# --------------------------------------------------------------------------------------------
# One real training step, built by the pre-training task

TINY_STEP = {"projector": "16-32", "view_size": 16, "load_size": 16, "batch_size": 4,
             "mixed": False, "cuda": False, "state_bits": 32}  # fmt: skip


def test_the_step_rig_trains_the_objective_of_its_setting():
    from lowres_ssl.engine.steps import embedding_cache_step
    from lowres_ssl.losses import SFRIKLoss, SimCLRLoss
    from lowres_ssl.memory import Setting

    simclr = bench.step_rig(Setting(loss="simclr", kernel_degree=None, **TINY_STEP))
    assert isinstance(simclr.objective, SimCLRLoss)
    sfrik = bench.step_rig(Setting(micro_batch_size=2, **TINY_STEP))
    assert isinstance(sfrik.objective, SFRIKLoss)
    assert sfrik.step.func is embedding_cache_step and sfrik.step.keywords["micro_batch_size"] == 2
    weights = [p.detach().clone() for p in sfrik.model.parameters()]
    assert sfrik.run() > 0
    assert any(
        not torch.equal(a, b) for a, b in zip(weights, sfrik.model.parameters(), strict=True)
    )


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"loss": "simclr", "kernel_degree": None, "micro_batch_size": 2, "checkpointing": True},
        {"small_views": 6, "positive_blocks": 14},
        {"small_views": 2, "small_size": 12, "regularised_views": 4, "positive_blocks": 6},
        {"loss": "sfrik", "kernel_degree": 2, "mmd_path": "moments", "optimizer": "adamw"},
    ],
)
def test_the_rig_config_is_the_setting_read_backwards(changes):
    from lowres_ssl.memory import Setting

    # A config always has a small crops' side (half the view's by default), crops or none.
    setting = Setting(**{**TINY_STEP, "small_size": 8, **changes})
    again = Setting.from_config(bench.config_of(setting), cuda=False, mixed=False)
    assert again == setting


# --------------------------------------------------------------------------------------------
# Reports


def test_the_markdown_table_is_exactly_this():
    lines = bench.markdown_table(
        ["case", "img/s", "note"], [["disk cache", "1,000", "ok"], ["a|b", 7]], "lrl"
    )
    assert lines == [
        "| case | img/s | note |",
        "|---|---:|---|",
        "| disk cache | 1,000 | ok |",
        r"| a\|b | 7 |  |",  # a pipe in a cell escaped, a short row padded
    ]


def test_the_markdown_table_refuses_what_it_cannot_draw():
    with pytest.raises(ValueError, match="cells"):
        bench.markdown_table(["a"], [["1", "2"]])
    with pytest.raises(ValueError, match="align"):
        bench.markdown_table(["a", "b"], [], "l")
    assert bench.markdown_table(["a", "b"], [])[1] == "|---|---|"


def test_write_report_prints_and_writes_the_same_text(tmp_path, capsys):
    output = tmp_path / "new" / "folder" / "report.md"
    lines = ["# Title", "", *bench.machine_lines("cpu"), "", "| a |", ""]
    assert bench.write_report(lines, output) == output
    text = output.read_text(encoding="utf-8")
    assert text == "\n".join(lines[:-1]) + "\n"  # one newline at the end
    captured = capsys.readouterr()
    assert captured.out == text
    assert captured.err.strip() == f"wrote {output}"


def test_the_machine_lines_name_the_cpu_and_the_versions():
    lines = bench.machine_lines("cpu")
    assert lines[0].startswith(f"- CPU: {bench.cpu_model()}, {os.cpu_count()} logical cores")
    assert f"torch {torch.__version__}" in lines[-1]
    assert f"Python {platform.python_version()}" in lines[-1]
    assert not any(line.startswith("- GPU") for line in lines)


def test_the_load_lines_warn_on_a_busy_machine():
    assert bench.load_lines(None) == []
    cores = bench.available_cores()
    assert bench.load_lines(0.0) == [
        f"- Load average (1 min) before the run: 0.00 on {cores} cores"
    ]
    busy = bench.load_lines(1000.0)
    assert len(busy) == 2 and busy[1].startswith("- **Warning**")


# --------------------------------------------------------------------------------------------
# scripts/bench_loss.py


def test_every_objective_of_the_registry_is_a_benchmark_loss(bench_loss):
    names = bench_loss.loss_names()
    assert {bench_loss.objective_and_path(name)[0] for name in names} == set(OBJECTIVES)
    assert names[:2] == ["sfrik_dense", "sfrik_blocked"]
    assert set(bench_loss.DEFAULT_LOSSES) <= set(names)
    torch.manual_seed(0)
    for name in names:
        objective, _ = bench_loss.objective_and_path(name)
        fn = bench_loss.make_loss(name, None)
        assert isinstance(fn, OBJECTIVES[objective])
        z1, z2 = (torch.randn(8, 16, requires_grad=True) for _ in range(2))
        bench_loss.one_call(fn, z1, z2)
        assert torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0
        cost = bench_loss.model_cost(bench_loss.Case(name, 256, 1024), None)
        assert cost.gemm_flops > 0 and cost.memory > 2 * 256 * 1024 * 4


def test_the_losses_are_built_with_their_path_and_named_as_in_the_tables(bench_loss):
    blocked = bench_loss.make_loss("sfrik_blocked", 64)
    assert (blocked.mmd_path, blocked.block_size) == ("blocked", 64)
    dense = bench_loss.make_loss("sfrik_dense", 64)
    assert (dense.mmd_path, dense.block_size) == ("dense", None)
    columns = {name: bench_loss.loss_columns(name) for name in bench_loss.loss_names()}
    assert columns["sfrik_dense"] == ("SFRIK", "dense")
    assert columns["vicreg"] == ("VICReg", "–")
    assert columns["barlow_twins"] == ("Barlow Twins", "–")
    assert columns["simclr"] == ("SimCLR", "–")
    assert bench_loss.label("sfrik_blocked") == "SFRIK (blocked)"


def test_cases_parse_and_plan(bench_loss):
    case = bench_loss.Case.parse("loss=vicreg,n=512,q=8192")
    assert case == bench_loss.Case("vicreg", 512, 8192)
    assert bench_loss.Case.parse(case.key) == case
    with pytest.raises(ValueError, match="unknown loss"):
        bench_loss.Case.parse("loss=sfrik,n=1,q=2")
    cases = bench_loss.plan_cases(bench_loss.QUICK, "cpu", False, bench_loss.DEFAULT_LOSSES)
    assert len(cases) == len(set(cases))
    assert cases[:4] == [bench_loss.Case(loss, 256, 512) for loss in bench_loss.DEFAULT_LOSSES]
    assert bench_loss.Case("barlow_twins", 128, 1024) in cases  # the others' n sweep


def test_a_cpu_case_runs_in_a_fresh_process_and_counts_the_gradients(bench_loss):
    case = bench_loss.Case("sfrik_dense", 256, 1024)
    args = argparse.Namespace(block_size=None, threads=1)
    result = bench_loss.run_cpu_case(case, args, memory_budget=4 * 2**30, timeout_s=240)
    assert result.status == "ok", result.detail
    assert result.time_s > 0 and result.repeats >= 1 and result.startup_s is not None
    assert result.extra["memory_method"].startswith("VmHWM")
    assert result.memory >= 2 * case.n * case.q * 4  # z1.grad and z2.grad at least


def synthetic_results(bench_loss) -> list:
    """Every case of the quick CPU plan measured, time and memory growing with q, but one."""
    Result, Case = bench_loss.Result, bench_loss.Case
    results = []
    for case in bench_loss.plan_cases(bench_loss.QUICK, "cpu", False, bench_loss.DEFAULT_LOSSES):
        scale = 2.0 if case.loss in ("vicreg", "barlow_twins") else 1.0
        seconds = scale * case.q / 512 * 1e-3 * case.n / 256
        memory = scale * case.q / 512 * case.n / 256 * MIB
        results.append(Result(case, "ok", time_s=seconds, memory=memory, repeats=3))
    skipped = Case("barlow_twins", 256, 1024)
    results = [r for r in results if r.case != skipped]
    results.append(Result(skipped, "skip", reason="memory budget on CPU", detail="est. 1 s"))
    return results


def test_the_loss_report_names_the_machine_and_tabulates_the_cases(bench_loss):
    facts = bench_loss.RunFacts(
        "cpu", bench_loss.Rates(1e9, 1e9, 1e9, 1e-3), 2**30, "python x", 60.0, 0.1
    )
    args = argparse.Namespace(max_minutes=1.0, block_size=None, full_grid=False)
    text = bench_loss.report(bench_loss.QUICK, synthetic_results(bench_loss), facts, args)
    lines = text.splitlines()
    assert lines[0] == "# Loss benchmark: forward + backward time and peak memory (CPU)"
    assert bench.machine_lines("cpu")[0] in lines
    assert "- Command: `python x`" in lines
    time_table = lines.index("## q sweep at n = 256") + 4
    assert lines[time_table : time_table + 6] == [
        "| loss | path | q = 512 | q = 1024 |",
        "|---|---|---:|---:|",
        "| SFRIK | dense | 1.00 | 2.00 |",
        "| SFRIK | blocked | 1.00 | 2.00 |",
        "| VICReg | – | 2.00 | 4.00 |",
        "| Barlow Twins | – | 2.00 | skip [a] |",
    ]
    ratio = "- VICReg / SFRIK (dense) at n = 256, q = 1024: time **2.0×** (4.00 vs 2.00 ms), "
    assert ratio + "memory **2.0×** (4.00 vs 2.00 MiB)" in lines
    assert "| Barlow Twins | – | 256 | 1024 | – | – | 2.00 |  | skip [a] | est. 1 s |" in lines
    assert lines[-1] == "- [a] memory budget on CPU"


# --------------------------------------------------------------------------------------------
# The other scripts' tables


def test_the_data_report_tabulates_rates_against_the_step():
    bench_data = load_script("bench_data")
    Row = bench_data.Row
    rows = [
        Row("disk cache", 1000.0, 500.0, 3),
        Row("augmentation alone", None, 800.0, 3),
        Row("augmentation alone, 96 px views", None, 100.0, 3, "no step"),
    ]
    args = argparse.Namespace(batch_size=256, load_size=32, recipe="vicreg")
    text = bench_data.render(
        args, torch.device("cpu"), torch.float32, Path("/d/train"), 100, rows, 50.0, 0.0, 60.0
    )
    lines = text.splitlines()
    assert bench.machine_lines("cpu")[0] in lines
    start = lines.index(
        "| case | loader alone (img/s) | loader + augmentation (img/s) | input / step |"
    )
    assert lines[start + 1 : start + 5] == [
        "|---|---:|---:|---:|",
        "| disk cache | 1,000 | 500 | 10 % |",
        "| augmentation alone | – | 800 | 6.2 % |",
        "| augmentation alone, 96 px views | – | 100 | – |",
    ]


def test_the_sweep_table_lists_every_evaluated_run(tmp_path):
    sweep = load_script("sweep_recipes")
    run = tmp_path / "lam1.0"
    run.mkdir()
    (run / "eval_knn.json").write_text(json.dumps({"knn_top1": 0.359, "knn20_top1": 0.357}))
    (run / "summary.json").write_text(json.dumps({"steps": 300, "wall_time_s": 789.4}))
    (run / "config.yaml").write_text("train: {batch_size: 32, seed: 0}\nloss: {lam: 1.0}\n")
    (tmp_path / "not-evaluated").mkdir()
    (tmp_path / "random_init.json").write_text(json.dumps({"knn_top1": 0.3, "knn20_top1": 0.31}))
    assert sweep.report(tmp_path) == [
        "| run | λ | batch / micro-batch | seed | steps | wall s | kNN top-1 (k=200) | (k=20) |",
        "|---|---|---|---|---|---|---|---|",
        "| lam1.0 | 1.0 | 32 / – | 0 | 300 | 789 | 0.359 | 0.357 |",
        "| random init | – | – | 0 | 0 | – | 0.300 | 0.310 |",
    ]
