#!/usr/bin/env python
"""Forward + backward time and peak memory of the losses in ``lowres_ssl.losses``.

This is a benchmark, not a test. It prints a markdown report and writes it to ``--output``.

Cases
    A case is (loss, n, q). Losses: the objectives of ``lowres_ssl.losses.OBJECTIVES``, built
    as a config builds them (``objective_from_settings``, default arguments), SFRIK once per
    MMD path: ``sfrik_dense``, ``sfrik_blocked`` (default blocks of about 4M Gram entries, so
    a single block while n <= 2048). By default (``--losses``) SFRIK dense and blocked, VICReg
    and Barlow Twins. Inputs: z1, z2 = ``torch.randn(n, q)`` float32 leaf tensors with
    ``requires_grad`` (the projector outputs of the two views). The measured work is
    ``loss = fn(z1, z2); loss.backward()``, with ``z1.grad = z2.grad = None`` before each call.

Time
    Median of timed calls after one full-size warm-up call. CPU: timed calls stop after about
    2 s (at most 10); when the warm-up itself takes more than 3 s it is the single timed call
    (a tiny call made first has already paid the one-time initialisation). CUDA: CUDA events,
    3 to 10 timed calls (stopping after about 2 s). CPU timings need a quiet machine: with
    another busy process, torch's threads wait for each other's cores and small cases run tens
    of times slower (the report prints the load average, and warns; ``--threads 1`` helps).

Memory
    The extra memory of a call over its inputs: everything the loss allocates in forward and
    backward, including the two input gradients z1.grad and z2.grad (2·n·q floats, shown in
    the table of all cases). Read by ``lowres_ssl.device.PeakMemoryReader``.

    CPU: every case runs in a fresh process (this script with ``--case``), so the peak is that
    case's own. One tiny call (n ≤ 64, q ≤ 128) first absorbs the one-time initialisation;
    after the inputs exist, the RSS high-water mark is reset (``/proc/self/clear_refs``) and the
    baseline is the current RSS; memory = high-water RSS (VmHWM) after the full-size warm-up −
    baseline. Two Linux/glibc details matter:

    - ``resource.getrusage().ru_maxrss`` is not used: a child process starts with its parent's
      high-water mark (exec keeps it), which hides everything below the parent's RSS. It is the
      fallback only where /proc is missing.
    - The warm-up runs with glibc's mmap threshold fixed at 64 KiB (``mallopt``), so every
      freed tensor goes back to the OS and the RSS follows the live tensors. With the default
      dynamic threshold, freed blocks stay in the heap and the peak RSS of identical runs varied
      by ±30%. The timed calls then run with the threshold at 32 MiB, close to glibc's default
      steady state.

    CUDA: all cases in one process; memory = ``torch.cuda.max_memory_allocated()`` −
    ``torch.cuda.memory_allocated()`` before the calls (peak statistics reset in between; a
    tiny call first keeps the cuBLAS workspaces out). ``torch.cuda.OutOfMemoryError`` is
    caught, recorded as OOM, and the run goes on.

Budgets
    Before it runs, each case's memory and time are estimated with a cost model (matmul flops
    and elementwise passes of each loss, rated by a short calibration of this machine, then
    rescaled by the measured/modelled ratio of the largest case of the same loss already run).
    A case whose estimated memory exceeds the memory budget (CPU: 16 GiB, at most 80% of the
    available RAM; CUDA: the free device memory) or whose estimated time exceeds what is left
    of ``--max-minutes`` is skipped and marked ``skip`` with the reason. On CPU each case is
    also capped by RLIMIT_DATA and by a timeout at the end of the budget.

Grid
    q ∈ {1024, …, 32768} and n ∈ {256, …, 8192}. CUDA: the full grid. CPU, by priority (later
    groups are what the time budget drops first): the q sweep at n = 512 for all losses; the n
    sweep at q = 8192 for SFRIK (dense and blocked); the n sweep at q = 1024 for SFRIK (there the
    n² Gram matrix outweighs the n·q terms, so dense vs blocked shows best); the n sweep at
    q = 8192 for the other losses. ``--full-grid`` adds the rest on CPU.

Usage
    python scripts/bench_loss.py                     # device auto: CUDA if present, else CPU
    python scripts/bench_loss.py --device cpu        # writes docs/benchmarks/loss.md
    python scripts/bench_loss.py --device cuda       # writes docs/benchmarks/loss_cuda.md
    python scripts/bench_loss.py --quick --output /tmp/quick.md   # tiny grid, smoke test
    python scripts/bench_loss.py --dry-run           # the plan with estimates, runs nothing
    python scripts/bench_loss.py --threads 1         # steadier CPU timings on a shared machine
    python scripts/bench_loss.py --case loss=sfrik_dense,n=512,q=8192 --device cpu  # one case
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import re
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lowres_ssl import bench
from lowres_ssl.device import PeakMemoryReader, available_cores, proc_status_kib
from lowres_ssl.errors import UserError
from lowres_ssl.eval.context import pick_device
from lowres_ssl.losses import OBJECTIVES, objective_from_settings
from lowres_ssl.memory import loss_bytes

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = {
    "cpu": REPO / "docs/benchmarks/loss.md",
    "cuda": REPO / "docs/benchmarks/loss_cuda.md",
}

#: The MMD paths of SFRIK compared (``auto`` chooses one of them; ``moments`` needs a kernel of
#: degree ≤ 2, and SFRIK's default has 3).
SFRIK_PATHS = ("dense", "blocked")
#: The paper's comparison, what the tables in docs/benchmarks hold (``--losses`` for others).
DEFAULT_LOSSES = ("sfrik_dense", "sfrik_blocked", "vicreg", "barlow_twins")

MEMORY_HELP = (
    "memory budget (default: CPU 16 GiB, at most 80%% of the available RAM; CUDA: the free memory)"
)

MIB = 2**20
GIB = 2**30
FLOAT = 4  # bytes

CPU_REPEAT_S = 2.0  # timed calls stop after about this long…
CPU_SINGLE_S = 3.0  # …and a warm-up longer than this is the single timed call
CUDA_REPEAT_S = 2.0
MAX_REPEATS = 10
CPU_MEMORY_GIB = 16.0


# --------------------------------------------------------------------------------------------
# Losses, from the package's registry


def loss_names() -> list[str]:
    """Every objective of ``lowres_ssl.losses.OBJECTIVES`` in its order, SFRIK once per path
    of :data:`SFRIK_PATHS` (``sfrik_dense``…): the order of the tables."""
    names: list[str] = []
    for objective in OBJECTIVES:
        names += [f"sfrik_{path}" for path in SFRIK_PATHS] if objective == "sfrik" else [objective]
    return names


def is_sfrik(loss: str) -> bool:
    return loss.startswith("sfrik_")


def objective_and_path(loss: str) -> tuple[str, str | None]:
    """``sfrik_dense`` → (``sfrik``, ``dense``); the other objectives have no MMD path."""
    return ("sfrik", loss.removeprefix("sfrik_")) if is_sfrik(loss) else (loss, None)


def make_loss(loss: str, block_size: int | None) -> nn.Module:
    """``loss`` as a config with default arguments builds it; ``block_size`` for the blocked
    path (None: the library's)."""
    objective, path = objective_and_path(loss)
    if path is None:
        return objective_from_settings(objective)
    options = {"block_size": block_size} if path == "blocked" and block_size else {}
    return objective_from_settings(objective, mmd_path=path, options=options)


def loss_columns(loss: str) -> tuple[str, str]:
    """The (loss, path) cells of the tables: the class's name without ``Loss``, words apart
    (``BarlowTwinsLoss`` → ``Barlow Twins``; ``VICReg``, ``SimCLR`` stay), and the MMD path."""
    objective, path = objective_and_path(loss)
    name = OBJECTIVES[objective].__name__.removesuffix("Loss")
    return re.sub(r"(?<=[a-z])(?=[A-Z][a-z])", " ", name), path or "–"


def label(loss: str) -> str:
    name, path = loss_columns(loss)
    return f"{name} ({path})" if is_sfrik(loss) else name


# --------------------------------------------------------------------------------------------
# Cases and grids


@dataclass(frozen=True, order=True)
class Case:
    loss: str
    n: int
    q: int

    @property
    def key(self) -> str:
        return f"loss={self.loss},n={self.n},q={self.q}"

    @staticmethod
    def parse(text: str) -> Case:
        fields = dict(part.split("=", 1) for part in text.split(","))
        case = Case(fields["loss"], int(fields["n"]), int(fields["q"]))
        if case.loss not in loss_names():
            raise ValueError(f"unknown loss {case.loss!r}; choose one of {', '.join(loss_names())}")
        return case


@dataclass(frozen=True)
class Grid:
    q_values: tuple[int, ...]
    n_values: tuple[int, ...]
    n_fixed: int  # n of the q sweep
    q_fixed: int  # q of the n sweep
    q_small: int | None  # q of a second, SFRIK-only n sweep (CPU)


FULL = Grid(
    q_values=(1024, 2048, 4096, 8192, 16384, 32768),
    n_values=(256, 512, 1024, 2048, 4096, 8192),
    n_fixed=512,
    q_fixed=8192,
    q_small=1024,
)
QUICK = Grid(q_values=(512, 1024), n_values=(128, 256), n_fixed=256, q_fixed=1024, q_small=None)


def plan_cases(grid: Grid, device: str, full_grid: bool, losses: Iterable[str]) -> list[Case]:
    """The cases to try, highest priority first (see the module doc)."""
    losses = [name for name in loss_names() if name in set(losses)]
    sfrik = [loss for loss in losses if is_sfrik(loss)]
    others = [loss for loss in losses if not is_sfrik(loss)]
    groups: list[list[Case]] = [
        [Case(loss, grid.n_fixed, q) for q in grid.q_values for loss in losses],
        [Case(loss, n, grid.q_fixed) for n in grid.n_values for loss in sfrik],
    ]
    if grid.q_small is not None:
        groups.append([Case(loss, n, grid.q_small) for n in grid.n_values for loss in sfrik])
    groups.append([Case(loss, n, grid.q_fixed) for n in grid.n_values for loss in others])
    if device == "cuda" or full_grid:
        rest = [Case(loss, n, q) for loss in losses for n in grid.n_values for q in grid.q_values]
        groups.append(sorted(rest, key=lambda c: (model_cost(c, None).gemm_flops, c)))
    return list(dict.fromkeys(case for group in groups for case in group))


# --------------------------------------------------------------------------------------------
# Cost model: estimates used only to skip cases and to budget time


@dataclass(frozen=True)
class Cost:
    gemm_flops: float  # matmul flops of one forward + backward
    elementwise: float  # elements touched by elementwise ops (passes × entries)
    memory: float  # bytes: peak extra memory of one call


def model_cost(case: Case, block_size: int | None) -> Cost:
    """Rough cost of one call, fitted to a few CPU measurements of this library.

    Memory: :func:`lowres_ssl.memory.loss_bytes`, the rule the training memory estimator uses.
    Flops: SFRIK computes the Gram matrix of each view, 2n²q flops forward and 2n²q backward
    (and 2n²q more to recompute it on the blocked path); alignment + uniformity the same Gram
    matrices; SimCLR the 2n×2n similarities, 8n²q forward and twice that backward. VICReg: two
    q×q covariances, 8nq² flops; Barlow Twins: one q×q cross-correlation, 6nq² flops.
    """
    n, q = case.n, case.q
    objective, path = objective_and_path(case.loss)
    # the uniformity loss always keeps its n×n Gram matrices: the dense path's memory
    memory = loss_bytes(objective, n, q, mmd_path=path or "dense", block_size=block_size)
    gram_passes = {"sfrik_dense": 8, "sfrik_blocked": 12, "uniformity": 8, "simclr": 24}
    if case.loss in gram_passes:
        return Cost(gram_passes[case.loss] * n * n * q, 30 * n * q + 80 * n * n, memory)
    if case.loss == "vicreg":
        return Cost(8 * n * q * q, 30 * n * q + 35 * q * q, memory)
    if case.loss == "barlow_twins":
        return Cost(6 * n * q * q, 30 * n * q + 25 * q * q, memory)
    raise ValueError(f"no cost rule for the loss {case.loss!r}")


@dataclass
class Rates:
    """Measured speed of this machine (a few hundred ms of calibration)."""

    gemm: float  # flop/s
    elementwise: float  # elements/s of a simple elementwise op
    randn: float  # elements/s of torch.randn
    call_overhead: float  # s of Python dispatch per call


def _best_of(fn: Callable[[], Any], sync: Callable[[], None], repeats: int = 3) -> float:
    fn()
    sync()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def calibrate(device: str) -> Rates:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    size, elems = (4096, 2**26) if device == "cuda" else (1024, 2**24)
    a = torch.randn(size, size, device=device)
    gemm = 2 * size**3 / _best_of(lambda: a @ a, sync)
    x = torch.randn(elems, device=device)
    # out of place and out of cache, like the loss's own elementwise ops
    elementwise = elems / _best_of(lambda: x * 1.0001, sync)
    randn = elems / _best_of(lambda: torch.randn(elems, device=device), sync)
    return Rates(gemm, elementwise, randn, 3e-3 if device == "cpu" else 2e-3)


@dataclass
class Estimate:
    call_s: float
    wall_s: float
    memory: float  # bytes

    @property
    def note(self) -> str:
        return f"est. {fmt_seconds(self.wall_s)}, {fmt_bytes(self.memory)}"


class Estimator:
    """The cost model, rated by the calibration and corrected by the cases already measured."""

    def __init__(self, device: str, rates: Rates, block_size: int | None):
        self.device, self.rates, self.block_size = device, rates, block_size
        self.startup_s = 3.0  # CPU: process start, imports, the tiny call (updated as cases run)
        self.startups: list[float] = []
        # loss → (model size, measured/model ratio) of the largest case measured so far
        self.time_fix: dict[str, tuple[float, float]] = {}
        self.memory_fix: dict[str, tuple[float, float]] = {}

    def model_call_s(self, case: Case) -> float:
        cost = model_cost(case, self.block_size)
        rates = self.rates
        return cost.gemm_flops / rates.gemm + cost.elementwise / rates.elementwise

    def estimate(self, case: Case) -> Estimate:
        cost = model_cost(case, self.block_size)
        call = self.model_call_s(case) * self.time_fix.get(case.loss, (0, 1.0))[1]
        call += self.rates.call_overhead
        memory = cost.memory * self.memory_fix.get(case.loss, (0, 1.0))[1]
        inputs = 2 * case.n * case.q / self.rates.randn
        if self.device == "cpu":
            timed = 0.0 if call > CPU_SINGLE_S else call * repeats_for(call, CPU_REPEAT_S)
            wall = self.startup_s + inputs + call + timed
        else:
            wall = inputs + call + call * max(3, repeats_for(call, CUDA_REPEAT_S))
        return Estimate(call, wall, memory)

    def update(self, result: Result) -> None:
        if result.status != "ok" or result.time_s is None:
            return
        case = result.case
        size = self.model_call_s(case)
        measured = max(result.time_s - self.rates.call_overhead, 1e-6)
        if size >= self.time_fix.get(case.loss, (0.0, 1.0))[0]:
            self.time_fix[case.loss] = (size, min(max(measured / size, 0.2), 10.0))
        modelled = model_cost(case, self.block_size).memory
        largest = modelled >= self.memory_fix.get(case.loss, (0.0, 1.0))[0]
        if result.memory is not None and result.memory > 32 * MIB and largest:
            self.memory_fix[case.loss] = (modelled, min(max(result.memory / modelled, 0.3), 4))
        if result.startup_s is not None:
            self.startups.append(result.startup_s)
            self.startup_s = statistics.median(self.startups)


def repeats_for(call_s: float, target_s: float) -> int:
    return min(MAX_REPEATS, max(1, math.ceil(target_s / max(call_s, 1e-9))))


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class Result:
    case: Case
    status: str  # ok | skip | OOM | timeout | error | n/a
    time_s: float | None = None  # median
    memory: float | None = None  # bytes
    repeats: int = 0
    reason: str = ""  # footnote text (shared by similar cases)
    detail: str = ""  # per-case note
    estimate: Estimate | None = None
    startup_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "loss": self.case.loss,
            "n": self.case.n,
            "q": self.case.q,
            "status": self.status,
            "time_s": self.time_s,
            "memory_bytes": self.memory,
            "repeats": self.repeats,
            "reason": self.reason,
            "detail": self.detail,
            **self.extra,
        }

    @staticmethod
    def from_json(case: Case, data: dict[str, Any]) -> Result:
        """The result a ``--case`` child printed (its timings and readings kept as extras)."""
        return Result(
            case,
            data["status"],
            time_s=data["time_s"],
            memory=data["memory_bytes"],
            repeats=data["repeats"],
            detail=data.get("detail", ""),
            extra={k: v for k, v in data.items() if k.endswith(("_s", "_mib", "_method"))},
        )


