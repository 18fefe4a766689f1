"""Quick checks that only a GPU can show, seconds each, for ``scripts/gpu_checks.sh``.

Each check is one small function; it prints one line (name, ok or FAIL, the figure) and appends
its row to ``OUT/quick_checks.md`` as it ends, so that a run killed part-way keeps the rows
before. A check that raises is recorded as FAIL with its one-line error, and the next one runs.
The exit status is 1 when any check failed.

- ``gpu-cached set``: the decoded set on the device the way training puts it there
  (Accelerate's device, ``cuda`` without an index) and the first 3 batches of its loader;
- ``emulated card``: ``LOWRES_SSL_GPU_GIB=8`` caps the allocator between 6 and 8 GiB (in a
  process of its own: the cap is per process and would hold for the checks after it);
- ``8-bit step keeps channels_last``: one LARS step with 8-bit state on a channels_last
  model (what the step costs is ``scripts/bench_layout.py``'s);
- ``fp16 embedding-cache run``: two steps of ``scripts/train.py`` in fp16 with micro-batches.

    python scripts/gpu_quick_checks.py --environment        # versions, bitsandbytes' library
    python scripts/gpu_quick_checks.py --data /tmp/data/cifar10/train --out gpu-out
    python scripts/gpu_quick_checks.py --make-tiny-folder /tmp/tiny   # data for the CPU form
    python scripts/gpu_quick_checks.py --device cpu --data /tmp/tiny/train --out /tmp/out

``--device cpu`` runs each check in its CPU form (``cpu:0`` where the check compares devices,
fp32, a tiny run) so that the plumbing is exercised without a GPU.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# after the path, so that the script runs from a checkout without installing the package
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lowres_ssl import bench  # noqa: E402
from lowres_ssl.device import CARD_ENV  # noqa: E402

TABLE_FILE = "quick_checks.md"
RUN_LOG_FILE = "fp16_run.log"
EMULATED_GIB = 8
CHUNK_BYTES = 256 * 2**20
TABLE_HEADER = ["check", "result", "figure", "seconds"]


@dataclass(frozen=True)
class Outcome:
    ok: bool
    figure: str


@dataclass(frozen=True)
class Context:
    """What every check is given: the device kind, the data, where results go, the deadline."""

    device: str  # "cuda" or "cpu"
    data: Path
    out: Path
    work: Path  # scratch, removed at the end
    deadline: float  # time.monotonic() by which the checks should be done

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def timeout_s(self, wanted: float) -> float:
        """``wanted`` seconds for a subprocess, or less where the deadline comes first."""
        return max(5.0, min(wanted, self.deadline - time.monotonic() - 3))


class CheckFailed(Exception):
    """A check's subprocess failed; the message is its one-line reason."""


def one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------------------------
# The environment: versions and which bitsandbytes library loaded


