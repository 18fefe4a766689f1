"""The training step with the embedding cache against one pass and against a plain small batch.

For a ResNet-18 at 32 px and at 96 px, each row is one training step as the engine runs it
(augmentation on the device, the objective in fp32, the optimizer; real LARS, SFRIK at the
projector's q) in its own process, so that peak memory is the row's own:

- ``one pass``: the regulariser batch B through the network at once (where it fits);
- ``cache m``: the same batch B and objective in micro-batches of m (the embedding cache),
  views planned (uint8 images + drawn parameters, each micro-batch's views computed when it
  runs, twice) or, for comparison, ``held`` (the whole batch's views computed first and kept);
- ``plain m``: a plain step at batch m (what a card that holds m could train without the cache;
  another objective: the regulariser sees m images).

Columns: the step's wall time (median of the timed steps), images per second, peak memory
(CUDA: ``max_memory_allocated``; CPU: the process's peak RSS, and its growth during the steps),
and two ratios per image: the cache against plain m (the cost of the second, no-grad forward
and the larger loss) and against one pass.

    python scripts/bench_step.py --device cpu     # writes docs/benchmarks/step.md
    python scripts/bench_step.py --device cuda    # writes docs/benchmarks/step_cuda.md
    python scripts/bench_step.py --device cuda --sizes 32 --micro-batches 256 --output out.md

(The last: the trimmed grid of ``scripts/gpu_checks.sh``; ``--batch`` and ``--max-rows`` trim
further.) Each report is saved after every row, so that a run killed part-way keeps its rows.

CPU rows use small batches (B = 256 at 32 px, 64 at 96 px): a step at B = 1024 takes minutes
on a laptop CPU. Figures are comparable only within one report (same machine, same load).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# after the path, so that the script runs from a checkout without installing the package
import torch  # noqa: E402

from lowres_ssl import bench  # noqa: E402
from lowres_ssl.memory import Setting  # noqa: E402

OUTPUTS = {
    "cpu": REPO / "docs/benchmarks/step.md",
    "cuda": REPO / "docs/benchmarks/step_cuda.md",
}


@dataclass
class Row:
    size: int  # view side in pixels
    mode: str  # one, cache, plain
    batch: int  # images per step (the regulariser's batch)
    micro: int | None = None  # cache: images per network pass
    views: str = "planned"  # planned or held
    step_s: float = float("nan")
    aug_s: float = float("nan")  # one augmentation of the whole batch (both views)
    peak_gib: float = float("nan")
    growth_gib: float = float("nan")  # CPU: peak RSS minus RSS before the first step
    reserved_gib: float = float("nan")  # CUDA
    error: str = ""

    @property
    def label(self) -> str:
        if self.mode == "cache":
            return f"cache {self.micro}" + (" (held views)" if self.views == "held" else "")
        return {"one": "one pass", "plain": f"plain {self.batch}"}[self.mode]

    @property
    def per_image(self) -> float:
        return self.step_s / self.batch


def grid(
    device: str, batch: int | None = None, micro_batches: list[int] | None = None
) -> list[Row]:
    """The rows of a report: per size, one pass, the cache at each micro-batch, plain m.
    ``batch`` and ``micro_batches`` replace the device's own (a shorter grid)."""
    if device == "cuda":
        plan = {32: (1024, [64, 128, 256]), 96: (1024, [64, 128, 256])}
    else:
        plan = {32: (256, [32, 64, 128]), 96: (64, [16, 32])}
    rows = []
    for size, (own_batch, own_micros) in plan.items():
        batch_size, micros = batch or own_batch, micro_batches or own_micros
        rows.append(Row(size, "one", batch_size))
        for m in micros:
            rows.append(Row(size, "cache", batch_size, m))
        rows.append(Row(size, "cache", batch_size, micros[0], views="held"))
        for m in micros:
            rows.append(Row(size, "plain", m))
    return rows


