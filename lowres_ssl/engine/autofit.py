"""``--autofit``: a few real training steps before the run, lowering the micro-batch on
out-of-memory until they fit (the regulariser's batch never changes).

The estimator (:mod:`lowres_ssl.memory`) sizes the micro-batch from a model of the memory;
autofit checks it on the card itself, the first optimizer step (which allocates the optimizer
state) included. The probe leaves no trace: the weights, BatchNorm statistics, the optimizer
state and the fp16 loss scale are restored afterwards, and its random numbers (the task's probe
batch and its views) come from its own generator (:data:`PROBE_SEED`), so a run with
``--autofit`` trains exactly as one started with the micro-batch it chose.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch

from lowres_ssl.errors import UserError

log = logging.getLogger("lowres_ssl")

#: Real steps per trial: the first allocates the optimizer state, the second runs with it.
PROBE_STEPS = 2
#: The seed of the probe's own generator (the probe batch and its views).
PROBE_SEED = 2**31 - 1


def smaller_micro_batch(micro: int) -> int:
    """The next micro-batch to try: the power of two below (a non-power first drops to one)."""
    p = 1 << (micro.bit_length() - 1)
    return p if p < micro else micro // 2


def autofit(
    make_step: Callable[[int], Callable],
    model: torch.nn.Module,
    objective: torch.nn.Module,
    probe_views: Callable[[], object],
    *,
    accelerator,
    optimizer,
    batch_size: int,
    micro_batch_size: int,
    steps: int = PROBE_STEPS,
) -> int:
    """The largest micro-batch, from ``micro_batch_size`` down by halves, with which ``steps``
    real steps on the task's probe batch (``probe_views()``: a step's input from a random
    batch of ``batch_size`` images, as the task makes it from a loaded batch) run without
    running out of memory. ``make_step(micro)`` returns the step function for ``micro``.
    Raises :class:`UserError` when not even a micro-batch of 1 fits."""
    device = accelerator.device
    unwrapped = accelerator.unwrap_model(model)
    weights = {k: v.detach().to("cpu", copy=True) for k, v in unwrapped.state_dict().items()}
    state = copy.deepcopy(optimizer.state_dict())
    scaler = getattr(accelerator, "scaler", None)
    scale = copy.deepcopy(scaler.state_dict()) if scaler is not None else None
    micro = micro_batch_size
    while True:
        try:
            step = make_step(micro)
            for _ in range(steps):
                views = probe_views()
                step(model, objective, views, accelerator=accelerator, optimizer=optimizer)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            break
        except torch.cuda.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            if micro <= 1:
                raise UserError(
                    f"--autofit: even a micro-batch of 1 runs out of memory at batch {batch_size}"
                    ": the model, optimizer state and loss alone do not fit; try a smaller "
                    "model.projector or train.batch_size, or a smaller --preset"
                ) from None
        # Out of the except block, so the failed attempt's tensors are freed before the next.
        if device.type == "cuda":
            torch.cuda.empty_cache()
        smaller = smaller_micro_batch(micro)
        log.info("--autofit: micro-batch %d ran out of memory; trying %d", micro, smaller)
        micro = smaller
    peak = (
        f", peak {torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB reserved"
        if device.type == "cuda"
        else ""
    )
    unwrapped.load_state_dict(weights)
    optimizer.load_state_dict(state)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.load_state_dict(scale)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log.info(
        "--autofit: micro-batch %d fits (batch %d, %d real steps%s)", micro, batch_size, steps, peak
    )
    return micro


__all__ = ["PROBE_SEED", "PROBE_STEPS", "autofit", "smaller_micro_batch"]
