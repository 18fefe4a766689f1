"""Batch statistics over all processes: gather embeddings with gradients flowing back.

Under ``torch.distributed`` with W processes, each process computes the regulariser on the
embeddings of all processes. The backward of the gather sums the incoming gradients over the
processes and keeps this process's rows, so each process receives the gradient of Σ_r L_r.
With every L_r = (local mean term) + (global term), the W-average that DistributedDataParallel
applies to parameter gradients then equals the gradient of the one-process loss on the
concatenated batch. Local batches may differ in size (a short last batch); then the one-process
loss is Σ_r (n_r/N)·L_r rather than the plain mean over processes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Number of processes in the default group (1 when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (n_r × …) from every process along dim 0, differentiably.

    Returns ``x`` itself with one process. Every process must call it (a collective).
    """
    return gather_with_offset(x)[0]


def gather_with_offset(x: Tensor) -> tuple[Tensor, int]:
    """:func:`gather_with_grad`, plus the index of this process's first row in the result."""
    size = world_size()
    if size == 1:
        return x, 0
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    counts = [int(c.item()) for c in counts]
    return _GatherWithGrad.apply(x, counts), sum(counts[: dist.get_rank()])


def gather_views(*views: Tensor) -> tuple[Tensor, ...]:
    """Every view's (n_r × q) embeddings from every process, in one collective.

    Returns (all of view 1, all of view 2, …, index of this process's first row in them); with
    one process, the views themselves and 0, with no copy. The views share n_r.
    """
    if world_size() == 1:
        return (*views, 0)
    both, offset = gather_with_offset(torch.cat(views, dim=1))
    return (*both.split([v.shape[1] for v in views], dim=1), offset)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, counts: list[int]) -> Tensor:
        x = x.contiguous()
        longest = max(counts)
        padded = x
        if x.shape[0] < longest:  # all_gather needs equal shapes
            padded = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        rank = dist.get_rank()
        ctx.start, ctx.stop = sum(counts[:rank]), sum(counts[: rank + 1])
        return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.stop], None
