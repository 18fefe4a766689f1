"""Where and how a frozen network runs for inference: the device, the precision, the network
on that device in eval mode, batching and the feature cache.

Evaluation (:mod:`lowres_ssl.eval.evaluate`), the explorer, predictions and the benchmark
scripts choose their device with :func:`pick_device` and their precision with
:func:`pick_precision`, and carry both in one :class:`InferenceContext`:

>>> context = InferenceContext.choose("auto", "auto", batch_size=128)  # doctest: +SKIP
>>> net = context.prepare(backbone)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowres_ssl.config import PRECISIONS
from lowres_ssl.device import cuda_index, cuda_mixed_precision
from lowres_ssl.errors import UserError

#: The autocast type of each 16-bit precision (fp32 runs without autocast).
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str = "auto", flag: str = "--device") -> torch.device:
    """The device of a ``--device`` choice: ``auto`` (CUDA where a GPU is visible, else the
    CPU), ``cpu``, ``cuda`` or ``cuda:N``. A device this machine lacks, or a name that is
    none of these, is a one-line :class:`UserError` naming the fix (``flag`` names the
    option in it)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(name)
    except (RuntimeError, TypeError):
        chosen = None
    if chosen is None or chosen.type not in ("cpu", "cuda"):
        raise UserError(f"{flag} {name}: choose auto, cpu, cuda or cuda:N (N: a GPU's number)")
    if chosen.type == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UserError(f"{flag} {name}: no CUDA GPU is available; use {flag} cpu")
    if cuda_index(chosen) >= count:
        raise UserError(
            f"{flag} {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}; "
            f"use one of those, or {flag} cuda"
        )
    return chosen


def pick_precision(
    setting: str, device: torch.device, trained: dict[str, Any] | None = None
) -> str:
    """fp32, bf16 or fp16 for a network's forward passes on ``device``. ``auto``: on a GPU the
    precision the network was trained in (``trained``: its run's saved config, whose
    ``train.precision: auto`` is bf16 from compute capability 8.0, else fp16), fp32 on the
    CPU. fp16 on the CPU, or a name that is none of :data:`lowres_ssl.config.PRECISIONS`, is
    a one-line :class:`UserError`."""
    if setting not in PRECISIONS:
        raise UserError(f"--precision {setting}: choose one of {', '.join(PRECISIONS)}")
    if setting == "auto":
        if device.type != "cuda":
            return "fp32"
        used = ((trained or {}).get("train") or {}).get("precision", "auto")
        if used in AUTOCAST_DTYPES or used == "fp32":
            return used
        return cuda_mixed_precision(device)
    if setting == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA GPU; on the CPU use fp32 or bf16")
    return setting


@dataclass(frozen=True)
class InferenceContext:
    """How a frozen network runs: where, in what precision, in what memory format, in batches
    of what size, and where its features are cached."""

    device: torch.device
    precision: str = "fp32"  # fp32, bf16 or fp16: resolved (:func:`pick_precision`)
    batch_size: int = 256
    # channels_last: faster convolutions on GPUs and on the CPU (measured: 1.2x on 2 cores)
    channels_last: bool = True
    cache_dir: str | Path | None = None  # the feature and decoded-image caches (None: default)
    use_cache: bool = True  # read and write the feature cache
    num_workers: int | None = None  # decoding processes
    progress: bool = False

    @classmethod
    def choose(
        cls,
        device: str = "auto",
        precision: str = "auto",
        trained: dict[str, Any] | None = None,
        **settings: Any,
    ) -> InferenceContext:
        """The context of a ``--device`` and a ``--precision`` choice (``trained``: the saved
        config of the network's run, see :func:`pick_precision`); ``settings``: the other
        fields."""
        chosen = pick_device(device)
        return cls(chosen, pick_precision(precision, chosen, trained), **settings)

    def prepare(self, net: nn.Module) -> nn.Module:
        """``net`` on this device (in channels_last where set) in eval mode."""
        if self.channels_last:
            net = net.to(self.device, memory_format=torch.channels_last)
        else:
            net = net.to(self.device)
        return net.eval()

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context of each forward pass: autocast to the precision (none for fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])


__all__ = ["AUTOCAST_DTYPES", "InferenceContext", "pick_device", "pick_precision"]
