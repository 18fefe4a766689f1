"""What the benchmark scripts share (``scripts/bench_*``): the machine their reports name, and
the rig that runs one real training step of a :class:`lowres_ssl.memory.Setting`.

Figures are only comparable on the same machine, and CPU timings only on a quiet one, so every
report names the processor, the GPU, the versions and the load before the run.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lowres_ssl.device import available_cores


def meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB (empty where there is no /proc)."""
    try:
        with open("/proc/meminfo") as f:
            return {line.split(":")[0]: int(line.split()[1]) for line in f}
    except OSError:
        return {}


def proc_status_bytes(key: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak since the last :func:`reset_peak_rss`)
    of this process, from ``/proc/self/status`` (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current RSS. (``ru_maxrss`` is no use in a benchmark's child
    process: Linux carries it over ``fork`` + ``exec``, so the child reports its parent's
    peak if that was higher.)"""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@dataclass
class StepRig:
    """One real training step of a setting, ready to run: the engine's own step, model,
    optimizer (prepared by Accelerate), objective and augmentation, on a random uint8 batch."""

    setting: Any  # lowres_ssl.memory.Setting
    accelerator: Any
    model: torch.nn.Module
    optimizer: Any
    objective: torch.nn.Module
    augment: torch.nn.Module
    images: torch.Tensor
    generator: torch.Generator
    step: Callable

    @property
    def cuda(self) -> bool:
        return self.accelerator.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def run(self, *, held_views: bool = False) -> float:
        """One step (augmentation included); its wall time in seconds. ``held_views``: the
        whole batch's views computed first and kept, instead of per micro-batch."""
        self.sync()
        start = time.perf_counter()
        views = self.augment.plan(self.images, generator=self.generator)
        if held_views:
            views = views.take(None, 2)
        self.step(self.model, self.objective, views, accelerator=self.accelerator,
                  optimizer=self.optimizer)  # fmt: skip
        self.sync()
        return time.perf_counter() - start

    def reset_peak(self) -> float:
        """Start counting the peak; returns the memory in use now (GiB; 0 on CUDA, whose peak
        statistics count from zero)."""
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return 0.0
        reset_peak_rss()
        return proc_status_bytes("VmRSS") / 2**30

    def peak(self) -> dict[str, float]:
        """The peak since :meth:`reset_peak`: CUDA allocated and reserved, or the CPU's RSS."""
        if self.cuda:
            return {
                "allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            }
        return {"rss_gib": proc_status_bytes("VmHWM") / 2**30}


def step_rig(setting, *, load_side: int | None = None, seed: int = 0) -> StepRig:
    """A :class:`StepRig` for ``setting``: on CUDA when ``setting.cuda`` (an emulated card,
    ``LOWRES_SSL_GPU_GIB``, is capped first), bf16/fp16 autocast when ``setting.mixed``; the
    ``cifar`` recipe up to 64 px, ``vicreg`` above; images of ``load_side`` px (default the
    setting's ``load_size``)."""
    from accelerate import Accelerator

    from lowres_ssl.augment import build_augment
    from lowres_ssl.device import MIXED_DTYPES, card_memory_gib, cuda_mixed_precision
    from lowres_ssl.engine.steps import embedding_cache_step, two_view_step
    from lowres_ssl.losses import objective_from_settings
    from lowres_ssl.models import build_model
    from lowres_ssl.optim import build_optimizer

    s = setting
    precision = "no"
    if s.cuda:
        card_memory_gib(0)
        precision = cuda_mixed_precision() if s.mixed else "no"
    accelerator = Accelerator(mixed_precision=precision, cpu=not s.cuda)
    device = accelerator.device
    torch.manual_seed(seed)
    model = build_model(
        s.backbone, s.projector, image_size=s.view_size, grad_checkpointing=s.checkpointing
    )
    if s.cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(
        s.optimizer, model, lr=0.1, weight_decay=1e-6, state_bits=s.state_bits
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    objective = objective_from_settings("sfrik", lam=None, kernel_weights=[1.0, 40.0, 40.0])
    recipe = "cifar" if s.view_size <= 64 else "vicreg"
    augment = build_augment(
        recipe, s.view_size, out_dtype=MIXED_DTYPES[precision], channels_last=s.cuda
    ).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    side = load_side or s.load_size
    images = torch.randint(0, 256, (s.batch_size, 3, side, side), dtype=torch.uint8, generator=g)
    step = two_view_step
    if s.micro < s.batch_size:
        step = functools.partial(embedding_cache_step, micro_batch_size=s.micro)
    return StepRig(s, accelerator, model, optimizer, objective, augment, images.to(device), g, step)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def load_lines(before: float | None) -> list[str]:
    """The 1-minute load average before the run (during it, it counts the run itself): other
    work on the machine skews the timings."""
    if before is None:
        return []
    cores = available_cores()
    lines = [f"- Load average (1 min) before the run: {before:.2f} on {cores} cores"]
    if before > 0.5 * cores:
        lines.append(
            f"- **Warning**: the machine was busy before the run started (load {before:.2f} on "
            f"{cores} cores): CPU timings are unreliable (threads wait for each other's cores)."
        )
    return lines


def machine_lines(device: str) -> list[str]:
    """Markdown bullet lines naming the CPU, the GPU (for ``device == "cuda"``) and versions."""
    ram = meminfo().get("MemTotal", 0) / 2**20
    lines = [
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores ({available_cores()} usable, torch "
        f"threads: {torch.get_num_threads()}), {ram:.1f} GiB RAM",
    ]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        lines.append(
            f"- GPU: {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability "
            f"{props.major}.{props.minor}; CUDA {torch.version.cuda}; float32 matmul precision "
            f"{torch.get_float32_matmul_precision()!r} (TF32 "
            f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'})"
        )
    lines.append(
        f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.platform()}"
    )
    return lines