def version_of(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except Exception as err:  # a kit package that does not import is itself the finding
        return f"not importable ({one_line(err, 120)})"


def bitsandbytes_library() -> str:
    """The backend bitsandbytes chose and the native library it loaded: a CUDA build that does
    not match falls back to the CPU library or to none, and 8-bit state then to 32 bits."""
    from bitsandbytes import cextension

    lib = cextension.lib
    if isinstance(lib, cextension.ErrorHandlerMockBNBNativeLibrary):
        return f"backend {cextension.BNB_BACKEND}; NO native library: {lib.error_msg}"
    built = "a CUDA build" if lib.compiled_with_cuda else "no CUDA build"
    return f"backend {cextension.BNB_BACKEND}; native library {lib._lib._name} ({built})"


def sgd8bit_state(device: torch.device) -> str:
    """The state dtype of one bitsandbytes ``SGD8bit`` step on ``device``: uint8 when the
    native library runs there."""
    import bitsandbytes as bnb

    from lowres_ssl.optim import MIN_8BIT_SIZE  # smaller tensors keep 32-bit state anyway

    p = torch.zeros(MIN_8BIT_SIZE, device=device, requires_grad=True)
    p.grad = torch.full_like(p, 1e-3)
    opt = bnb.optim.SGD8bit([p], lr=0.1, momentum=0.9)
    opt.step()
    dtype = opt.state[p]["state1"].dtype
    kept = "8-bit state kept" if dtype == torch.uint8 else "NOT 8-bit"
    return f"state1 {dtype} on {p.device}: {kept}"


def environment_lines(device: str) -> list[str]:
    logging.basicConfig(level=logging.WARNING)  # bitsandbytes logs a failed load, then goes on
    cuda = f"CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}"
    lines = [f"python {sys.version.split()[0]}", f"torch {torch.__version__} ({cuda})"]
    lines += [f"{m} {version_of(m)}" for m in ("accelerate", "bitsandbytes", "kornia")]
    for label, probe in (
        ("bitsandbytes library", bitsandbytes_library),
        ("bitsandbytes SGD8bit step", lambda: sgd8bit_state(torch.device(device))),
    ):
        try:
            lines.append(f"{label}: {probe()}")
        except Exception as err:
            lines.append(f"{label}: FAIL {one_line(err)}")
    return lines


# --------------------------------------------------------------------------------------------
# The checks


def accelerator_device(ctx: Context) -> torch.device:
    """The device training uses: Accelerate's (``cuda``, no index) on the GPU; on the CPU
    ``cpu:0``, which also differs from what its tensors report (``cpu``)."""
    if not ctx.cuda:
        return torch.device("cpu:0")
    from accelerate import Accelerator

    return Accelerator().device


def check_gpu_cached_set(ctx: Context) -> Outcome:
    """The decoded set kept on the device, and the first 3 batches of an epoch from it."""
    from lowres_ssl.data import make_loader, open_images

    device = accelerator_device(ctx)
    images = open_images(ctx.data, load_size=32, cache="gpu", device=device, progress=False)
    batch_size = 256 if ctx.cuda else 4
    batches = make_loader(images, batch_size, device=device).iterate(0)
    try:
        got = list(itertools.islice(batches, 3))
    finally:
        batches.close()  # stops the loader's prefetch thread, where it has one
    ok = len(got) == 3 and all(b.images.device.type == device.type for b in got)
    places = ", ".join(sorted({str(b.images.device) for b in got}))
    held = getattr(images, "device", "decoded every epoch")
    return Outcome(
        ok, f"{len(got)} batches of {batch_size} on {places}; set on {held}, asked {device}"
    )


def allocate_until_oom(device: torch.device, limit_gib: float) -> float:
    """GiB allocated in 256 MiB chunks until the allocator refuses (or ``limit_gib``)."""
    chunks = []
    try:
        while len(chunks) * CHUNK_BYTES < limit_gib * 2**30:
            chunks.append(torch.empty(CHUNK_BYTES, dtype=torch.uint8, device=device))
    except torch.cuda.OutOfMemoryError:
        pass
    return len(chunks) * CHUNK_BYTES / 2**30


def measure_emulated_card(cuda: bool) -> dict:
    """In the child process: cap the allocator as an 8 GB card and fill it."""
    from lowres_ssl.device import card_memory_gib, emulate_card

    if not cuda:  # no allocator to cap: check only that the call is a no-op without the variable
        os.environ.pop(CARD_ENV, None)
        line = emulate_card(torch.device("cpu"))
        return asdict(Outcome(line is None, f"CPU form: emulate_card without {CARD_ENV} → {line}"))
    device = torch.device("cuda")
    line = emulate_card(device)
    limit = 2 * EMULATED_GIB  # past the card's size the cap has failed: no need to go on
    allocated = allocate_until_oom(device, limit)
    ok = line is not None and EMULATED_GIB - 2 < allocated < EMULATED_GIB
    stop = "no out-of-memory error" if allocated >= limit else "out of memory"
    figure = (
        f"{stop} at {allocated:.2f} GiB allocated; card_memory_gib {card_memory_gib(device):.2f}"
    )
    return asdict(Outcome(ok, f"{figure}; {line}"))


def check_emulated_card(ctx: Context) -> Outcome:
    """``emulate_card`` under ``LOWRES_SSL_GPU_GIB=8``, in a process of its own."""
    child = bench.run_fresh_process(
        __file__,
        ["--child", "emulated-card", "--device", ctx.device],
        env={CARD_ENV: str(EMULATED_GIB)},
        timeout_s=ctx.timeout_s(60),
    )
    if child.failure:
        raise CheckFailed(f"in its process: {child.failure}")
    return Outcome(**child.result)


def small_conv_net() -> nn.Module:
    # the second conv has 36,864 weights: above bitsandbytes' 4,096, so its state is 8-bit
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


def channels_last_after_8bit_step(device: torch.device) -> tuple[bool, str, str]:
    """(every conv weight still channels_last, the optimizer's description, the conv's state
    dtype) after one forward, backward and 8-bit LARS step."""
    from lowres_ssl.optim import build_optimizer

    model = small_conv_net().to(device, memory_format=torch.channels_last)
    opt = build_optimizer("lars", model, lr=0.1, weight_decay=1e-6, state_bits=8)
    x = torch.randn(8, 3, 16, 16, device=device).to(memory_format=torch.channels_last)
    model(x).square().mean().backward()
    opt.step()
    convs = [p for p in model.parameters() if p.ndim == 4]
    kept = all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    state = opt.state[convs[-1]].get("state1")
    return kept, opt.description, "no state1" if state is None else str(state.dtype)


def check_8bit_step(ctx: Context) -> Outcome:
    device = torch.device(ctx.device)
    kept, description, state = channels_last_after_8bit_step(device)
    # the step's cost, 8-bit against 32-bit and per layout: bench_layout.py, its own part
    figure = f"channels_last kept: {'yes' if kept else 'NO'}; state {state} ({description})"
    return Outcome(kept and state == "torch.uint8", figure)


def train_command(ctx: Context, run: Path) -> list[str]:
    """Two steps of the 8gb preset with micro-batches below the batch: fp16 on the GPU; fp32,
    a small batch and projector on the CPU."""
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "--data", str(ctx.data)]
    command += ["--preset", "8gb", "--max-steps", "2", "--out", str(run)]
    if ctx.cuda:
        settings = ["train.precision=fp16", "train.micro_batch_size=64"]
    else:
        settings = ["train.precision=fp32", "train.batch_size=4", "train.micro_batch_size=2"]
        settings.append("model.projector=32-64")
    return command + [arg for s in settings for arg in ("--set", s)]


