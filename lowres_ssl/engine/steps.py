"""One optimizer step, as a unit the training loop calls: views in, the global loss out.

A step function is called as ``step(model, objective, views, accelerator=…, optimizer=…)`` and
returns a :class:`StepResult`: the plain step (every view in one pass), the embedding cache
(the full-batch regulariser with the network in micro-batches) and plain gradient accumulation
(another objective for batch-statistic losses).

``views`` is what :meth:`lowres_ssl.augment.ViewAugment.plan` returns (the batch's uint8
images and drawn parameters; a step computes the views of the parts it runs, so the embedding
cache never holds the views of the whole batch), or a list of view tensors (held views). Two
views or multi-crop: the steps take all of them, run them through the network in the groups
of :func:`lowres_ssl.augment.forward_groups` (each large view alone, the small crops together)
and call ``objective(*embeddings)``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lowres_ssl.augment import PlannedViews, forward_groups
from lowres_ssl.models import BatchNormStatistics, frozen_bn_statistics

Views = PlannedViews | list[Tensor]


@dataclass
class StepResult:
    """What a step did: the global loss (mean over processes), its terms (detached tensors of
    this process), whether the loss was finite, and whether the fp16 loss scaler skipped the
    update (the gradients overflowed). A step with a non-finite loss or a skipped update is
    thrown away: the parameters did not move, and BatchNorm's running statistics are as they
    were before it."""

    loss: float
    terms: dict[str, Tensor]
    finite: bool
    scaler_skipped: bool = False

    @property
    def applied(self) -> bool:
        """Whether the step updated the model."""
        return self.finite and not self.scaler_skipped


def apply_update(optimizer) -> bool:
    """The optimizer's step on the gradients, then zeroed; whether the fp16 loss scaler
    skipped it (the ``step_was_skipped`` of Accelerate's optimizer wrapper, this optimizer's
    own: the scaled gradients overflowed, the scale is lowered and the parameters did not
    move; a bare torch optimizer has no scaler)."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return bool(getattr(optimizer, "step_was_skipped", False))


def thrown_away(result: StepResult, statistics: BatchNormStatistics) -> StepResult:
    """``result``; where the step was thrown away, BatchNorm's statistics put back first."""
    if not result.applied:
        statistics.restore()
    return result


def global_mean(accelerator, value: Tensor) -> float:
    """The mean of a scalar over all processes (the value itself with one)."""
    value = value.detach().float().reshape(1)
    if accelerator.num_processes > 1:
        value = accelerator.reduce(value, reduction="mean")
    return value.item()


