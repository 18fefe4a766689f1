"""Runs held to a time budget (``train.time_budget``, ``--time-budget 15m``): a deadline.

The budget counts from the start of the command (setup and warm-up included; a resumed run
adds the budget its earlier sessions had used by the checkpoint it resumes). After a short
measured warm-up the run knows what one step costs, what one evaluation (the kNN monitor or the
validation) and one checkpoint cost; :func:`fit_total_steps` then picks the largest total number
of steps whose training, checkpoints, evaluations, the last checkpoint and the export end
within the budget. The learning-rate schedule (warm-up and cosine) is fitted to that total.

The machine may slow down (another job takes the cores) or speed up, and an evaluation may
cost more than estimated: the total is fitted again from the recent steps and the measured
costs every :data:`REFIT_SHARE` of the budget, and at every step near the end. When nothing
more fits, the run stops at that step boundary; as the total shrinks the schedule's tail is cut
with it, so the learning rate still ends at its final value. One line says the plan when it
changes by more than :data:`ANNOUNCE_CHANGE`, one line at the end what the budget went on.

The choice (:func:`fit_total_steps`) is pure arithmetic, tested with made-up timings, not with
a clock; :class:`BudgetWatch` measures; :class:`TimeBudget` is the part beside the loop.
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

    elapsed: float  # the budget used: since the command started (and earlier sessions')
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
    epoch_end_pending: bool = False  # the last step done ended an epoch whose end is to come


def overhead_s(total: int, t: Timings, s: Schedule) -> float:
    """The seconds of checkpoints and evaluations from ``s.done_steps`` to ``total``."""
    spe, done = s.steps_per_epoch, s.done_steps
    first = done // spe + (0 if s.epoch_end_pending else 1)
    epoch_ends = [e for e in range(first, total // spe + 1)]
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
    """The largest total number of steps that ends within ``budget_s``; the steps already
    done where not one more fits (the run stops there). ``t.elapsed``: the budget used."""
    available = budget_s * (1 - MARGIN) - t.elapsed
    lo = s.done_steps + 1

    def fits(total: int) -> bool:
        return (total - s.done_steps) * t.step + overhead_s(total, t, s) <= available

    if not fits(lo):
        return s.done_steps
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


#: A fitted total is fitted again each time this share of the budget has passed (the machine
#: may slow down or speed up), and at every step once fewer than :data:`NEAR_END_STEPS` steps
#: or less than :data:`NEAR_END_SHARE` of the budget are left.
REFIT_SHARE = 0.02
NEAR_END_STEPS = 20
NEAR_END_SHARE = 0.1
#: A new total is announced (one log line) when it differs from the last one announced by
#: more than this share; smaller changes are made without a word.
ANNOUNCE_CHANGE = 0.1
#: The step time of a re-fit: the slower of the mean of the last :data:`WINDOW` steps and of
#: the last :data:`SHORT_WINDOW` (a slow-down counts within a few steps, a speed-up over the
#: window).
WINDOW = 20
SHORT_WINDOW = 3
#: Measured steps a session needs before it re-fits (a resumed session's first ones).
MIN_MEASURED = 1


class BudgetWatch:
    """What a budgeted run measures: each iteration's seconds net of checkpoints and
    evaluations (the loader, the views, the step, the bookkeeping), which the run's
    :meth:`State.timed` measures apart. The first iteration is not counted (allocations,
    cuDNN's search)."""

    def __init__(self, budget_s: float, state: State) -> None:
        self.budget_s, self.state = budget_s, state
        self.steps: deque[float] = deque(maxlen=WINDOW)
        self.measured, self.measured_s = 0, 0.0
        self.eval_estimate = 0.0  # before an evaluation ran: from a timed forward pass
        self.cost_step: float | None = None  # the step time when the costs were measured
        self._evals_seen = 0
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

    def step_s(self, *, recent: bool) -> float:
        """One step's seconds: the mean of all measured steps, or (``recent``) the slower of
        the recent means (:data:`WINDOW`, :data:`SHORT_WINDOW`)."""
        if recent and self.steps:
            last = list(self.steps)
            short = last[-SHORT_WINDOW:]
            return max(sum(last) / len(last), sum(short) / len(short))
        return self.measured_s / max(self.measured, 1)

    def timings(self, *, recent: bool = False) -> Timings:
        """What the fit needs: the budget used, the step time (:meth:`step_s`), the slowest
        evaluation this session measured (else ``eval_estimate``) and the mean checkpoint. A
        machine that has slowed down since those costs were measured makes them dearer too:
        they are scaled by the step time now over the step time then (never below 1)."""
        saves, evals = self.state.timings["checkpoint"], self.state.timings["evaluation"]
        step = self.step_s(recent=recent)
        if len(evals) != self._evals_seen or self.cost_step is None:  # costs measured anew
            self._evals_seen, self.cost_step = len(evals), step
        slower = max(1.0, step / self.cost_step) if self.cost_step else 1.0
        checkpoint = sum(saves) / len(saves) if saves else 0.0
        evaluation = max(evals) if evals else self.eval_estimate
        return Timings(self.state.budget_used_s(), step, evaluation * slower, checkpoint * slower)


class TimeBudget(Part):
    """The part that holds a run to ``budget_s``: after the warm-up, a checkpoint (also to
    time one) and an estimate of one evaluation, then the total of steps that fits (an
    optional evaluation too costly for the budget is turned off, or run at the end only);
    then the total again from the recent steps every :data:`REFIT_SHARE` of the budget and at
    every step near the end, in every session (a resumed run keeps its deadline: the budget
    its earlier sessions used is counted). With several processes the main process's clock
    decides, and every process takes its total."""

    def __init__(
        self,
        budget_s: float,
        state: State,
        *,
        accelerator,
        evaluator,
        checkpointer,
        steps_per_epoch: int,
        checkpoint_every: int,
        images_per_step: int,
    ) -> None:
        self.budget_s = budget_s
        self.accelerator, self.evaluator, self.checkpointer = accelerator, evaluator, checkpointer
        self.steps_per_epoch, self.checkpoint_every = steps_per_epoch, checkpoint_every
        self.images_per_step = images_per_step
        self.watch = BudgetWatch(budget_s, state)
        self.fitted = state.progress.total_steps is not None
        self.announced = state.total_steps if self.fitted else None
        self.fitted_at = state.clock()

    def _same_for_all(self, value: Any) -> Any:
        """The main process's ``value`` on every process."""
        if self.accelerator.num_processes > 1:
            return broadcast_object_list([value])[0]
        return value

    def after_step(self, state: State, done: StepDone) -> None:
        self.watch.end_iteration()
        if not self.fitted:
            if self._same_for_all(self.watch.warmed_up()):
                self.fit(state, done.views)
                self.fitted = True
        elif self._same_for_all(self.refit_due(state)):
            self.refit(state)
        self.watch.start_iteration()

    def after_epoch(self, state: State) -> None:
        self.watch.start_iteration()

    def refit_due(self, state: State) -> bool:
        """Every :data:`REFIT_SHARE` of the budget, and at every step near the end (once the
        session has measured :data:`MIN_MEASURED` steps)."""
        if self.watch.measured < MIN_MEASURED:
            return False
        left_s = self.budget_s - state.budget_used_s()
        near_end = (
            state.total_steps - state.progress.step <= NEAR_END_STEPS
            or left_s <= NEAR_END_SHARE * self.budget_s
        )
        return near_end or state.clock() - self.fitted_at >= REFIT_SHARE * self.budget_s

    def plan(self, state: State) -> Schedule:
        return Schedule(
            done_steps=state.progress.step,
            steps_per_epoch=self.steps_per_epoch,
            checkpoint_every=self.checkpoint_every,
            eval_every_epochs=self.evaluator.every_epochs,
            final_eval=self.evaluator.evaluation is not None,
            epoch_end_pending=state.progress.batch >= self.steps_per_epoch,
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
        self.announced = state.total_steps
        if self.accelerator.is_main_process:
            total = state.total_steps
            log.info(choice_line(self.budget_s, total, timings, plan, self.images_per_step))

    def refit(self, state: State) -> None:
        """The total again, from the recent steps and the measured costs; announced when it
        moved by more than :data:`ANNOUNCE_CHANGE` since the last announcement."""
        timings = self.watch.timings(recent=True)
        total = self._same_for_all(fit_total_steps(self.budget_s, timings, self.plan(state)))
        self.set_total(state, total)
        before = self.announced or total
        if abs(total - before) > ANNOUNCE_CHANGE * before:
            if self.accelerator.is_main_process:
                log.info(
                    "time budget: steps now take %.2f s; %s steps in all instead of %s",
                    timings.step, f"{total:,}", f"{before:,}",
                )  # fmt: skip
            self.announced = total

    def set_total(self, state: State, total: int) -> None:
        """``total`` is already the main process's (every process sets the same)."""
        state.total_steps = state.progress.total_steps = total
        self.fitted_at = state.clock()

    def summary(self, state: State) -> dict[str, float]:
        """The budget, what it went on in this command (setup, training, checkpoints,
        evaluation, export) and what it used in all (earlier sessions too)."""
        overhead = {k: sum(v) for k, v in state.timings.items()}
        setup_s = state.session_start - state.command_start
        now = state.clock()
        return {
            "time_budget_s": self.budget_s,
            "command_wall_s": now - state.command_start,
            "budget_used_s": state.budget_used_s(),
            "budget_setup_s": setup_s,
            "budget_training_s": now - state.session_start - sum(overhead.values()),
            "budget_checkpoints_s": overhead["checkpoint"],
            "budget_evaluation_s": overhead["evaluation"],
            "budget_export_s": overhead["export"],
        }

    def end_line(self, summary: dict[str, Any]) -> str:
        """``time budget 10 min: used 9 min 58 s (setup 12 s, trained 9 min 21 s, …)``."""
        d = format_duration
        earlier = summary["budget_used_s"] - summary["command_wall_s"]
        parts = [
            f"setup {d(summary['budget_setup_s'])}",
            f"trained {d(summary['budget_training_s'])}",
            f"checkpoints {d(summary['budget_checkpoints_s'])}",
            f"evaluation {d(summary['budget_evaluation_s'])}",
            f"export {d(summary['budget_export_s'])}",
        ]
        if earlier >= 0.5:
            parts.append(f"earlier sessions {d(earlier)}")
        return (
            f"time budget {d(self.budget_s)}: used {d(summary['budget_used_s'])} "
            f"({', '.join(parts)})"
        )


__all__ = [
    "ANNOUNCE_CHANGE",
    "MARGIN",
    "NEAR_END_SHARE",
    "NEAR_END_STEPS",
    "REFIT_SHARE",
    "BudgetWatch",
    "Schedule",
    "TimeBudget",
    "Timings",
    "choice_line",
    "fit_total_steps",
    "overhead_s",
]
