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

from lowres_ssl.device import synchronize
from lowres_ssl.errors import UserError
from lowres_ssl.models import normalises_batches

log = logging.getLogger("lowres_ssl")

#: Real steps per trial: the first allocates the optimizer state, the second runs with it.
PROBE_STEPS = 2
#: Thrown-away probe steps (a non-finite loss, an update the fp16 loss scaler skipped while it
#: finds its scale: 2^16 down to 1 takes 16) a trial may take besides its real steps.
PROBE_SKIPS = 18
#: The seed of the probe's own generator (the probe batch and its views).
PROBE_SEED = 2**31 - 1


def smaller_micro_batch(micro: int) -> int:
    """The next micro-batch to try: the power of two below (a non-power first drops to one)."""
    p = 1 << (micro.bit_length() - 1)
    return p if p < micro else micro // 2


def forget_failed_step(accelerator, optimizer) -> None:
    """Undo what a step that raised half-way leaves behind, so the next one starts clean.

    ``GradScaler.step`` unscales the gradients (and marks the optimizer "unscaled") before
    the inner step; an out-of-memory there skips ``update()``, so the next step would skip the
    unscaling and apply gradients still multiplied by the scale (2^16). Accelerate's optimizer
    wrapper likewise keeps its patched ``step`` and its "step called" flag, which decides
    whether the next update counts as skipped. Neither library has a public reset: the
    attributes are checked by ``tests/engine/test_autofit.py`` against the installed versions.
    """
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        scaler._per_optimizer_states.clear()  # a defaultdict: the next step gets a fresh one
    original = getattr(optimizer, "_optimizer_original_step_method", None)
    if original is not None:
        optimizer.optimizer.step = original
        optimizer._accelerate_step_called = False
    optimizer.zero_grad(set_to_none=True)


def probe(step, model, objective, probe_views, *, accelerator, optimizer, steps: int) -> None:
    """``steps`` real steps on the probe batch: steps that were thrown away (their update not
    applied, so the optimizer state may not exist yet) do not count, and more than
    :data:`PROBE_SKIPS` of them in a row is a one-line error (the run would not train either)."""
    applied = skipped = 0
    while applied < steps:
        result = step(model, objective, probe_views(), accelerator=accelerator, optimizer=optimizer)
        if result.applied:
            applied, skipped = applied + 1, 0
            continue
        skipped += 1
        if skipped > PROBE_SKIPS:
            what = "loss is not finite" if not result.finite else "fp16 gradients overflow"
            raise UserError(
                f"--autofit: {skipped} probe steps in a row thrown away ({what}): the run would "
                "not train either; try a lower optim.base_lr, or train.precision=fp32 (or "
                "bf16 instead of fp16)"
            )


def _refuse_several_processes(accelerator) -> None:
    if accelerator.num_processes > 1:
        raise UserError(
            f"--autofit runs on one process, and this run has {accelerator.num_processes}: an "
            "out-of-memory on one would leave the others waiting in a collective. Fit on one "
            "GPU (python scripts/train.py ... --autofit; its log names the micro-batch) and "
            "pass --set train.micro_batch_size=M, or leave micro_batch_size at auto (the "
            "estimate counts every process)"
        )


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
    A model with BatchNorm in training mode stops at 2 (one image per batch is an error).
    Raises :class:`UserError` when not even the smallest fits, and with several processes."""
    _refuse_several_processes(accelerator)
    device = accelerator.device
    unwrapped = accelerator.unwrap_model(model)
    weights = {k: v.detach().to("cpu", copy=True) for k, v in unwrapped.state_dict().items()}
    state = copy.deepcopy(optimizer.state_dict())
    scaler = getattr(accelerator, "scaler", None)
    scale = copy.deepcopy(scaler.state_dict()) if scaler is not None else None
    smallest = 2 if normalises_batches(model) else 1
    micro = micro_batch_size
    while True:
        try:
            probe(
                make_step(micro), model, objective, probe_views,
                accelerator=accelerator, optimizer=optimizer, steps=steps,
            )  # fmt: skip
            synchronize(device)  # the trial's queued kernels finish inside the try
            break
        except torch.cuda.OutOfMemoryError:
            forget_failed_step(accelerator, optimizer)
            if micro <= smallest:
                raise UserError(
                    f"--autofit: even a micro-batch of {smallest} runs out of memory at batch "
                    f"{batch_size}: the model, optimizer state and loss alone do not fit; try a "
                    "smaller model.projector or train.batch_size, or a smaller --preset"
                ) from None
        # Out of the except block, so the failed attempt's tensors are freed before the next.
        if device.type == "cuda":
            torch.cuda.empty_cache()
        smaller = max(smaller_micro_batch(micro), smallest)
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


__all__ = [
    "PROBE_SEED",
    "PROBE_SKIPS",
    "PROBE_STEPS",
    "autofit",
    "forget_failed_step",
    "probe",
    "smaller_micro_batch",
]