def measure(row: Row, device: str, projector: str, warmup: int, steps: int) -> Row:
    """One row, in this process (call it in a fresh one, so the peak is the row's own)."""
    cuda = device == "cuda"
    setting = Setting(
        projector=projector, view_size=row.size, load_size=row.size, batch_size=row.batch,
        micro_batch_size=row.micro if row.mode == "cache" else None, mixed=cuda,
        state_bits=8 if cuda else 32, cuda=cuda,
    )  # fmt: skip
    side = row.size if row.size <= 64 else row.size * 5 // 4  # photos are cropped, then resized
    rig = bench.step_rig(setting, load_side=side)
    held = row.views == "held"
    before = rig.reset_peak()
    try:
        for _ in range(warmup):
            rig.run(held_views=held)
        times = [rig.run(held_views=held) for _ in range(steps)]
    except torch.cuda.OutOfMemoryError:
        row.error = "out of memory"
        return row
    peak = rig.peak()
    rig.sync()
    start = time.perf_counter()
    for _ in range(3):
        rig.augment.plan(rig.images, generator=rig.generator).take(None, 2)
    rig.sync()
    row.aug_s = (time.perf_counter() - start) / 3
    row.step_s = statistics.median(times)
    if cuda:
        row.peak_gib, row.reserved_gib = peak["allocated_gib"], peak["reserved_gib"]
    else:
        row.peak_gib = peak["rss_gib"]
        row.growth_gib = row.peak_gib - before
    return row


def run_isolated(row: Row, args: argparse.Namespace) -> Row:
    """:func:`measure` of ``row`` in a fresh process of this script (``--one``)."""
    child_args = ["--one", json.dumps(asdict(row)), "--device", args.device]
    child_args += ["--projector", args.projector, "--warmup", str(args.warmup)]
    child_args += ["--steps", str(args.steps)]
    child = bench.run_fresh_process(__file__, child_args)
    if child.failure:
        row.error = child.failure[:120]
        return row
    return Row(**child.result)


def _fmt(x: float, spec: str) -> str:
    return "–" if x != x else format(x, spec)  # NaN → dash


