"""Runs sized to a time budget (``train.time_budget``, ``--time-budget 15m``).

After a short measured warm-up the run knows what one step costs, what one evaluation
(the kNN monitor or the validation) and one checkpoint cost; :func:`fit_total_steps` then picks
the largest total number of steps whose training, checkpoints and evaluations end within the
budget, counted from the start of the command (setup and warm-up included). The learning-rate
schedule (warm-up and cosine) is fitted to that total, and a resumed run keeps it.

The choice (:func:`fit_total_steps`) is pure arithmetic, tested with made-up timings, not with
a clock; :class:`BudgetWatch` measures; :class:`TimeBudget` is the part beside the loop that
fits the total after the warm-up and again every few steps (the machine may slow down).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

from accelerate.utils import broadcast_object_list

from lowres_ssl.durations import format_duration
from lowres_ssl.engine.hooks import Part
from lowres_ssl.engine.state import State, StepDone

log = logging.getLogger("lowres_ssl")

#: The budget's share kept back for what the estimate does not see (a slower step, the
#: process exit, the last log lines).
MARGIN = 0.04

#: An evaluation costing more than this share of the budget is not run after every epoch.
EVAL_SHARE_EPOCH = 0.25
#: ... and not at all (where it is optional: the kNN monitor) above this share.
EVAL_SHARE_FINAL = 0.5


@dataclass(frozen=True)
class Timings:
    """What the warm-up measured, in seconds."""

    elapsed: float  # since the command started (setup, data, warm-up)
    step: float  # one optimizer step
    evaluation: float  # one evaluation (0: none)
    checkpoint: float  # one checkpoint


@dataclass(frozen=True)
class Schedule:
    """When the loop checkpoints and evaluates."""

    done_steps: int  # steps already taken
    steps_per_epoch: int
    checkpoint_every: int
    eval_every_epochs: int  # 0: no evaluation at epoch ends
    final_eval: bool  # an evaluation at the end of the run


def overhead_s(total: int, t: Timings, s: Schedule) -> float:
    """The seconds of checkpoints and evaluations from ``s.done_steps`` to ``total``."""
    spe, done = s.steps_per_epoch, s.done_steps
    epoch_ends = [e for e in range(done // spe + 1, total // spe + 1)]
    evals = sum(1 for e in epoch_ends if s.eval_every_epochs and e % s.eval_every_epochs == 0)
    last_is_eval = bool(epoch_ends) and total % spe == 0 and evals > 0
    if s.final_eval and not last_is_eval:
        evals += 1
    periodic = total // s.checkpoint_every - done // s.checkpoint_every
    # A checkpoint at every epoch end, every checkpoint_every steps, and one at the end (with
    # the final weights, about as long).
    saves = len(epoch_ends) + periodic + 2
    return evals * t.evaluation + saves * t.checkpoint


def fit_total_steps(budget_s: float, t: Timings, s: Schedule) -> int:
    """The largest total number of steps that ends within ``budget_s`` (at least one more
    step than done)."""
    available = budget_s * (1 - MARGIN) - t.elapsed
    lo = s.done_steps + 1

    def fits(total: int) -> bool:
        return (total - s.done_steps) * t.step + overhead_s(total, t, s) <= available

    if not fits(lo):
        return lo
    hi = lo + max(1, int(available / max(t.step, 1e-9)))
    while lo < hi:  # the cost grows with the total: the last total that fits
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def choice_line(budget_s: float, total: int, t: Timings, s: Schedule, images_per_step: int) -> str:
    """``time budget 15 min: 1,900 steps ≈ 3.1 epochs at 2,350 img/s (…)``."""
    rate = images_per_step / max(t.step, 1e-9)
    extra = overhead_s(total, t, s)
    return (
        f"time budget {format_duration(budget_s)}: {total:,} steps ≈ "
        f"{total / s.steps_per_epoch:.2f} epochs at {rate:,.0f} img/s "
        f"(setup and warm-up {format_duration(t.elapsed)}, checkpoints and evaluations "
        f"≈ {format_duration(extra)}); the learning-rate schedule is fitted to {total:,} steps"
    )


#: Steps between re-fits of a fitted total (the machine may slow down or speed up), and the
#: change that makes one: more than this share of the total (and more than two steps).
REFIT_EVERY = 10
REFIT_CHANGE = 0.02
#: The step time of a re-fit: the mean of the last this many steps.
WINDOW = 20


class BudgetWatch:
    """What a budgeted run measures: each iteration's seconds net of checkpoints and
    evaluations (the loader, the views, the step, the bookkeeping), which the run's
    :meth:`State.timed` measures apart. The first iteration is not counted (allocations,
    cuDNN's search)."""

    def __init__(self, budget_s: float, started: float, state: State) -> None:
        self.budget_s, self.started, self.state = budget_s, started, state
        self.steps: deque[float] = deque(maxlen=WINDOW)
        self.measured, self.measured_s = 0, 0.0
        self.eval_estimate = 0.0  # before an evaluation ran: from a timed forward pass
        self._seen_first = False
        self._mark, self._overhead_mark = state.clock(), 0.0

    def start_iteration(self) -> None:
        self._mark, self._overhead_mark = self.state.clock(), self.state.overhead_s()

    def end_iteration(self) -> None:
        overhead = self.state.overhead_s() - self._overhead_mark
        dt = self.state.clock() - self._mark - overhead
        if not self._seen_first:
            self._seen_first = True
            return
        self.steps.append(dt)
        self.measured += 1
        self.measured_s += dt

    def warmed_up(self) -> bool:
        """5 measured steps and 1 % of the budget, or 5 % of the budget (slow steps)."""
        return (self.measured >= 5 and self.measured_s >= 0.01 * self.budget_s) or (
            self.measured >= 1 and self.measured_s >= 0.05 * self.budget_s
        )

    def timings(self, *, recent: bool = False) -> Timings:
        """What the fit needs (the last evaluation's seconds, else ``eval_estimate``);
        ``recent``: the step time of the last steps, not of all."""
        step = (
            sum(self.steps) / len(self.steps)
            if recent and self.steps
            else self.measured_s / max(self.measured, 1)
        )
        saves, evals = self.state.timings["checkpoint"], self.state.timings["evaluation"]
        checkpoint = sum(saves) / len(saves) if saves else 0.0
        evaluation = evals[-1] if evals else self.eval_estimate
        return Timings(self.state.clock() - self.started, step, evaluation, checkpoint)


class TimeBudget(Part):
    """The part that keeps a run to ``budget_s`` (counted from ``started``, the start of the
    command): after the warm-up, a checkpoint (also to time one) and an estimate of one
    evaluation, then the total of steps that fits (an optional evaluation too costly for the
    budget is turned off, or run at the end only); in the session that fitted it, the total
    again every :data:`REFIT_EVERY` steps from the recent steps. A resumed run keeps the total
    it chose. With several processes the main process's clock decides, and every process
    takes its total."""

    def __init__(self, budget_s: float, started: float, state: State, *, accelerator,
                 evaluator, checkpointer, steps_per_epoch: int, checkpoint_every: int,
                 images_per_step: int) -> None:  # fmt: skip
        self.budget_s, self.started = budget_s, started
        self.accelerator, self.evaluator, self.checkpointer = accelerator, evaluator, checkpointer
        self.steps_per_epoch, self.checkpoint_every = steps_per_epoch, checkpoint_every
        self.images_per_step = images_per_step
        self.watch = BudgetWatch(budget_s, started, state)
        self.fitted = state.progress.total_steps is not None
        self.refits = False  # only in the session that fitted the total

    def _same_for_all(self, value: Any) -> Any:
        """The main process's ``value`` on every process."""
        if self.accelerator.num_processes > 1:
            return broadcast_object_list([value])[0]
        return value

    def after_step(self, state: State, done: StepDone) -> None:
        self.watch.end_iteration()
        warmed_up = not self.fitted and self._same_for_all(self.watch.warmed_up())
        if warmed_up:
            self.fit(state, done.views)
            self.fitted = self.refits = True
        elif self.refits and state.progress.step % REFIT_EVERY == 0:
            self.refit(state)
        self.watch.start_iteration()

    def after_epoch(self, state: State) -> None:
        self.watch.start_iteration()

    def plan(self, state: State) -> Schedule:
        return Schedule(
            done_steps=state.progress.step,
            steps_per_epoch=self.steps_per_epoch,
            checkpoint_every=self.checkpoint_every,
            eval_every_epochs=self.evaluator.every_epochs,
            final_eval=self.evaluator.evaluation is not None,
        )

    def fit(self, state: State, views) -> None:
        """After the warm-up: the total number of steps that ends within the budget."""
        self.checkpointer.save(state)  # also what one checkpoint costs
        evaluation = self.evaluator.evaluation
        eval_s = 0.0
        if evaluation is not None:
            eval_s = self._same_for_all(self.evaluator.cost_s(state, views))
            if evaluation.optional and eval_s > EVAL_SHARE_FINAL * self.budget_s:
                log.info(
                    "time budget: the %s evaluation (≈ %s each) is off; evaluate afterwards "
                    "with scripts/evaluate.py", evaluation.kind, format_duration(eval_s),
                )  # fmt: skip
                self.evaluator.turn_off()
            elif eval_s > EVAL_SHARE_EPOCH * self.budget_s and evaluation.every_epochs:
                log.info(
                    "time budget: the %s evaluation (≈ %s each) runs at the end only",
                    evaluation.kind, format_duration(eval_s),
                )  # fmt: skip
                self.evaluator.at_end_only()
        self.watch.eval_estimate = eval_s if self.evaluator.evaluation is not None else 0.0
        timings, plan = self.watch.timings(), self.plan(state)
        self.set_total(state, self._same_for_all(fit_total_steps(self.budget_s, timings, plan)))
        if self.accelerator.is_main_process:
            total = state.total_steps
            log.info(choice_line(self.budget_s, total, timings, plan, self.images_per_step))

    def refit(self, state: State) -> None:
        """Steps that have become slower (or faster) than the warm-up's: the total again."""
        timings = self.watch.timings(recent=True)
        total = self._same_for_all(fit_total_steps(self.budget_s, timings, self.plan(state)))
        current = state.total_steps
        if abs(total - current) > max(2, REFIT_CHANGE * current):
            if self.accelerator.is_main_process:
                log.info(
                    "time budget: steps now take %.2f s; %s steps in all instead of %s",
                    timings.step, f"{total:,}", f"{current:,}",
                )  # fmt: skip
            self.set_total(state, total)

    def set_total(self, state: State, total: int) -> None:
        """``total`` is already the main process's (every process sets the same)."""
        state.total_steps = state.progress.total_steps = total

    def summary(self, state: State) -> dict[str, float]:
        return {"time_budget_s": self.budget_s, "command_wall_s": state.clock() - self.started}

    def end_line(self, summary: dict[str, Any]) -> str:
        return (
            f"time budget {format_duration(self.budget_s)}: used "
            f"{format_duration(summary['command_wall_s'])} (the run, from the start of the command)"
        )


__all__ = [
    "MARGIN",
    "REFIT_CHANGE",
    "REFIT_EVERY",
    "BudgetWatch",
    "Schedule",
    "TimeBudget",
    "Timings",
    "choice_line",
    "fit_total_steps",
    "overhead_s",
]
