"""The device a run trains on: mixed precision for it, and its peak memory for the logs."""

from __future__ import annotations

import os

import torch

from lowres_ssl.errors import UserError

#: Accelerate's mixed-precision names → the dtype the network runs in.
MIXED_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cuda_mixed_precision(device: torch.device | int | None = None) -> str:
    """bf16 on GPUs of compute capability ≥ 8.0, fp16 (with loss scaling) below."""
    return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"


def resolve_precision(setting: str) -> str:
    """Accelerate's mixed-precision name for the config's ``train.precision``.

    ``auto``: the mixed precision ``accelerate launch --mixed_precision`` (or ``accelerate
    config``) asked for; else bf16 on GPUs of compute capability ≥ 8.0, fp16 (with loss
    scaling) below, fp32 on the CPU. The launcher exports "no" when nothing was asked for, so
    "no" from it counts as no choice: fp32 is ``train.precision: fp32``. This checks the
    hardware (fp16 needs CUDA), so it runs when training starts, not when a config is read.
    """
    cuda = torch.cuda.is_available()
    if setting != "auto":
        chosen = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[setting]
    else:
        chosen = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if chosen == "no" and cuda:
            chosen = cuda_mixed_precision()
    if chosen == "fp16" and not cuda:
        raise UserError(
            "fp16 mixed precision needs a CUDA GPU; on the CPU use train.precision=fp32 (or bf16)"
        )
    return chosen


def peak_memory_gib(device: torch.device) -> dict[str, float]:
    """Peak GPU memory (allocated, reserved) or, on the CPU, the process's peak RSS, in GiB."""
    if device.type == "cuda":
        return {
            "gpu_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "gpu_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    try:
        import resource  # POSIX only
    except ImportError:
        return {}
    return {"cpu_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


__all__ = ["MIXED_DTYPES", "cuda_mixed_precision", "peak_memory_gib", "resolve_precision"]
