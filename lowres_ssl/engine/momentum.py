"""A memory of past embeddings for SFRIK's MMD, filled by the online encoder or a momentum
encoder (experimental: ``loss.memory``; the study of ``docs/benchmarks/photos.md``).

:class:`MemoryStep` is the plain step (every view in one pass) with one addition: the objective
(:class:`~lowres_ssl.losses.memory.MemorySFRIKLoss`) also sees the memory, and after an applied
update the memory takes this batch's embeddings of the regularised views: the online encoder's,
detached (``loss.memory_momentum: null``), or those of a momentum encoder, an exponential moving
average of the online one's weights, θ' ← m·θ' + (1 − m)·θ after each update (MoCo v2).
The batch's own embeddings enter the memory after its loss, so a view never meets itself there.

Not yet saved with checkpoints (a resumed run starts with an empty memory) nor run on several
processes or with the embedding cache: those settings are a one-line error.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowres_ssl.engine.steps import (
    StepResult,
    Views,
    embed,
    take_views,
    thrown_away,
    update_from_loss,
    view_groups,
)
from lowres_ssl.errors import UserError
from lowres_ssl.models import BatchNormStatistics


class EmbeddingMemory:
    """The last ``size`` embeddings pushed, first in first out (a ring buffer)."""

    def __init__(self, size: int) -> None:
        if int(size) != size or size < 1:
            raise ValueError(f"a memory holds at least one embedding, got {size}")
        self.size = int(size)
        self._rows: Tensor | None = None
        self._next = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def push(self, z: Tensor) -> None:
        """Store the rows of ``z`` (detached), dropping the oldest beyond ``size``."""
        z = z.detach()
        if self._rows is None:
            self._rows = z.new_zeros(self.size, z.shape[1])
        z = z[-self.size :]
        index = (self._next + torch.arange(z.shape[0], device=z.device)) % self.size
        self._rows[index] = z.to(self._rows.dtype)
        self._next = (self._next + z.shape[0]) % self.size
        self._count = min(self.size, self._count + z.shape[0])

    def contents(self) -> Tensor | None:
        """The stored rows (any order: the MMD does not depend on it), or None when empty."""
        if self._rows is None or not self._count:
            return None
        return self._rows[: self._count]


class MomentumEncoder:
    """An exponential moving average of a model's weights (its buffers copied), in training mode
    without gradients."""

    def __init__(self, model: nn.Module, momentum: float) -> None:
        if not 0 <= momentum < 1 or math.isnan(momentum):
            raise ValueError(f"loss.memory_momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.model = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def follow(self, model: nn.Module) -> None:
        """θ' ← m·θ' + (1 − m)·θ; buffers (BatchNorm's statistics) copied."""
        for mine, theirs in zip(self.model.parameters(), model.parameters(), strict=True):
            mine.mul_(self.momentum).add_(theirs.detach(), alpha=1 - self.momentum)
        for mine, theirs in zip(self.model.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)


class MemoryStep:
    """The plain step with SFRIK's MMD over the batch and a memory (module doc)."""

    def __init__(self, size: int, momentum: float | None) -> None:
        self.memory = EmbeddingMemory(size)
        self.momentum = momentum
        self.encoder: MomentumEncoder | None = None

    def __call__(
        self, model: nn.Module, objective: nn.Module, views: Views, *, accelerator, optimizer
    ) -> StepResult:
        if accelerator.num_processes > 1:
            raise UserError(
                "config key loss.memory is experimental and runs on one process; launch one "
                "process or set loss.memory=0"
            )
        statistics = BatchNormStatistics(model)
        taken, groups = take_views(views), view_groups(views)
        with accelerator.autocast():
            z = embed(model, taken, groups)
        loss = objective(*z, memory=self.memory.contents())
        result = update_from_loss(loss, objective, accelerator=accelerator, optimizer=optimizer)
        if result.applied:
            regularised = objective.layout.regularised
            self.memory.push(self._keys(accelerator, model, taken, groups, z, regularised))
        return thrown_away(result, statistics)

    def _keys(self, accelerator, model, taken, groups, z, regularised) -> Tensor:
        """The embeddings that enter the memory: the momentum encoder's (after its update) or
        the online encoder's, detached; normalised, float32."""
        if self.momentum is None:
            keys = [z[v] for v in regularised]
        else:
            online = accelerator.unwrap_model(model)
            if self.encoder is None:
                self.encoder = MomentumEncoder(online, self.momentum)
            else:
                self.encoder.follow(online)
            with torch.no_grad(), accelerator.autocast():
                alone = [[i] for i in range(len(regularised))]
                keys = embed(self.encoder.model, [taken[v] for v in regularised], alone)
        return F.normalize(torch.cat(keys).detach().float(), dim=1)


__all__ = ["EmbeddingMemory", "MemoryStep", "MomentumEncoder"]
