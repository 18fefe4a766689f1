"""What the parts of a run share, passed to each of them explicitly: where the run is
(:class:`Progress`, saved in every checkpoint) and this session's clock (:class:`State`).

The loop counts; the parts (:mod:`.hooks`) read. Time spent saving checkpoints and evaluating
is measured here, once (:meth:`State.timed`), for every part that must leave it out: the time
budget (steps net of it) and the report (images per second of training).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from lowres_ssl.engine.steps import StepResult

#: The provisional total of a time-budgeted run until its warm-up has measured a step.
UNFITTED = 10**9

#: Progress fields that had other names in checkpoints of earlier versions.
_RENAMED = {"knn_step": "eval_step", "knn_top1": "eval_value", "best_top1": "best_value"}


@dataclass
class Progress:
    """Where a run is. ``batch`` is the next batch of ``epoch`` to train on."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    images: int = 0  # images trained on, over all processes
    bad_steps: int = 0  # steps thrown away (non-finite loss, update skipped by the loss scaler)
    wall_s: float = 0.0  # training time, all sessions up to this checkpoint
    epoch_loss_sum: float = 0.0  # finite losses of this epoch so far (for its mean)
    epoch_loss_steps: int = 0
    last_loss: float | None = None  # the last finite loss
    eval_step: int = -1  # the step of the last evaluation
    eval_value: float | None = None  # its result (the task's metric)
    best_value: float | None = None  # the best evaluation result so far
    best_step: int = -1  # ... its step (-1: none yet)
    best_epoch: int = 0
    total_steps: int | None = None  # the total a time budget chose (None: from the config)
    budget_used_s: float = 0.0  # a time budget's seconds used, all sessions up to this checkpoint

    @classmethod
    def from_saved(cls, values: dict) -> Progress:
        """The progress a checkpoint recorded (earlier versions' field names too)."""
        return cls(**{_RENAMED.get(k, k): v for k, v in values.items()})


@dataclass
class StepDone:
    """One step as the parts hear of it: its result, the learning rate it ran at, the images
    it took over all processes, and its views (the budget times a forward pass on them)."""

    result: StepResult
    lr: float
    images: int
    views: object


@dataclass
class State:
    """The run's progress and this session: the clock, when the session started, the images it
    trained on, the total number of steps (a time budget may change it), and the seconds of
    each checkpoint and evaluation it ran."""

    progress: Progress
    total_steps: int
    clock: Callable[[], float]
    session_start: float = 0.0
    session_images: int = 0
    base_wall_s: float = 0.0  # training time of the sessions before this one
    base_budget_s: float = 0.0  # a time budget's seconds used by the sessions before this one
    command_start: float | None = None  # when the command started (None: the session's start)
    start_step: int = 0
    epoch_loss_mean: float = math.nan  # the last finished epoch's
    timings: dict[str, list[float]] = field(
        default_factory=lambda: {"checkpoint": [], "evaluation": [], "export": []}
    )

    def __post_init__(self) -> None:
        self.session_start = self.clock()
        self.base_wall_s, self.start_step = self.progress.wall_s, self.progress.step
        if self.command_start is None:
            self.command_start = self.session_start
        self.base_budget_s = self.progress.budget_used_s

    @property
    def total_known(self) -> bool:
        """False while a time budget has not fitted the total yet."""
        return self.total_steps != UNFITTED

    def wall_s(self) -> float:
        """Training time of the run so far, all sessions."""
        return self.base_wall_s + self.clock() - self.session_start

    def budget_used_s(self) -> float:
        """A time budget's seconds used so far: every earlier session's, up to the checkpoint
        this one resumed, and this command's from its start (setup included)."""
        return self.base_budget_s + self.clock() - self.command_start

    def overhead_s(self, kind: str | None = None) -> float:
        """Seconds this session spent on checkpoints and evaluations (or on one ``kind``)."""
        kinds = [kind] if kind else list(self.timings)
        return sum(sum(self.timings[k]) for k in kinds)

    @contextlib.contextmanager
    def timed(self, kind: str) -> Iterator[None]:
        """Time a ``"checkpoint"``, an ``"evaluation"`` or the ``"export"``, apart from the
        steps."""
        start = self.clock()
        try:
            yield
        finally:
            self.timings[kind].append(self.clock() - start)

    def count_step(self, done: StepDone) -> None:
        """A step has run: the counters, and the epoch's loss if it was finite."""
        p, result = self.progress, done.result
        p.step += 1
        p.batch += 1
        p.images += done.images
        self.session_images += done.images
        if result.finite:
            p.last_loss = result.loss
            p.epoch_loss_sum += result.loss
            p.epoch_loss_steps += 1
        if not result.applied:
            p.bad_steps += 1

    def skip_batch(self, position: int) -> None:
        """A batch left too small by bad files was passed over: a resume starts after it."""
        self.progress.batch = position + 1

    def count_epoch(self) -> None:
        """An epoch has ended: its mean loss, and the next epoch from its first batch."""
        p = self.progress
        done = p.epoch_loss_steps
        self.epoch_loss_mean = p.epoch_loss_sum / done if done else math.nan
        p.epoch += 1
        p.batch = 0
        p.epoch_loss_sum, p.epoch_loss_steps = 0.0, 0


__all__ = ["UNFITTED", "Progress", "State", "StepDone"]
