"""Input checks shared by the objectives: one-line errors at the boundary."""

from __future__ import annotations

import torch
from torch import Tensor


def check_views(z1: Tensor, z2: Tensor) -> None:
    """The two views' projector outputs must be floating (n, q) tensors of the same shape."""
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(
            "expected the two views' embeddings as two (n, q) tensors of the same shape, "
            f"got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if not (z1.is_floating_point() and z2.is_floating_point()):
        raise TypeError(f"embeddings must be floating-point tensors, got {z1.dtype}, {z2.dtype}")


def fp32(z: Tensor) -> Tensor:
    """z in float32 for the loss (float64 stays float64, for tests against references)."""
    return z if z.dtype in (torch.float32, torch.float64) else z.float()
