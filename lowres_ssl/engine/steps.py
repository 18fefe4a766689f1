"""One optimizer step, as a unit the training loop calls: views in, the global loss out.

A step function is called as ``step(model, objective, views, accelerator=…, optimizer=…)`` and
returns a :class:`StepResult`. The plain two-view step is here; a step that computes the
full-batch regulariser in micro-batches (the embedding cache) is called the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class StepResult:
    """What a step did: the global loss (mean over processes), its terms (detached tensors of
    this process), and whether the loss was finite (if not, the parameters did not move)."""

    loss: float
    terms: dict[str, Tensor]
    finite: bool


def global_mean(accelerator, value: Tensor) -> float:
    """The mean of a scalar over all processes (the value itself with one)."""
    value = value.detach().float().reshape(1)
    if accelerator.num_processes > 1:
        value = accelerator.reduce(value, reduction="mean")
    return value.item()


def two_view_step(
    model: torch.nn.Module,
    objective: torch.nn.Module,
    views: list[Tensor],
    *,
    accelerator,
    optimizer,
) -> StepResult:
    """Both views through the model under autocast, the objective in fp32, backward and step.

    The global loss is the mean of the processes' losses; a non-finite one on any process makes
    it non-finite, so all processes skip the step together.
    """
    with accelerator.autocast():
        z1, z2 = model(views[0]), model(views[1])
    loss = objective(z1, z2)
    value = global_mean(accelerator, loss)
    finite = math.isfinite(value)
    if finite:
        accelerator.backward(loss)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(value, dict(getattr(objective, "terms", {})), finite)


__all__ = ["StepResult", "global_mean", "two_view_step"]