def oom_like(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)) or any(
        word in text
        for word in ("out of memory", "can't allocate", "cannot allocate", "alloc_failed")
    )


def failed(case: Case, error: BaseException) -> Result:
    """The case as an OOM or an error, with the exception's first line as its note."""
    status = "OOM" if oom_like(error) else "error"
    return Result(case, status, detail=f"{type(error).__name__}: {error}".splitlines()[0][:200])


def one_call(fn: nn.Module, z1: Tensor, z2: Tensor) -> None:
    z1.grad = None
    z2.grad = None
    loss = fn(z1, z2)
    loss.backward()


def tiny_call(fn: nn.Module, case: Case, device: torch.device | str = "cpu") -> None:
    """One call at n ≤ 64, q ≤ 128: the one-time costs (thread pool, BLAS buffers and CUDA
    workspaces, lazy imports) stay out of the case's time and memory."""
    shape = (min(case.n, 64), min(case.q, 128))
    one_call(fn, *(torch.randn(shape, device=device, requires_grad=True) for _ in range(2)))


# --------------------------------------------------------------------------------------------
# CPU: one case per process


def limit_data_segment(extra_bytes: float) -> None:
    """RLIMIT_DATA at ``extra_bytes`` over the data segment now: a case over the budget fails
    cleanly (an OOM) instead of swapping."""
    status = proc_status_kib()
    if "VmData" in status:
        limit = status["VmData"] * 1024 + int(extra_bytes)
        hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def cpu_timed_calls(
    fn: nn.Module, z1: Tensor, z2: Tensor, warm_s: float, precise: bool
) -> tuple[list[float], float]:
    """The timed calls after the warm-up of ``warm_s``: (their times, the warm-up's time, 0
    where the warm-up itself is the single timed call)."""
    if warm_s > CPU_SINGLE_S:
        return [warm_s], 0.0
    if precise:  # back to about glibc's default steady state for the timing
        bench.set_mmap_threshold(32 * MIB)
    times: list[float] = []
    while len(times) < MAX_REPEATS and sum(times) < CPU_REPEAT_S:
        start = time.perf_counter()
        one_call(fn, z1, z2)
        times.append(time.perf_counter() - start)
    return times, warm_s


