#!/usr/bin/env python
"""The weights' memory layout under the 8-bit optimizer: what each way of running channels_last
costs, in one process, as ratios.

bitsandbytes' 8-bit update runs ``p.data = p.data.contiguous()`` and the same for the gradient
on every step (its kernels read flat memory), so a ``channels_last`` conv weight leaves that
layout at the first step, is copied back by every later step that finds it converted, and the
8-bit and 32-bit optimizers trained with different layouts. It also calls
``torch.cuda.synchronize()`` after each parameter's update. Rows, for a ResNet-18 at 32 px (the
CIFAR stem) with channels_last input:

- ``forward+backward``: weights channels_last against weights in the default (contiguous)
  layout (a convolution then converts its weight on each call);
- ``8-bit step``: the optimizer's step alone with channels_last weights, which the kit puts
  back after each step (``optim.ChannelsLastKept``: bitsandbytes copies the weight and the
  gradient to the default layout, then the layout is restored: three copies) against contiguous
  weights (no copy); on CUDA also without bitsandbytes' per-parameter synchronize (patched out
  for the measurement only);
- ``32-bit step``: torch's LARS on each layout, for reference.

    python scripts/bench_layout.py --device cpu    # writes docs/benchmarks/layout.md
    python scripts/bench_layout.py --device cuda   # writes docs/benchmarks/layout_cuda.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lowres_ssl import bench
from lowres_ssl.device import synchronize
from lowres_ssl.eval.context import pick_device
from lowres_ssl.models import build_model
from lowres_ssl.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
CL = torch.channels_last


def timed_ms(run: Callable[[], None], device: torch.device, repeats: int) -> float:
    """The median milliseconds of ``run`` over ``repeats`` calls, after two warm-up calls."""
    times = []
    for i in range(repeats + 2):
        synchronize(device)
        t0 = time.perf_counter()
        run()
        synchronize(device)
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def model_in(layout: torch.memory_format, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", "512-512", image_size=32).to(device, memory_format=layout)


def input_batch(batch: int, device: torch.device) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=CL)


def forward_backward_ms(layout, device, batch: int, repeats: int) -> float:
    model, x = model_in(layout, device), input_batch(batch, device)

    def run() -> None:
        model(x).square().mean().backward()

    return timed_ms(run, device, repeats)


def optimizer_step_ms(layout, device, bits: int, repeats: int) -> tuple[float, str]:
    """The step alone on fixed gradients, and what the optimizer is and left of the layout."""
    model = model_in(layout, device)
    model(input_batch(8, device)).square().mean().backward()
    grads = {p: p.grad.clone() for p in model.parameters()}
    opt = build_optimizer("lars", model, lr=0.1, weight_decay=1e-6, state_bits=bits)

    def run() -> None:
        for p, g in grads.items():
            p.grad = g.clone(memory_format=torch.preserve_format)
        opt.step()

    ms = timed_ms(run, device, repeats)
    conv = next(p for p in model.parameters() if p.dim() == 4)
    kept = "kept" if conv.is_contiguous(memory_format=layout) else "lost"
    return ms, f"{opt.description}; layout after the step: {kept}"


def unsynchronized_8bit_ms(device, repeats: int) -> float:
    """The 8-bit step on contiguous weights with bitsandbytes' per-parameter synchronize
    patched out (a measurement of what it costs, nothing the kit does)."""
    import bitsandbytes.optim.optimizer as bnb_optimizer

    saved = bnb_optimizer.sync_gpu
    bnb_optimizer.sync_gpu = lambda t: None
    try:
        return optimizer_step_ms(torch.contiguous_format, device, 8, repeats)[0]
    finally:
        bnb_optimizer.sync_gpu = saved


def measure(device: torch.device, batch: int, repeats: int) -> list[list[object]]:
    contiguous = torch.contiguous_format
    fb_cl = forward_backward_ms(CL, device, batch, repeats)
    fb_plain = forward_backward_ms(contiguous, device, batch, repeats)
    rows = [
        ["forward+backward", "weights channels_last", f"{fb_cl:.1f}", "1.00", ""],
        ["forward+backward", "weights contiguous", f"{fb_plain:.1f}", f"{fb_plain / fb_cl:.2f}",
         "each conv converts its weight per call"],
    ]  # fmt: skip
    for bits in (8, 32):
        cl, cl_note = optimizer_step_ms(CL, device, bits, repeats)
        plain, plain_note = optimizer_step_ms(contiguous, device, bits, repeats)
        rows += [
            [f"{bits}-bit step", "weights channels_last", f"{cl:.2f}", "1.00", cl_note],
            [f"{bits}-bit step", "weights contiguous", f"{plain:.2f}", f"{plain / cl:.2f}",
             plain_note],
        ]  # fmt: skip
        if bits == 8 and device.type == "cuda":
            unsynced = unsynchronized_8bit_ms(device, repeats)
            ratio = f"{unsynced / cl:.2f}"
            note = "bitsandbytes' synchronize patched out"
            rows.append(["8-bit step", "contiguous, no sync", f"{unsynced:.2f}", ratio, note])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=None, help="images per forward")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (256 if cuda else 64)
    repeats = args.repeats or (20 if cuda else 5)
    rows = measure(device, batch, repeats)
    headers = ["what", "variant", "ms (median)", "ratio to the first", "note"]
    report = [
        "# The weights' layout under the 8-bit optimizer",
        "",
        f"`python scripts/bench_layout.py --device {device.type}`: ResNet-18 (CIFAR stem) with "
        f"a 512-512 projector, channels_last input of {batch} images at 32 px, {repeats} timed "
        "calls after 2 warm-up calls, medians; ratios within this run only.",
        "",
        *bench.machine_lines(device.type),
        "",
        *bench.markdown_table(headers, rows),
    ]
    name = "layout_cuda.md" if cuda else "layout.md"
    output = args.output or ROOT / "docs" / "benchmarks" / name
    bench.write_report(report, output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
