"""BatchNorm running statistics that a training step must not move twice, or at all: during
gradient checkpointing's recomputation of a stage, and in a step that is thrown away. Both
backbone kinds (:mod:`~lowres_ssl.models.backbones`, :mod:`~lowres_ssl.models.library`)
checkpoint their stages through :func:`recompute_contexts`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextlib.contextmanager
def frozen_bn_statistics(module: nn.Module) -> Iterator[None]:
    """Run ``module``'s BatchNorms in train mode without touching their running statistics.

    Sets every BatchNorm's ``momentum`` to 0.0, so the update r ← (1 − m)·r + m·batch_stat
    leaves r exactly as it was (this also covers ``momentum=None``: the cumulative average is
    only chosen when momentum is None), and puts back ``num_batches_tracked``, which BatchNorm
    increments regardless of the momentum. Both are restored on exit, also on an exception
    (non-reentrant checkpoint stops a recomputation early by raising one).
    """
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in norms]
    counts = [
        None if m.num_batches_tracked is None else m.num_batches_tracked.clone() for m in norms
    ]
    try:
        for m in norms:
            m.momentum = 0.0
        yield
    finally:
        for m, momentum, count in zip(norms, momenta, counts, strict=True):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def recompute_contexts(
    stage: nn.Module,
) -> tuple[contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]]:
    """``context_fn`` for checkpoint: a plain forward, and a recompute that freezes BN stats.

    The recomputation in backward runs the stage's BatchNorms in train mode a second time on
    the same input; without this they would fold the same batch statistics into the running
    averages twice. The recomputed outputs are unchanged (train-mode BN normalises with the
    batch statistics, not the running ones).
    """
    return contextlib.nullcontext(), frozen_bn_statistics(stage)


class BatchNormStatistics:
    """A copy of the running statistics of ``module``'s BatchNorms, taken when made, to put
    back with :meth:`restore`: a training step that is thrown away (a non-finite loss, an
    update the fp16 loss scaler skipped) has already folded its batch into them in its
    forward pass, and a NaN there would stay in every later evaluation."""

    def __init__(self, module: nn.Module) -> None:
        self.norms = [
            m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
        ]
        self.saved = [[b.clone() for b in self._statistics(m)] for m in self.norms]

    @staticmethod
    def _statistics(m: _BatchNorm) -> tuple[Tensor, Tensor, Tensor]:
        return m.running_mean, m.running_var, m.num_batches_tracked  # type: ignore[return-value]

    @torch.no_grad()
    def restore(self) -> None:
        for m, saved in zip(self.norms, self.saved, strict=True):
            for live, kept in zip(self._statistics(m), saved, strict=True):
                live.copy_(kept)


def has_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` has a BatchNorm (in either mode)."""
    return any(isinstance(m, _BatchNorm) for m in module.modules())


def normalises_batches(module: nn.Module) -> bool:
    """Whether a BatchNorm of ``module`` is in training mode: one image per batch is then an
    error (``BatchNorm1d`` has one value per channel), so micro-batches start at two."""
    return any(isinstance(m, _BatchNorm) and m.training for m in module.modules())


__all__ = [
    "BatchNormStatistics",
    "frozen_bn_statistics",
    "has_batchnorm",
    "normalises_batches",
    "recompute_contexts",
]
