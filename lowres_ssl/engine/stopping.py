"""When a run stops early: Ctrl-C (:class:`StopRequest`), losses that stay non-finite
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


class StopRequest:
    """The first Ctrl-C asks the loop to stop at the end of the step (and checkpoint); a
    second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping after this step (Ctrl-C again to stop at once)")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class NonFiniteGuard(Part):
    """A non-finite loss skips its step (the step itself leaves the parameters alone) with a
    warning; ``max_in_a_row`` of them in a row end the run with a one-line error (the last
    good checkpoint is kept)."""

    def __init__(self, max_in_a_row: int) -> None:
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0

    def after_step(self, state: State, done: StepDone) -> None:
        if done.result.finite:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        step = state.progress.step
        log.warning("step %d: loss is %s; step skipped", step, done.result.loss)
        if self.in_a_row >= self.max_in_a_row:
            raise UserError(
                f"{self.in_a_row} non-finite losses in a row (step {step}); try a "
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


__all__ = ["NonFiniteGuard", "StopRequest", "out_of_memory_message"]
