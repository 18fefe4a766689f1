"""Runs sized to a time budget (``train.time_budget``, ``--time-budget 15m``).

After a short measured warm-up the trainer knows what one step costs, what one evaluation
(the kNN monitor or the validation) and one checkpoint cost; :func:`fit_total_steps` then picks
the largest total number of steps whose training, checkpoints and evaluations end within the
budget, counted from the start of the command (setup and warm-up included). The learning-rate
schedule (warm-up and cosine) is fitted to that total, and a resumed run keeps it.

Pure arithmetic here, so the choice is tested with made-up timings, not with a clock.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from lowres_ssl.errors import UserError

#: The budget's share kept back for what the estimate does not see (a slower step, the
#: process exit, the last log lines).
MARGIN = 0.04

#: An evaluation costing more than this share of the budget is not run after every epoch.
EVAL_SHARE_EPOCH = 0.25
#: ... and not at all (where it is optional: the kNN monitor) above this share.
EVAL_SHARE_FINAL = 0.5

_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m|h|d)")


def parse_budget(value: str | float | int) -> float:
    """``"15m"``, ``"2h"``, ``"1h30m"``, ``"90s"``, ``"900"`` or 900 → seconds (> 0)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            parts = _PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise UserError(
                    f"train.time_budget {value!r} is not a duration; write e.g. 15m, 2h, 1h30m, "
                    "90s or a number of seconds"
                ) from None
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not (math.isfinite(seconds) and seconds > 0):
        raise UserError(f"train.time_budget must be a positive duration, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"15 min"``, ``"4 min 41 s"``, ``"2 h 5 min"``."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        m, r = divmod(s, 60)
        return f"{m} min" + (f" {r} s" if r else "")
    h, r = divmod(s, 3600)
    return f"{h} h" + (f" {r // 60} min" if r // 60 else "")


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
    evaluations (the loader, the views, the step, the bookkeeping), each checkpoint's and each
    evaluation's seconds. The first iteration is not counted (allocations, cuDNN's search)."""

    def __init__(self, budget_s: float, started: float, clock: Callable[[], float]) -> None:
        self.budget_s, self.started, self.clock = budget_s, started, clock
        self.steps: deque[float] = deque(maxlen=WINDOW)
        self.measured, self.measured_s = 0, 0.0
        self.checkpoints: list[float] = []
        self.evaluation: float | None = None  # the last evaluation's seconds, once one ran
        self.eval_estimate = 0.0  # before one ran: from a timed forward pass
        self.overhead = 0.0
        self._seen_first = False
        self._mark, self._overhead_mark = clock(), 0.0

    def start_iteration(self) -> None:
        self._mark, self._overhead_mark = self.clock(), self.overhead

    def end_iteration(self) -> None:
        dt = self.clock() - self._mark - (self.overhead - self._overhead_mark)
        if not self._seen_first:
            self._seen_first = True
            return
        self.steps.append(dt)
        self.measured += 1
        self.measured_s += dt

    @contextlib.contextmanager
    def timed(self, kind: str) -> Iterator[None]:
        """Time a checkpoint (``kind`` "checkpoint") or an evaluation, apart from the steps."""
        start = self.clock()
        try:
            yield
        finally:
            dt = self.clock() - start
            self.overhead += dt
            if kind == "checkpoint":
                self.checkpoints.append(dt)
            else:
                self.evaluation = dt

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
        checkpoint = sum(self.checkpoints) / len(self.checkpoints) if self.checkpoints else 0.0
        evaluation = self.evaluation if self.evaluation is not None else self.eval_estimate
        return Timings(self.clock() - self.started, step, evaluation, checkpoint)


__all__ = [
    "MARGIN",
    "REFIT_CHANGE",
    "REFIT_EVERY",
    "BudgetWatch",
    "Schedule",
    "Timings",
    "choice_line",
    "fit_total_steps",
    "format_duration",
    "overhead_s",
    "parse_budget",
]
