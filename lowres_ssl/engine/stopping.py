"""When a run stops early: Ctrl-C or SIGTERM (:class:`StopRequest`), losses that stay non-finite
(:class:`NonFiniteGuard`), a card out of memory (:func:`out_of_memory_message`)."""

from __future__ import annotations

import logging
import signal
import threading

from lowres_ssl.config import Config
from lowres_ssl.engine.hooks import Part
from lowres_ssl.engine.state import State, StepDone
from lowres_ssl.errors import UserError

log = logging.getLogger("lowres_ssl")


class Stopped(KeyboardInterrupt):
    """A run stopped by a signal after its checkpoint; the command exits with
    ``128 + signum`` (130 for Ctrl-C, 143 for SIGTERM), as a shell reports a signal."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


#: The signals that stop a run at the next step boundary with a checkpoint: Ctrl-C, and what
#: a job scheduler, ``kill`` or a shutting-down machine sends.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def largest_over_processes(accelerator, value: int) -> int:
    """The largest of every process's ``value`` (a collective: each process must call it at
    the same point)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([value], device=accelerator.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


class StopRequest:
    """The first Ctrl-C or SIGTERM asks the loop to stop at the end of the step (and
    checkpoint); a second one interrupts at once. With several processes, :meth:`agreed` is
    what the loop asks: a stop that any process heard, on all of them at the same step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise Stopped(signum)
        self.signum = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        log.warning("%s: stopping after this step (again to stop at once)", name)

    def agreed(self, accelerator) -> int | None:
        """The signal that stops the run, the same on every process (a collective where
        there are several: each step, one integer)."""
        if accelerator.num_processes == 1:
            return self.signum
        agreed = largest_over_processes(accelerator, self.signum or 0)
        if agreed and self.signum is None:
            self.signum = agreed
        return agreed or None

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class NonFiniteGuard(Part):
    """A step thrown away (a non-finite loss, or an update the fp16 loss scaler skipped) is
    counted; ``max_in_a_row`` of them in a row end the run with a one-line error (the last
    good checkpoint is kept).

    The loss scaler (``scaler``: Accelerate's, None without fp16) skips an update whenever the
    scaled gradients overflow and halves its scale: from 2^16 it needs a few skips to find its
    scale at the start of a run, which is its normal work. A skip counts once the scale is
    below 1, where the gradients overflow fp16 unscaled: persistent overflow, which no scale
    fixes, and which would otherwise skip every update of the run in silence."""

    def __init__(self, max_in_a_row: int, scaler=None) -> None:
        self.max_in_a_row = max_in_a_row
        self.scaler = scaler
        self.in_a_row = 0

    def after_step(self, state: State, done: StepDone) -> None:
        result, step = done.result, state.progress.step
        if result.applied:
            self.in_a_row = 0
            return
        if result.finite:  # the loss scaler skipped the update
            scale = self.scaler.get_scale() if self.scaler is not None else 0.0
            if scale >= 1.0:
                log.debug("step %d: fp16 gradients overflowed; loss scale now %g", step, scale)
                return
            what = f"fp16 gradients overflow even at loss scale {scale:g}"
        else:
            what = f"loss is {result.loss}"
        self.in_a_row += 1
        log.warning("step %d: %s; step skipped", step, what)
        if self.in_a_row >= self.max_in_a_row:
            kind = "non-finite losses" if not result.finite else "skipped fp16 updates"
            raise UserError(
                f"{self.in_a_row} {kind} in a row (step {step}: {what}); try a "
                "lower optim.base_lr, or train.precision=fp32 (or bf16 instead of fp16); "
                "the last good checkpoint is kept"
            )


def out_of_memory_message(cfg: Config) -> str:
    """What to try when a step runs out of GPU memory."""
    from lowres_ssl.presets import next_smaller

    smaller = next_smaller(cfg.preset)
    smaller = f", --preset {smaller}" if smaller else ""
    batch = cfg.train.batch_size
    micro = min(cfg.train.micro_batch_size or batch, batch)
    return (
        f"CUDA out of memory with preset {cfg.preset or '(none)'} at batch {batch} per process "
        f"(micro-batch {micro}): try --set train.micro_batch_size={max(1, micro // 2)} or "
        f"--autofit (a smaller micro-batch keeps the objective: the regulariser still sees "
        f"{batch}; a smaller batch changes it){smaller}, or --set model.grad_checkpointing=true;"
        " the last checkpoint is kept"
    )


__all__ = [
    "STOP_SIGNALS",
    "NonFiniteGuard",
    "StopRequest",
    "Stopped",
    "largest_over_processes",
    "out_of_memory_message",
]