def measure_cpu_case(case: Case, block_size: int | None, memory_limit: float | None) -> Result:
    """Runs in the child process (``--case``)."""
    started = time.perf_counter()
    precise = bench.set_mmap_threshold(64 * 1024)  # for the memory phase: RSS = live tensors
    torch.manual_seed(0)
    fn = make_loss(case.loss, block_size)
    tiny_call(fn, case)
    start = time.perf_counter()
    z1 = torch.randn(case.n, case.q, requires_grad=True)
    z2 = torch.randn(case.n, case.q, requires_grad=True)
    inputs_s = time.perf_counter() - start
    gc.collect()
    if memory_limit is not None:
        limit_data_segment(memory_limit)
    memory = PeakMemoryReader("cpu")
    memory.start()
    setup_s = time.perf_counter() - started
    try:
        start = time.perf_counter()
        one_call(fn, z1, z2)  # the warm-up, which gives the memory
        warm_s = time.perf_counter() - start
        peak = memory.read()
        times, warm = cpu_timed_calls(fn, z1, z2, warm_s, precise)
    except Exception as error:
        return failed(case, error)
    return Result(
        case,
        "ok",
        time_s=statistics.median(times),
        memory=float(peak.growth),
        repeats=len(times),
        extra={
            "times_s": times,
            "warmup_s": warm,
            "calls_s": warm + sum(times),
            "inputs_s": inputs_s,
            "setup_s": setup_s,
            "baseline_rss_mib": peak.baseline / MIB,
            "peak_rss_mib": peak.peak / MIB,
            "memory_method": peak.method + (", mmap threshold 64 KiB" if precise else ""),
        },
    )


