"""Input checks shared by the objectives: one-line errors at the boundary."""

from __future__ import annotations

import torch
from torch import Tensor


def check_views(*views: Tensor) -> None:
    """The views' projector outputs must be floating (n, q) tensors of one shape, two or more."""
    shapes = [tuple(v.shape) for v in views]
    if len(views) < 2 or views[0].dim() != 2 or len(set(shapes)) != 1:
        raise ValueError(
            "expected the views' embeddings as two or more (n, q) tensors of the same shape, "
            f"got {', '.join(map(str, shapes)) or 'none'}"
        )
    if not all(v.is_floating_point() for v in views):
        dtypes = ", ".join(str(v.dtype) for v in views)
        raise TypeError(f"embeddings must be floating-point tensors, got {dtypes}")


def fp32(z: Tensor) -> Tensor:
    """z in float32 for the loss (float64 stays float64, for tests against references)."""
    return z if z.dtype in (torch.float32, torch.float64) else z.float()