def table(rows: list[Row], device: str) -> list[str]:
    cpu = device == "cpu"
    header = ["size", "step", "batch", "step s", "img/s", "aug s", "peak GiB"]
    header += ["growth GiB" if cpu else "reserved GiB", "time/img vs plain m"]
    header += ["time/img vs one pass", "peak vs one pass"]
    cells = []
    for r in rows:
        one = next((o for o in rows if o.size == r.size and o.mode == "one"), None)
        plain = next(
            (p for p in rows if p.size == r.size and p.mode == "plain" and p.batch == r.micro),
            None,
        )
        if r.error:
            cells.append([r.size, r.label, r.batch, r.error])
            continue
        vs_plain = r.per_image / plain.per_image if r.mode == "cache" and plain else float("nan")
        vs_one = r.per_image / one.per_image if one and r.mode != "one" else float("nan")
        mem = r.peak_gib / one.peak_gib if one and r.mode != "one" else float("nan")
        extra = r.growth_gib if cpu else r.reserved_gib
        figures = [f"{r.step_s:.3f}", f"{r.batch / r.step_s:.1f}", _fmt(r.aug_s, ".3f")]
        figures += [f"{r.peak_gib:.2f}", *(_fmt(x, ".2f") for x in (extra, vs_plain, vs_one, mem))]
        cells.append([r.size, r.label, r.batch, *figures])
    return bench.markdown_table(header, cells)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--projector",
        help="projector widths (default: 1024-2048 on the CPU, the "
        "8gb preset's 2048-2048-8192 on CUDA)",
    )
    p.add_argument("--warmup", type=int, help="untimed steps first (default 1 CPU, 3 CUDA)")
    p.add_argument("--steps", type=int, help="timed steps (default 2 CPU, 10 CUDA)")
    p.add_argument("--sizes", help="comma-separated view sides to run (default: 32,96)")
    p.add_argument(
        "--batch",
        type=int,
        help="the regulariser batch at every size (default 1024 CUDA; 256 / 64 CPU)",
    )
    p.add_argument(
        "--micro-batches",
        help="comma-separated micro-batches (default 64,128,256 CUDA; 32,64,128 / 16,32 CPU)",
    )
    p.add_argument("--max-rows", type=int, help="only the first this many rows of the grid")
    p.add_argument("--output", type=Path, help="markdown report (default under docs/benchmarks)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one row, print JSON
    args = p.parse_args()
    cuda = args.device == "cuda"
    args.projector = args.projector or ("2048-2048-8192" if cuda else "1024-2048")
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.steps = args.steps or (10 if cuda else 2)
    args.micro_batches = (
        [int(m) for m in args.micro_batches.split(",")] if args.micro_batches else None
    )
    if args.batch and args.micro_batches and max(args.micro_batches) >= args.batch:
        p.error(f"--micro-batches must be below --batch {args.batch}: the cache splits the batch")
    return args


def run_rows(
    rows: list[Row],
    args: argparse.Namespace,
    after_row: Callable[[list[Row]], object] = lambda done: None,
) -> list[Row]:
    """Every row in its own process, each reported as it ends (printed, and ``after_row`` called
    with the rows done so far)."""
    print(f"{len(rows)} rows, each in its own process", flush=True)
    done = []
    for row in rows:
        r = run_isolated(row, args)
        figures = (
            f"{r.step_s:.3f} s/step, {r.batch / r.step_s:.1f} img/s, peak {r.peak_gib:.2f} GiB"
        )
        print(f"  {r.size:3d} px  {r.label:<22} B={r.batch:<5} {r.error or figures}", flush=True)
        done.append(r)
        after_row(done)
    return done


def report_lines(rows: list[Row], args: argparse.Namespace, load: float | None) -> list[str]:
    """The report: the machine, the setting, the table and how to read it."""
    cuda = args.device == "cuda"
    precision = "bf16/fp16 autocast" if cuda else "fp32"
    return [
        f"# The training step: embedding cache, one pass, plain small batch ({args.device})",
        "",
        "Written by `python scripts/bench_step.py --device " + args.device + "`.",
        "",
        *bench.machine_lines(args.device),
        *bench.load_lines(load),
        f"- ResNet-18 (CIFAR stem at 32 px, ImageNet stem at 96 px), projector {args.projector}, "
        f"SFRIK (λ = 8192/4000, kernel weights 1, 40, 40), LARS "
        f"({'8-bit' if cuda else '32-bit'} state), {precision}; augmentation on the device "
        "(`cifar` recipe at 32 px, `vicreg` at 96 px from 120 px images) inside the step time",
        f"- {args.warmup} untimed step(s), then the median of {args.steps}; each row in a fresh "
        "process",
        "",
        *table(rows, args.device),
        "",
        "Reading the table: `time/img vs plain m` is the price of the cache over training at "
        "the micro-batch alone (the second, no-grad forward and the loss on the whole batch); "
        "`time/img vs one pass` and `peak vs one pass` compare it with the same objective "
        "computed at once. `aug s` is one augmentation of the batch (both views): planned views "
        "compute it twice per step, held views once but keep both views of the whole batch.",
        "",
    ]


def main() -> int:
    args = parse_args()
    if args.one:
        row = measure(
            Row(**json.loads(args.one)), args.device, args.projector, args.warmup, args.steps
        )
        bench.send_result_to_parent(asdict(row))
        return 0

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda needs a CUDA GPU; run --device cpu here", file=sys.stderr)
        return 2
    load = bench.load_average()
    output = args.output or OUTPUTS[args.device]
    rows = grid(args.device, args.batch, args.micro_batches)
    if args.sizes:
        keep = {int(s) for s in args.sizes.split(",")}
        rows = [r for r in rows if r.size in keep]
    rows = rows[: args.max_rows]
    # the report so far after every row: a run killed part-way keeps the rows it measured
    rows = run_rows(
        rows, args, lambda done: bench.save_report(report_lines(done, args, load), output)
    )
    bench.write_report(report_lines(rows, args, load), output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