def run_cpu_case(
    case: Case, args: argparse.Namespace, memory_budget: float, timeout_s: float
) -> Result:
    """Runs ``case`` in a fresh process of this script (``--case``)."""
    child_args = ["--case", case.key, "--device", "cpu"]
    child_args += ["--memory-limit-mib", str(int(memory_budget / MIB))]
    if args.block_size:
        child_args += ["--block-size", str(args.block_size)]
    if args.threads:
        child_args += ["--threads", str(args.threads)]
    child = bench.run_fresh_process(Path(__file__).resolve(), child_args, timeout_s=timeout_s)
    if child.timed_out:
        return Result(case, "timeout", reason="killed at the end of the time budget on CPU")
    if child.result is None:
        if child.killed:
            return Result(case, "OOM", detail="killed (SIGKILL: out of memory?)")
        tail = child.stderr_tail or "no output"
        return Result(case, "error", detail=f"exit {child.returncode}: {tail}"[:200])
    result = Result.from_json(case, child.result)
    if result.status == "ok":  # process start, imports, the tiny call
        calls_s = child.result["calls_s"] + child.result["inputs_s"]
        result.startup_s = max(0.0, child.wall_s - calls_s)
    return result


# --------------------------------------------------------------------------------------------
# CUDA: all cases in this process


