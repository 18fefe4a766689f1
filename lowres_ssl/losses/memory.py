"""SFRIK's MMD over the batch and a memory of past embeddings (experimental: the study of
``docs/benchmarks/photos.md``; not yet saved with checkpoints nor run on several processes).

A small card's batch gives the MMD few points; a memory of the last M embeddings (detached,
from earlier steps: MoCo's queue applied to the kernel mean embedding) gives it more. With the
batch B (n rows) and the memory M (m rows), N = n + m, the MMD² of their union is

    MMD²(B ∪ M, U) = (1/N²)·(Σ_{B×B} ψ + 2·Σ_{B×M} ψ + Σ_{M×M} ψ) − b_0.

The memory carries no gradient, so Σ_{M×M} ψ is a constant and is left out; the rest is scaled
by N/n, so that each embedding's gradient keeps the size it has without a memory:

    R(B; M) = (1/(n·N))·(Σ_{B×B} ψ + 2·Σ_{B×M} ψ) − b_0·(n + 2m)/N,

which is MMD²(B, U) itself when the memory is empty. The gradient of R in z_i is
(2/n)·(1/N)·Σ_{x ∈ B ∪ M} ψ'(⟨z_i, x⟩)·x: the batch-only gradient's average over n points
taken over N. The memory is filled by :mod:`lowres_ssl.engine.momentum` (the online encoder's
embeddings, or a momentum encoder's: MoCo v2's answer to stale entries).
"""

from __future__ import annotations

from torch import Tensor

from .kernels import RotationInvariantKernel
from .sfrik import SFRIKLoss
from .views import mean_over


def mmd_with_memory(z: Tensor, memory: Tensor | None, kernel: RotationInvariantKernel) -> Tensor:
    """R(B; M) of the module doc: ``z`` (n, q) and ``memory`` (m, q), rows on the unit sphere;
    the memory is detached here. An empty or absent memory gives MMD²(z, U)."""
    n, dim = z.shape
    gram = z @ z.T
    total = kernel.value(gram, dim).sum()
    m = 0 if memory is None else memory.shape[0]
    if m:
        cross = z @ memory.detach().to(z.dtype).T
        total = total + 2 * kernel.value(cross, dim).sum()
    big_n = n + m
    return total / (n * big_n) - kernel.b0(dim) * (n + 2 * m) / big_n


class MemorySFRIKLoss(SFRIKLoss):
    """:class:`SFRIKLoss` whose MMD of each regularised view is R(view; memory) (module doc).

    Called as ``loss_fn(*views, memory=bank)`` with ``bank`` (m, q) normalised, detached
    embeddings of earlier steps (None or empty: exactly SFRIK). One process only: the memory
    is this process's.
    """

    def forward(self, *views: Tensor, memory: Tensor | None = None) -> Tensor:
        return self.loss_with(
            views,
            lambda z: mean_over(
                self.layout.regularised, lambda v: mmd_with_memory(z[v], memory, self.kernel)
            ),
        )


__all__ = ["MemorySFRIKLoss", "mmd_with_memory"]
