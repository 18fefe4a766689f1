#!/usr/bin/env python
"""Images per second delivered as augmented two-view batches on the device.

This is a benchmark, not a test. It prints a markdown report and writes it to ``--output``.

Input: the shared CIFAR-10 train folder (50,000 JPEG files of 32x32; ``--data`` for another
folder), decoded at ``--load-size`` (default 32), batches of ``--batch-size`` (default 256)
images, the ``--recipe`` augmentation (default ``vicreg``, the costliest: blur on every first
view) making two views of ``--load-size`` pixels in the training precision (CUDA: bf16 when
the GPU supports it, else fp16; CPU: fp32).

Cases (each: one warm-up batch, then batches until about ``--seconds`` have passed)
    decode, 1 worker / 2 workers   ``cache: none``: DataLoader workers decode every file
    disk cache                     ``cache: disk``: rows of the memory-mapped decoded array
    gpu cache (CUDA)               ``cache: gpu``: rows indexed on the device
    augmentation alone             a uint8 batch already on the device, views only
For every loader the table gives the loader alone (uint8 batches on the device) and the loader
with the augmentation (the full input pipeline of one training step), and the one-time cost of
building the disk cache.

The yardstick is one training step of a ResNet-18 (CIFAR stem) with a 2048-2048 projector on
the two views (forward, backward, SGD), at the same batch and precision: "input / step" is the
time the input pipeline needs per batch as a fraction of that step. Below 1 the training step
hides the input (the loaders prefetch in worker processes or threads); on CPU both compete for
the same cores, so there the fraction is an upper bound on what overlapping can achieve.

Usage
    python scripts/bench_data.py                    # CUDA if present, else CPU
    python scripts/bench_data.py --device cpu       # writes docs/benchmarks/data.md
    python scripts/bench_data.py --device cuda      # writes docs/benchmarks/data_cuda.md
    python scripts/bench_data.py --quick --output /tmp/data.md   # seconds, smoke test
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import torch
import torchvision
from torch import nn

import lowres_ssl.augment as augment
import lowres_ssl.data as data
from lowres_ssl import bench
from lowres_ssl.eval.context import pick_device

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = {
    "cpu": REPO / "docs/benchmarks/data.md",
    "cuda": REPO / "docs/benchmarks/data_cuda.md",
}
SHARED_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


@dataclass
class Row:
    case: str
    loader_ips: float | None = None  # images/s, uint8 batches on the device
    pipeline_ips: float | None = None  # images/s, loader + augmentation
    batches: int = 0
    note: str = ""


@dataclass(frozen=True)
class Conditions:
    """Where and how long each case is measured."""

    device: torch.device
    dtype: torch.dtype  # of the views: the training precision
    channels_last: bool
    batch_size: int
    seconds: float  # per measurement
    max_batches: int

    @staticmethod
    def from_args(args: argparse.Namespace) -> Conditions:
        device = pick_device(args.device)
        cuda = device.type == "cuda"
        seconds = args.seconds or (3.0 if cuda else 6.0)
        max_batches = args.max_batches
        if args.quick:
            seconds, max_batches = 0.5, 3
        dtype = torch.float32
        if cuda:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Conditions(device, dtype, cuda, args.batch_size, seconds, max_batches)

    def augmentation(self, recipe: str, size: int) -> nn.Module:
        views = augment.build_augment(
            recipe, size, out_dtype=self.dtype, channels_last=self.channels_last
        )
        return views.to(self.device)

    def rate(self, step: Callable[[], int], max_batches: int | None = None) -> tuple[float, int]:
        return rate(step, self.device, self.seconds, max_batches or self.max_batches)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(
    step: Callable[[], int], device: torch.device, seconds: float, max_batches: int
) -> tuple[float, int]:
    """Images per second of ``step`` (which returns the images it handled), after one warm-up
    call, over calls until ``seconds`` have passed (at least 2, at most ``max_batches``)."""
    step()
    sync(device)
    images, calls, start = 0, 0, time.perf_counter()
    while calls < 2 or (time.perf_counter() - start < seconds and calls < max_batches):
        images += step()
        calls += 1
    sync(device)
    return images / (time.perf_counter() - start), calls


def endless(loader: data.ImageLoader) -> Iterator[data.Batch]:
    epoch = 0
    while True:
        yield from loader.iterate(epoch)
        epoch += 1


def measure_loader(
    name: str, loader: data.ImageLoader, views: nn.Module, conditions: Conditions
) -> Row:
    """The loader alone, then the loader feeding the augmentation, each on a fresh iterator
    (so the workers' prefetch queue does not carry over)."""
    batches = endless(loader)

    def only_loader() -> int:
        return len(next(batches).images)

    ips, n = conditions.rate(only_loader)
    batches = endless(loader)

    def with_views() -> int:
        images = next(batches).images
        views(images)
        return len(images)

    ips_views, n2 = conditions.rate(with_views)
    return Row(name, ips, ips_views, n + n2)


class ReferenceStep:
    """One SSL training step of a ResNet-18 with a CIFAR stem (3x3 conv, stride 1, no max-pool)
    and a 2048-2048 projector, on two views; the yardstick for the input pipeline."""

    def __init__(self, device: torch.device, dtype: torch.dtype, channels_last: bool):
        net = torchvision.models.resnet18(num_classes=10)
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
        net.fc = nn.Sequential(
            nn.Linear(512, 2048), nn.BatchNorm1d(2048), nn.ReLU(), nn.Linear(2048, 2048)
        )
        self.net = net.to(device, memory_format=torch.channels_last if channels_last else None)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.01, momentum=0.9)
        self.device, self.dtype = device, dtype

    def __call__(self, v1: torch.Tensor, v2: torch.Tensor) -> None:
        with torch.autocast(
            self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32
        ):
            z1, z2 = self.net(v1), self.net(v2)
        loss = (z1.float() - z2.float()).pow(2).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def find_data(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    target = data.default_cache_dir() / "bench-cifar10"
    train = target / "cifar10" / "train"
    if not train.exists():
        if not SHARED_ARCHIVE.exists():
            sys.exit(
                f"no --data given and the shared CIFAR-10 archive is missing: {SHARED_ARCHIVE}"
            )
        import tarfile

        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(SHARED_ARCHIVE) as tar:
            tar.extractall(target, filter="data")
    return train


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--data", help="image folder (default: the shared CIFAR-10 train folder)")
    p.add_argument("--load-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--recipe", default="vicreg", choices=sorted(augment.RECIPES))
    p.add_argument("--seconds", type=float, default=None, help="per measurement (CPU 6, CUDA 3)")
    p.add_argument("--max-batches", type=int, default=400)
    p.add_argument("--quick", action="store_true", help="a few batches each: a smoke test")
    p.add_argument("--output", type=Path, help="markdown report (default under docs/benchmarks)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    return p.parse_args()


def first_files(images: data.FolderImages, count: int) -> data.FolderImages:
    """The same folder's first ``count`` files only."""
    files = images.files
    subset = data.FileList(
        files.root, files.paths[:count], files.sizes[:count], files.mtimes_ns[:count], []
    )
    return data.FolderImages(subset, images.load_size)


def measure_loaders(
    conditions: Conditions,
    images: data.FolderImages,
    views: nn.Module,
    cache_dir: Path,
    quick: bool,
) -> tuple[list[Row], data.ArrayImages]:
    """Decoding every epoch (1 and 2 workers), building the disk cache, then reading it (and,
    on CUDA, the cache on the device); the rows, and the disk cache."""
    rows: list[Row] = []

    def measure(name: str, source, **kwargs) -> None:
        loader = data.make_loader(source, conditions.batch_size, device=conditions.device, **kwargs)
        rows.append(measure_loader(name, loader, views, conditions))
        print(rows[-1], flush=True)

    measure("decode every epoch, 1 worker", images, num_workers=1)
    measure("decode every epoch, 2 workers", images, num_workers=2)
    start = time.perf_counter()
    subset = first_files(images, 2000) if quick else images
    cached = data.build_disk_cache(subset, cache_dir, num_workers=2, progress=False)
    build_s = time.perf_counter() - start
    rows.append(Row("build the disk cache (once, 2 workers)", len(subset) / build_s, None, 1))
    measure("disk cache", cached)
    if conditions.device.type == "cuda":
        measure("gpu cache", cached.to(conditions.device))
    return rows, cached


def measure_augmentation(
    conditions: Conditions, batch: torch.Tensor, views: nn.Module, recipe: str, load_size: int
) -> list[Row]:
    """The augmentation alone on a batch already on the device, at the load size and at the
    larger views of STL-10 (96 px) and, on CUDA, ImageNet (224 px): the same images, resized."""

    def only_views() -> int:
        views(batch)
        return len(batch)

    ips, n = conditions.rate(only_views)
    rows = [Row("augmentation alone", None, ips, n)]
    print(rows[-1], flush=True)
    for size in (96, 224) if conditions.device.type == "cuda" else (96,):
        if size == load_size:
            continue
        big = nn.functional.interpolate(batch.float(), size=(size, size), mode="bilinear")
        big = big.round_().clamp_(0, 255).to(torch.uint8)
        big_views = conditions.augmentation(recipe, size)

        def views_at_size(big=big, big_views=big_views) -> int:
            big_views(big)
            return len(big)

        ips, n = conditions.rate(views_at_size)
        rows.append(Row(f"augmentation alone, {size} px views", None, ips, n, "no step"))
        print(rows[-1], flush=True)
    return rows


def reference_rate(conditions: Conditions, batch: torch.Tensor, views: nn.Module) -> float:
    """Images per second of the reference training step on the two views of ``batch``."""
    step = ReferenceStep(conditions.device, conditions.dtype, conditions.channels_last)
    v1, v2 = views(batch)[:2]

    def train_step() -> int:
        step(v1, v2)
        return len(batch)

    step_ips, _ = conditions.rate(train_step, max(3, conditions.max_batches // 4))
    print(f"reference step: {step_ips:.0f} images/s", flush=True)
    return step_ips


def main() -> None:
    args = parse_args()
    conditions = Conditions.from_args(args)
    load_before = bench.load_average()
    started = time.perf_counter()
    folder = find_data(args.data)
    views = conditions.augmentation(args.recipe, args.load_size)
    cache_dir = Path(tempfile.mkdtemp(prefix="bench-data-cache-"))
    try:
        images = data.open_images(folder, load_size=args.load_size, cache="none")
        n_files = len(images)
        print(f"{n_files:,} files in {folder}", flush=True)
        rows, cached = measure_loaders(conditions, images, views, cache_dir, args.quick)
        batch = next(
            iter(data.make_loader(cached, conditions.batch_size, device=conditions.device))
        ).images
        rows += measure_augmentation(conditions, batch, views, args.recipe, args.load_size)
        step_ips = reference_rate(conditions, batch, views)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    wall = time.perf_counter() - started
    report = render(
        args,
        conditions.device,
        conditions.dtype,
        folder,
        n_files,
        rows,
        step_ips,
        load_before,
        wall,
    )
    bench.write_report(report, args.output or DEFAULT_OUTPUT[conditions.device.type])
    if args.json:
        args.json.write_text(
            json.dumps({"rows": [asdict(r) for r in rows], "step_ips": step_ips}, indent=1)
        )


def fmt_ips(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f}"


def table_rows(rows: list[Row], step_ips: float) -> list[list[str]]:
    """The table's cells: each case's rates and its input time as a share of the step's."""
    cells = []
    for r in rows:
        share = "–"
        if r.pipeline_ips is not None and not r.note:
            share = f"{100 * step_ips / r.pipeline_ips:.2g} %"
        cells.append([r.case, fmt_ips(r.loader_ips), fmt_ips(r.pipeline_ips), share])
    return cells


def render(args, device, dtype, folder, n_files, rows, step_ips, load_before, wall) -> str:
    bs = args.batch_size
    step_ms = 1000 * bs / step_ips
    header = ["case", "loader alone (img/s)", "loader + augmentation (img/s)", "input / step"]
    lines = [
        f"# Input pipeline throughput ({device.type.upper()})",
        "",
        f"Measured {datetime.now():%Y-%m-%d %H:%M} by `python scripts/bench_data.py "
        f"--device {device.type}` in {wall / 60:.1f} min (method: the script's docstring).",
        "",
        *bench.machine_lines(device.type),
        f"- kornia {augment.kornia.__version__}, Pillow {data.folders.Image.__version__}",
        *bench.load_lines(load_before),
        "",
        f"Data: {n_files:,} JPEG files in `{folder.name}` ({folder}), load size "
        f"{args.load_size} px; batch {bs}; recipe `{args.recipe}`, two views of "
        f"{args.load_size} px in {str(dtype).removeprefix('torch.')}.",
        "",
        f"Reference: one ResNet-18 (CIFAR stem) + 2048-2048 projector training step on the "
        f"two views takes **{step_ms:.0f} ms** per batch ({step_ips:,.0f} images/s).",
        "",
        *bench.markdown_table(header, table_rows(rows, step_ips), "lrrr"),
        "",
        '"input / step" = time of the input pipeline per batch / time of the reference '
        f"training step per batch ({args.load_size} px). The build row is the decoding "
        "throughput of the one-time pass.",
    ]
    if device.type != "cuda":
        lines.append(
            "The `gpu cache` row, and views of 224 px, are measured with `--device cuda` only "
            "(`docs/benchmarks/data_cuda.md`)."
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