def measure_cuda_case(case: Case, fn: nn.Module, device: torch.device) -> Result:
    gen = torch.Generator(device=device).manual_seed(0)
    z1 = torch.randn(case.n, case.q, device=device, generator=gen).requires_grad_()
    z2 = torch.randn(case.n, case.q, device=device, generator=gen).requires_grad_()
    memory = PeakMemoryReader(device)
    memory.start()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed() -> float:
        start.record()
        one_call(fn, z1, z2)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000

    warm = timed()
    times: list[float] = []
    while len(times) < MAX_REPEATS and (len(times) < 3 or sum(times) < CUDA_REPEAT_S):
        times.append(timed())
    peak = memory.read()
    z1.grad = z2.grad = None
    return Result(
        case,
        "ok",
        time_s=statistics.median(times),
        memory=float(peak.growth),
        repeats=len(times),
        extra={"times_s": times, "warmup_s": warm},
    )


def run_cuda_case(case: Case, args: argparse.Namespace, device: torch.device) -> Result:
    fn = make_loss(case.loss, args.block_size)
    try:
        tiny_call(fn, case, device)  # cuBLAS/cuBLASLt workspaces stay out of the case's memory
        return measure_cuda_case(case, fn, device)
    except RuntimeError as error:  # torch.cuda.OutOfMemoryError among them
        return failed(case, error)
    finally:
        gc.collect()
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# The run: budgets, then one case after the other


def memory_budget(args: argparse.Namespace, device: str, cuda: torch.device | None) -> float:
    """CUDA: the free device memory (capped by --max-memory-gib); CPU: --max-memory-gib, or
    16 GiB but at most 80% of the available RAM."""
    if device == "cuda":
        free = float(torch.cuda.mem_get_info(cuda)[0])
        return free if args.max_memory_gib is None else min(free, args.max_memory_gib * GIB)
    if args.max_memory_gib is not None:
        return args.max_memory_gib * GIB
    available = bench.meminfo().get("MemAvailable", 0) * 1024 or CPU_MEMORY_GIB * GIB
    return min(CPU_MEMORY_GIB * GIB, 0.8 * available)


def over_budget(
    case: Case, estimate: Estimate, budget: float, left_s: float, device: str, max_minutes: float
) -> Result | None:
    """The case skipped, where its estimate exceeds the memory budget or the time left."""
    where = device.upper()
    if estimate.memory > budget:
        reason = f"memory budget on {where}: estimated peak above the {fmt_bytes(budget)} budget"
        return Result(case, "skip", reason=reason, detail=estimate.note)
    if estimate.wall_s > left_s:
        reason = (
            f"time budget on {where}: estimated time above what was left of --max-minutes "
            f"{max_minutes:g}"
        )
        detail = f"{estimate.note}, {fmt_seconds(left_s)} left"
        return Result(case, "skip", reason=reason, detail=detail)
    return None


def run_case(
    case: Case, args: argparse.Namespace, cuda: torch.device | None, budget: float, left_s: float
) -> Result:
    """Measure the case: in this process on CUDA, in a fresh one on the CPU."""
    start = time.perf_counter()
    if cuda is not None:
        result = run_cuda_case(case, args, cuda)
    else:
        result = run_cpu_case(case, args, budget, timeout_s=max(5.0, left_s + 20))
    result.extra["wall_s"] = time.perf_counter() - start
    return result


def run_all(
    cases: list[Case], args: argparse.Namespace, device: str, deadline: float
) -> tuple[list[Result], Rates, float]:
    cuda = torch.device("cuda") if device == "cuda" else None
    rates = calibrate(device)
    estimator = Estimator(device, rates, args.block_size)
    results: list[Result] = []
    budget = memory_budget(args, device, cuda)
    planned_s = 0.0  # --dry-run: the estimated time of the cases planned so far
    for index, case in enumerate(cases, 1):
        estimate = estimator.estimate(case)
        if device == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            budget = memory_budget(args, device, cuda) - 2 * case.n * case.q * FLOAT
        left = deadline - time.perf_counter() - planned_s
        result = over_budget(case, estimate, budget, max(left, 0.0), device, args.max_minutes)
        if result is None and args.dry_run:
            result = Result(case, "planned", detail=estimate.note)
            planned_s += estimate.wall_s
        elif result is None:
            result = run_case(case, args, cuda, budget, left)
            if result.status == "timeout":
                result.detail = estimate.note
            estimator.update(result)
        result.estimate = estimate
        results.append(result)
        print(progress_line(index, len(cases), result), file=sys.stderr, flush=True)
    return results, rates, budget


def progress_line(index: int, total: int, r: Result) -> str:
    head = f"[{index:3d}/{total}] {r.case.loss:13s} n={r.case.n:5d} q={r.case.q:5d}: "
    if r.status == "ok":
        return head + f"{fmt_ms(r.time_s)} ms, {fmt_mib(r.memory)} MiB ({r.extra['wall_s']:.1f} s)"
    return head + " ".join(part for part in (r.status, r.detail) if part)


# --------------------------------------------------------------------------------------------
# Report