def check_fp16_run(ctx: Context) -> Outcome:
    from lowres_ssl.run_layout import SUMMARY_FILE

    run, log = ctx.work / "fp16-run", ctx.out / RUN_LOG_FILE
    timeout = ctx.timeout_s(150)
    with log.open("w") as output:
        try:
            done = subprocess.run(
                train_command(ctx, run), stdout=output, stderr=subprocess.STDOUT, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"timed out after {timeout:.0f} s (see {log.name})") from None
    if done.returncode != 0:
        last = (log.read_text(errors="replace").strip().splitlines() or [""])[-1]
        raise CheckFailed(f"exit {done.returncode}: {last.strip()} (see {log.name})")
    summary = json.loads((run / SUMMARY_FILE).read_text())
    figure = f"steps {summary['steps']}, bad_steps {summary['bad_steps']}, "
    figure += f"precision {summary['precision']}, {summary['optimizer']}"
    return Outcome(summary["steps"] == 2, figure)


CHECKS: dict[str, Callable[[Context], Outcome]] = {
    "gpu-cached set": check_gpu_cached_set,
    "emulated card": check_emulated_card,
    "8-bit step keeps channels_last": check_8bit_step,
    "fp16 embedding-cache run": check_fp16_run,
}


# --------------------------------------------------------------------------------------------
# Running them


def run_check(name: str, check: Callable[[Context], Outcome], ctx: Context) -> Outcome:
    """One check: printed, and its row appended to the table, as it ends."""
    start = time.perf_counter()
    try:
        outcome = check(ctx)
    except Exception as err:  # recorded, and the next check runs
        outcome = Outcome(False, one_line(err))
    seconds = time.perf_counter() - start
    result = "ok" if outcome.ok else "FAIL"
    print(f"{name}: {result} — {outcome.figure} ({seconds:.1f} s)", flush=True)
    with (ctx.out / TABLE_FILE).open("a", encoding="utf-8") as table:
        table.write(bench.markdown_row([name, result, outcome.figure, f"{seconds:.1f}"]) + "\n")
    return outcome


def run_checks(ctx: Context) -> int:
    """Every check in turn; 1 when any failed."""
    (ctx.out / TABLE_FILE).write_text("\n".join(bench.markdown_table(TABLE_HEADER, [])) + "\n")
    outcomes = [run_check(name, check, ctx) for name, check in CHECKS.items()]
    return 0 if all(o.ok for o in outcomes) else 1


def make_tiny_folder(root: Path) -> None:
    """A tiny ImageFolder (``train`` and ``test``, two classes) of random 32 px JPEGs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 12), ("test", 4)):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument(
        "--data",
        type=Path,
        default=Path("/tmp/data/cifar10/train"),
        help="a folder of 32 px images (default: the kit's CIFAR-10 train folder)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT", "gpu-out")),
        help=f"where {TABLE_FILE} and {RUN_LOG_FILE} go (default: $OUT, else gpu-out)",
    )
    p.add_argument(
        "--time-limit-s",
        type=float,
        default=105,
        help="seconds for all the checks: the subprocesses' timeouts end by then (default 105)",
    )
    p.add_argument(
        "--environment",
        action="store_true",
        help="instead: print the versions and the bitsandbytes library that loaded",
    )
    p.add_argument(
        "--make-tiny-folder",
        type=Path,
        metavar="DIR",
        help="instead: write a tiny ImageFolder (train, test) there for the CPU form",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one check in its own process
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if args.child == "emulated-card":
        bench.send_result_to_parent(measure_emulated_card(args.device == "cuda"))
        return 0
    if args.make_tiny_folder:
        make_tiny_folder(args.make_tiny_folder)
        return 0
    if args.environment:
        print("\n".join(environment_lines(args.device)), flush=True)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda needs a CUDA GPU; run --device cpu here", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-quick-checks-") as work:
        deadline = time.monotonic() + args.time_limit_s
        return run_checks(Context(args.device, args.data, args.out, Path(work), deadline))


if __name__ == "__main__":
    raise SystemExit(main())