def even_parts(n: int, count: int) -> list[slice]:
    """``count`` consecutive slices of ``range(n)`` whose sizes differ by at most one."""
    bounds = [n * i // count for i in range(count + 1)]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def take_views(views: Views, part: slice | None = None) -> list[Tensor]:
    """Every view of the images ``part`` (all with ``None``), computed now if planned."""
    if isinstance(views, PlannedViews):
        return views.take(part)
    return [v if part is None else v[part] for v in views]


def _batch_size(views: Views) -> int:
    return len(views) if isinstance(views, PlannedViews) else views[0].shape[0]


def view_groups(views: Views) -> list[list[int]]:
    """The views that go through the network together (each large view alone, the small
    crops in one pass)."""
    if isinstance(views, PlannedViews):
        return views.augment.groups
    return forward_groups([v.shape[-1] for v in views])


def embed(model: torch.nn.Module, views: list[Tensor], groups: list[list[int]]) -> list[Tensor]:
    """The embedding of every view, in order: each group of views through ``model`` in one
    pass (a group of one is the view itself, not a copy)."""
    out: list[Tensor | None] = [None] * len(views)
    for group in groups:
        if len(group) == 1:
            out[group[0]] = model(views[group[0]])
            continue
        z = model(torch.cat([views[i] for i in group]))
        for i, chunk in zip(group, z.chunk(len(group)), strict=True):
            out[i] = chunk
    return out  # type: ignore[return-value]


def one_pass_step(
    model: torch.nn.Module,
    objective: torch.nn.Module,
    views: Views,
    *,
    accelerator,
    optimizer,
) -> StepResult:
    """Every view through the model under autocast, the objective in fp32, backward and step.

    The global loss is the mean of the processes' losses; a non-finite one on any process makes
    it non-finite, so all processes skip the step together.
    """
    statistics = BatchNormStatistics(model)
    with accelerator.autocast():
        z = embed(model, take_views(views), view_groups(views))
    loss = objective(*z)
    result = update_from_loss(loss, objective, accelerator=accelerator, optimizer=optimizer)
    return thrown_away(result, statistics)


def update_from_loss(loss: Tensor, objective, *, accelerator, optimizer) -> StepResult:
    """Backward and the optimizer's update from a whole batch's loss, unless the global loss is
    non-finite (then the gradients are cleared and nothing is applied): the tail of every
    one-pass step."""
    value = global_mean(accelerator, loss)
    finite, skipped = math.isfinite(value), False
    if finite:
        accelerator.backward(loss)
        skipped = apply_update(optimizer)
    else:
        optimizer.zero_grad(set_to_none=True)
    return StepResult(value, dict(getattr(objective, "terms", {})), finite, skipped)


def embedding_cache_step(
    model: torch.nn.Module,
    objective: torch.nn.Module,
    views: Views,
    *,
    accelerator,
    optimizer,
    micro_batch_size: int,
) -> StepResult:
    """The full-batch objective with the network run in micro-batches (the embedding cache).

    1. Every micro-batch of every view through the model without autograd; the embeddings are
       kept (BatchNorm's running statistics are updated here, once per micro-batch). Planned
       views are computed per micro-batch, here and again in 3: only a micro-batch's views are
       ever in memory (``docs/benchmarks/step.md`` measures what that costs).
    2. The objective on the whole batch in fp32 (gathered across processes inside it) and its
       gradient g = ∂L/∂z; a non-finite loss skips the step on every process.
    3. Each micro-batch through the model again, with autograd and BatchNorm's running
       statistics frozen, and backward of ⟨z_micro, g_micro⟩: its parameter gradient is the
       micro-batch's share of ∂L/∂θ. Gradients are synchronised across processes on the last
       micro-batch only. The fp16 loss scaler scales this surrogate like any loss.

    BatchNorm normalises each micro-batch with its own statistics, as on several GPUs without
    SyncBN; with a model without BatchNorm the gradient is the whole batch's. With
    ``micro_batch_size`` at least the batch, this is :func:`one_pass_step` itself. Multi-crop:
    a micro-batch is all views of its images (the small crops too), and the objective sees
    every view of the whole batch.
    """
    n = _batch_size(views)
    if micro_batch_size >= n:
        return one_pass_step(model, objective, views, accelerator=accelerator, optimizer=optimizer)
    # As equal as possible, none larger than asked: a batch of 7 (a bad file dropped) in
    # micro-batches of 3 runs as 2 + 2 + 3, never leaving BatchNorm a micro-batch of one.
    parts = even_parts(n, -(-n // micro_batch_size))
    groups = view_groups(views)
    statistics = BatchNormStatistics(model)
    cached: list[list[Tensor]] = [[] for _ in range(sum(map(len, groups)))]
    with torch.no_grad(), accelerator.autocast():
        for p in parts:
            for out, z in zip(cached, embed(model, take_views(views, p), groups), strict=True):
                out.append(z)
    zs = [torch.cat(z).float().requires_grad_() for z in cached]
    loss = objective(*zs)
    value = global_mean(accelerator, loss)
    terms = dict(getattr(objective, "terms", {}))
    if not math.isfinite(value):
        optimizer.zero_grad(set_to_none=True)
        return thrown_away(StepResult(value, terms, False), statistics)
    grads = torch.autograd.grad(loss, zs)
    last = len(parts) - 1
    with frozen_bn_statistics(model):
        for i, p in enumerate(parts):
            sync = contextlib.nullcontext() if i == last else accelerator.no_sync(model)
            with sync:
                with accelerator.autocast():
                    out = embed(model, take_views(views, p), groups)
                surrogate = sum((z.float() * g[p]).sum() for z, g in zip(out, grads, strict=True))
                accelerator.backward(surrogate)
    skipped = apply_update(optimizer)
    return thrown_away(StepResult(value, terms, True, skipped), statistics)


@dataclass
class LabeledViews:
    """One view per image (planned, or a tensor) and the images' class labels."""

    views: PlannedViews | Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def take(self, part: slice) -> Tensor:
        if isinstance(self.views, PlannedViews):
            return self.views.take(part, 1)[0]
        return self.views[part]

    def sample_input(self, n: int) -> Tensor:
        """The view of the first ``n`` images (at most), as the model takes them."""
        return self.take(slice(0, min(len(self), n)))


def supervised_step(
    model: torch.nn.Module,
    objective: torch.nn.Module,
    views: LabeledViews,
    *,
    accelerator,
    optimizer,
    micro_batch_size: int | None = None,
) -> StepResult:
    """Cross-entropy on one view per image, backward and step (supervised fine-tuning).

    The loss is a mean over images, so micro-batches (``micro_batch_size`` below the batch)
    give the whole batch's gradient: each part's loss is weighted by its share of the batch
    and the gradients add up, synchronised across processes on the last part. BatchNorm
    normalises each micro-batch with its own statistics. A non-finite loss on any process or
    part skips the step on every process. Terms: ``ce`` and ``train_top1`` (this process).
    """
    n = len(views)
    count = 1 if not micro_batch_size or micro_batch_size >= n else -(-n // micro_batch_size)
    parts = even_parts(n, count)
    statistics = BatchNormStatistics(model)
    loss_sum = torch.zeros((), device=views.labels.device)
    correct = torch.zeros((), device=views.labels.device)
    values = []
    for i, p in enumerate(parts):
        sync = contextlib.nullcontext() if i == len(parts) - 1 else accelerator.no_sync(model)
        with sync:
            x, y = views.take(p), views.labels[p]
            with accelerator.autocast():
                logits = model(x)
            loss = objective(logits.float(), y)
            value = global_mean(accelerator, loss)
            if not math.isfinite(value):
                optimizer.zero_grad(set_to_none=True)
                return thrown_away(StepResult(value, {"ce": loss.detach()}, False), statistics)
            share = (p.stop - p.start) / n
            values.append(value * share)
            accelerator.backward(loss * share)
            loss_sum += loss.detach() * share
            correct += (logits.detach().argmax(1) == y).sum()
    skipped = apply_update(optimizer)
    terms = {"ce": loss_sum, "train_top1": correct / n}
    return thrown_away(StepResult(sum(values), terms, True, skipped), statistics)


def accumulation_step(
    model: torch.nn.Module,
    objective: torch.nn.Module,
    views: Views,
    *,
    accelerator,
    optimizer,
    accumulate_steps: int,
) -> StepResult:
    """Plain gradient accumulation: the batch in ``accumulate_steps`` parts, each with its own
    loss, the mean of their gradients applied in one optimizer step.

    This is **another objective** for a loss that is a statistic of the batch: SFRIK's MMD (and
    VICReg's covariance, SimCLR's negatives) is then computed on each part, a smaller batch,
    not on the whole one. :func:`embedding_cache_step` keeps the whole batch's objective.
    """
    n = _batch_size(views)
    parts = even_parts(n, min(accumulate_steps, n))
    groups = view_groups(views)
    statistics = BatchNormStatistics(model)
    losses, terms = [], {}
    for i, p in enumerate(parts):
        sync = contextlib.nullcontext() if i == len(parts) - 1 else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                z = embed(model, take_views(views, p), groups)
            loss = objective(*z)
            value = global_mean(accelerator, loss)
            losses.append(value)
            part_terms = getattr(objective, "terms", {})
            for k, v in part_terms.items():
                terms[k] = terms.get(k, 0) + v.detach() / len(parts)
            if not math.isfinite(value):
                optimizer.zero_grad(set_to_none=True)
                return thrown_away(StepResult(value, terms, False), statistics)
            accelerator.backward(loss / len(parts))
    skipped = apply_update(optimizer)
    return thrown_away(StepResult(sum(losses) / len(losses), terms, True, skipped), statistics)


__all__ = [
    "LabeledViews",
    "StepResult",
    "Views",
    "accumulation_step",
    "apply_update",
    "embed",
    "embedding_cache_step",
    "global_mean",
    "one_pass_step",
    "supervised_step",
    "take_views",
    "thrown_away",
    "update_from_loss",
    "view_groups",
]