def fmt_num(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def fmt_ms(seconds: float | None) -> str:
    return "–" if seconds is None else fmt_num(seconds * 1000)


def fmt_mib(memory: float | None) -> str:
    return "–" if memory is None else fmt_num(memory / MIB)


def fmt_bytes(memory: float) -> str:
    return f"{memory / GIB:.1f} GiB" if memory >= GIB else f"{memory / MIB:.0f} MiB"


def fmt_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def calibration_line(device: str, rates: Rates) -> str:
    return (
        f"- Calibration on {device.upper()}: matmul {rates.gemm / 1e9:,.0f} GFLOP/s, elementwise "
        f"{rates.elementwise / 1e9:.2f} G elements/s"
    )


class Footnotes:
    def __init__(self) -> None:
        self.notes: dict[str, str] = {}

    def mark(self, reason: str) -> str:
        if not reason:
            return ""
        if reason not in self.notes:
            self.notes[reason] = "abcdefghijklmnopqrstuvwxyz"[len(self.notes) % 26]
        return f" [{self.notes[reason]}]"

    def lines(self) -> list[str]:
        return [f"- [{letter}] {reason}" for reason, letter in self.notes.items()]


def cell(result: Result | None, metric: str, notes: Footnotes) -> str:
    if result is None:
        return ""
    if result.status == "ok":
        return fmt_ms(result.time_s) if metric == "time" else fmt_mib(result.memory)
    return result.status + notes.mark(result.reason or status_reason(result))


def both_cell(result: Result | None, notes: Footnotes) -> str:
    if result is None or result.status != "ok":
        return cell(result, "time", notes)
    return f"{fmt_ms(result.time_s)} / {fmt_mib(result.memory)}"


def status_reason(result: Result) -> str:
    if result.status == "OOM":
        return "out of memory during the run (allocation failed)"
    if result.status in ("error", "timeout"):
        return f"{result.status}: {result.detail}" if result.detail else result.status
    return ""


def pivot(
    res: dict[Case, Result],
    losses: list[str],
    cases: Callable[[str, int], Case],
    axis: list[int],
    axis_name: str,
    metric: str,
    notes: Footnotes,
) -> list[str]:
    rows = []
    for loss in losses:
        cells = [cell(res.get(cases(loss, v)), metric, notes) for v in axis]
        if sum(map(bool, cells)) >= min(2, len(axis)):  # a sweep, not a point of another one
            rows.append([*loss_columns(loss), *cells])
    header = ["loss", "path", *(f"{axis_name} = {v}" for v in axis)]
    return bench.markdown_table(header, rows, "ll" + "r" * len(axis))


def at_n(n: int) -> Callable[[str, int], Case]:
    """(loss, q) → the case at this n: a q sweep."""
    return lambda loss, q: Case(loss, n, q)


def at_q(q: int) -> Callable[[str, int], Case]:
    """(loss, n) → the case at this q: an n sweep."""
    return lambda loss, n: Case(loss, n, q)


def ok(res: dict[Case, Result], loss: str, n: int, q: int) -> Result | None:
    r = res.get(Case(loss, n, q))
    return r if r is not None and r.status == "ok" else None


def present_losses(res: dict[Case, Result]) -> list[str]:
    """The losses with at least one case, in the order of the tables."""
    return [loss for loss in loss_names() if any(c.loss == loss for c in res)]


def growth_rows(
    res: dict[Case, Result],
    losses: list[str],
    key: Callable[[str, int], Case],
    axis: list[int],
    metric: str,
) -> list[list[str]]:
    def value(loss: str, v: int) -> float | None:
        if loss == "dense−blocked":
            d, b = res.get(key("sfrik_dense", v)), res.get(key("sfrik_blocked", v))
            if d and b and d.status == b.status == "ok":
                difference = d.memory - b.memory
                # below this, the difference is measurement noise, and so would be its growth
                return difference if difference >= max(8 * MIB, 0.05 * d.memory) else None
            return None
        r = res.get(key(loss, v))
        if r is None or r.status != "ok":
            return None
        return r.time_s if metric == "time" else r.memory

    rows = []
    for loss in losses:
        cells = []
        for a, b in itertools.pairwise(axis):
            va, vb = value(loss, a), value(loss, b)
            cells.append(f"×{vb / va:.2f}" if va and vb and va > 0 else "")
        if any(cells):
            name = "SFRIK dense − blocked" if loss == "dense−blocked" else label(loss)
            rows.append([name, *cells])
    return rows


def growth_table(title: str, axis: str, steps: list[str], rows: list[list[str]]) -> list[str]:
    """A titled table of growth factors per doubling along ``axis`` (empty without rows)."""
    if not rows:
        return []
    header = ["loss", *(f"{axis} {s}" for s in steps)]
    return [title, "", *bench.markdown_table(header, rows, "l" + "r" * len(steps)), ""]


def baseline_ratio_lines(grid: Grid, res: dict[Case, Result], notes: Footnotes) -> list[str]:
    """Each other loss against each SFRIK path, at the largest q of the q sweep both ran."""
    out = []
    n0, q_max = grid.n_fixed, max(grid.q_values)
    present = present_losses(res)
    for base in (loss for loss in present if not is_sfrik(loss)):
        for sfrik in (loss for loss in present if is_sfrik(loss)):
            both = [q for q in grid.q_values if ok(res, base, n0, q) and ok(res, sfrik, n0, q)]
            if not both:
                continue
            q = max(both)
            a, b = ok(res, base, n0, q), ok(res, sfrik, n0, q)
            line = (
                f"- {label(base)} / {label(sfrik)} at n = {n0}, q = {q}: time "
                f"**{a.time_s / b.time_s:,.1f}×** ({fmt_ms(a.time_s)} vs {fmt_ms(b.time_s)} ms), "
                f"memory **{a.memory / b.memory:,.1f}×** ({fmt_mib(a.memory)} vs "
                f"{fmt_mib(b.memory)} MiB)"
            )
            if q != q_max:
                missing = [
                    r
                    for r in (res.get(Case(base, n0, q_max)), res.get(Case(sfrik, n0, q_max)))
                    if r is not None and r.status != "ok"
                ]
                why = ", ".join(f"{label(r.case.loss)}: {cell(r, 'time', notes)}" for r in missing)
                line += f"; q = {q_max} was not measured ({why or 'not in the grid'})"
            out.append(line)
    return out


def n_sweep_growth_lines(res: dict[Case, Result], n_values: list[int], q: int) -> list[str]:
    """Memory growth along an n sweep, and blocked against dense at its largest common n."""
    present = present_losses(res)
    both_paths = "sfrik_dense" in present and "sfrik_blocked" in present
    steps = [f"{a}→{b}" for a, b in itertools.pairwise(n_values)]
    losses = [*present, "dense−blocked"] if both_paths else present
    title = (
        f"Memory growth each time n doubles (q = {q}); the dense − blocked "
        "difference isolates the n×n Gram matrices the dense path keeps:"
    )
    out = growth_table(title, "n", steps, growth_rows(res, losses, at_q(q), n_values, "memory"))
    both = [n for n in n_values if ok(res, "sfrik_dense", n, q) and ok(res, "sfrik_blocked", n, q)]
    if both:
        n = max(both)
        d, b = ok(res, "sfrik_dense", n, q), ok(res, "sfrik_blocked", n, q)
        out += [
            f"- Blocked / dense at the largest n measured for both, n = {n}, q = {q}: "
            f"memory **{b.memory / d.memory:.2f}×** ({fmt_mib(b.memory)} vs "
            f"{fmt_mib(d.memory)} MiB), time {b.time_s / d.time_s:.2f}× "
            f"({fmt_ms(b.time_s)} vs {fmt_ms(d.time_s)} ms)",
            "",
        ]
    return out


def ratios(grid: Grid, res: dict[Case, Result], notes: Footnotes) -> list[str]:
    out = ["## Ratios (computed from the numbers above, same run)", ""]
    out += [*baseline_ratio_lines(grid, res, notes), ""]
    steps = [f"{a}→{b}" for a, b in itertools.pairwise(grid.q_values)]
    for metric in ("memory", "time"):
        rows = growth_rows(
            res, present_losses(res), at_n(grid.n_fixed), list(grid.q_values), metric
        )
        title = (
            f"{metric.capitalize()} growth each time q doubles (n = {grid.n_fixed}); "
            "×2 is linear growth, ×4 quadratic:"
        )
        out += growth_table(title, "q", steps, rows)
    for q_sweep in (grid.q_fixed, grid.q_small):
        if q_sweep is not None:
            out += n_sweep_growth_lines(res, list(grid.n_values), q_sweep)
    return out


def method_text(device: str, block_size: int | None) -> str:
    if device == "cuda":
        timing = "CUDA events, median of 3 to 10 timed calls after one full-size warm-up"
        memory = "`max_memory_allocated` − `memory_allocated` before the calls"
    else:
        timing = (
            "median of the timed calls after one full-size warm-up (a warm-up over 3 s is the "
            "single timed call)"
        )
        memory = (
            "peak RSS of a fresh process per case minus its RSS before the first full-size call"
        )
    blocks = (
        f"blocks of {block_size} rows (--block-size)"
        if block_size
        else "the default blocks of about 4M Gram entries (one block while n ≤ 2048)"
    )
    return (
        "Each case: z1, z2 = `torch.randn(n, q)` float32 leaf tensors with requires_grad; the "
        f"work is `loss = fn(z1, z2); loss.backward()`. Time: {timing}. Memory: {memory}; it "
        "**includes the input gradients z1.grad, z2.grad** (2·n·q floats, listed under All "
        f"cases). Losses with default arguments; SFRIK blocked uses {blocks}. Method: the "
        "docstring of `scripts/bench_loss.py`."
    )


@dataclass(frozen=True)
class RunFacts:
    """What the report's head says about the run besides its results."""

    device: str
    rates: Rates
    memory_budget: float  # bytes
    command: str
    elapsed_s: float
    load_before: float | None


def head_lines(facts: RunFacts, args: argparse.Namespace) -> list[str]:
    """The title, the date, the command, the machine, the budgets and the method."""
    title = "Loss benchmark: forward + backward time and peak memory"
    return [
        f"# {title} ({facts.device.upper()})",
        "",
        f"- Date: {datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- Command: `{facts.command}`",
        *bench.machine_lines(facts.device),
        calibration_line(facts.device, facts.rates),
        f"- Budgets: {args.max_minutes:g} minutes, memory {fmt_bytes(facts.memory_budget)}; "
        f"run took {facts.elapsed_s / 60:.1f} minutes",
        *bench.load_lines(facts.load_before),
        "",
        method_text(facts.device, args.block_size),
        "",
    ]


Sweep = tuple[str, Callable[[str, int], Case], list[int], str]  # heading, key, axis, its name


def sweeps(grid: Grid) -> list[Sweep]:
    """The q sweep, then the n sweeps, of the grid."""
    out: list[Sweep] = [
        (f"q sweep at n = {grid.n_fixed}", at_n(grid.n_fixed), list(grid.q_values), "q")
    ]
    for q_sweep in (grid.q_fixed, grid.q_small):
        if q_sweep is not None:
            out.append((f"n sweep at q = {q_sweep}", at_q(q_sweep), list(grid.n_values), "n"))
    return out


def sweep_lines(grid: Grid, res: dict[Case, Result], notes: Footnotes) -> list[str]:
    """A time table and a memory table per sweep that has cases."""
    present, lines = present_losses(res), []
    for heading, key, axis, axis_name in sweeps(grid):
        if not any(key(loss, v) in res for loss in present for v in axis):
            continue
        lines += [f"## {heading}", ""]
        for metric, unit in (("time", "Time (ms)"), ("memory", "Memory (MiB)")):
            lines += [f"{unit}:", "", *pivot(res, present, key, axis, axis_name, metric, notes), ""]
    return lines


def full_grid_lines(grid: Grid, res: dict[Case, Result], notes: Footnotes) -> list[str]:
    """Per loss, time / memory over the whole grid: only where cases fall outside the sweeps."""
    present = present_losses(res)
    in_sweeps = {key(loss, v) for _, key, axis, _ in sweeps(grid) for loss in present for v in axis}
    if all(case in in_sweeps for case in res):
        return []
    lines = ["## Full grid: time (ms) / memory (MiB)", ""]
    header = ["n", *(f"q = {q}" for q in grid.q_values)]
    for loss in present:
        rows = [
            [str(n), *(both_cell(res.get(Case(loss, n, q)), notes) for q in grid.q_values)]
            for n in grid.n_values
        ]
        lines += [f"{label(loss)}:", "", *bench.markdown_table(header, rows, "r" * len(header))]
        lines.append("")
    return lines


def all_cases_lines(results: list[Result], notes: Footnotes) -> list[str]:
    """Every case tried, with its status, timed calls and the input gradients' share."""
    order = loss_names()
    rows = []
    for r in sorted(results, key=lambda r: (order.index(r.case.loss), r.case.n, r.case.q)):
        grads = 2 * r.case.n * r.case.q * FLOAT
        rows.append(
            [
                *loss_columns(r.case.loss),
                str(r.case.n),
                str(r.case.q),
                fmt_ms(r.time_s),
                fmt_mib(r.memory),
                fmt_mib(grads),
                str(r.repeats or ""),
                r.status + notes.mark(r.reason or status_reason(r)),
                r.detail,
            ]
        )
    header = ["loss", "path", "n", "q", "time (ms)", "memory (MiB)", "of which grads (MiB)"]
    header += ["timed calls", "status", "note"]
    return ["## All cases", "", *bench.markdown_table(header, rows, "llrrrrrrll"), ""]


def report(grid: Grid, results: list[Result], facts: RunFacts, args: argparse.Namespace) -> str:
    res = {r.case: r for r in results}
    notes = Footnotes()  # marks are lettered in the order the tables below first cite them
    lines = head_lines(facts, args)
    lines += sweep_lines(grid, res, notes)
    lines += full_grid_lines(grid, res, notes)
    lines += ratios(grid, res, notes)
    lines += all_cases_lines(results, notes)
    if facts.device == "cpu" and not args.full_grid:
        lines += [
            "The other (loss, n, q) combinations of the full grid were not run on CPU: time "
            "budget on CPU (run with --device cuda, or --full-grid).",
            "",
        ]
    if notes.notes:
        lines += ["Notes:", "", *notes.lines(), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark forward+backward time and peak memory of lowres_ssl.losses.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--max-minutes", type=float, default=9.0, help="time budget of the whole run"
    )
    parser.add_argument("--max-memory-gib", type=float, help=MEMORY_HELP)
    parser.add_argument(
        "--output", type=Path, help="markdown file (default: docs/benchmarks/loss[_cuda].md)"
    )
    parser.add_argument("--quick", action="store_true", help="a tiny grid, for smoke tests")
    parser.add_argument(
        "--full-grid", action="store_true", help="the whole grid on CPU too (within budget)"
    )
    parser.add_argument(
        "--losses", default=",".join(DEFAULT_LOSSES), help=f"subset of {', '.join(loss_names())}"
    )
    parser.add_argument("--block-size", type=int, help="rows per block of the SFRIK blocked path")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan with the estimates, run nothing"
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # child process
    parser.add_argument("--memory-limit-mib", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_child(args: argparse.Namespace) -> int:
    """``--case``: one CPU case in this (fresh) process, its result as one JSON line."""
    limit = args.memory_limit_mib * MIB if args.memory_limit_mib else None
    result = measure_cpu_case(Case.parse(args.case), args.block_size, limit)
    bench.send_result_to_parent(result.to_json())
    return 0


def print_plan(cases: list[Case], results: list[Result], max_minutes: float) -> None:
    """``--dry-run``: how many cases would run, in how long."""
    planned = [r for r in results if r.status == "planned"]
    total = sum(r.estimate.wall_s for r in planned if r.estimate)
    print(
        f"{len(cases)} cases: {len(planned)} planned, estimated {total / 60:.1f} minutes in "
        f"all (budget {max_minutes:g} minutes); the others skipped as shown",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case is not None:
        return run_child(args)
    try:
        device = pick_device(args.device).type
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    losses = [name.strip() for name in args.losses.split(",") if name.strip()]
    unknown = set(losses) - set(loss_names())
    if unknown:
        choices = ", ".join(loss_names())
        print(f"unknown losses {sorted(unknown)}; choose from {choices}", file=sys.stderr)
        return 2
    grid = QUICK if args.quick else FULL
    cases = plan_cases(grid, device, args.full_grid, losses)
    deadline = started + args.max_minutes * 60 - 5  # keep a few seconds for the report
    command = shlex.join(["python", *sys.argv])
    load_before = bench.load_average()
    if device == "cpu" and bench.busy(load_before):
        print(
            f"warning: load average {load_before:.2f} on {available_cores()} cores: CPU timings "
            "will be unreliable (try --threads 1, or a quiet machine)",
            file=sys.stderr,
        )
    results, rates, budget = run_all(cases, args, device, deadline)
    if args.dry_run:
        print_plan(cases, results, args.max_minutes)
        return 0
    elapsed = time.perf_counter() - started
    facts = RunFacts(device, rates, budget, command, elapsed, load_before)
    bench.write_report(report(grid, results, facts, args), args.output or DEFAULT_OUTPUT[device])
    if args.json:
        args.json.write_text(json.dumps([r.to_json() for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
