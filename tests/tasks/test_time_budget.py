"""A time budget is a deadline: runs on a fake clock whose steps slow down, whose evaluations
cost more than estimated, and that are stopped and resumed, all end within the budget."""

from __future__ import annotations

import json
import logging

import pytest

from lowres_ssl.engine.budgeting import MARGIN
from lowres_ssl.tasks import FineTuning, train
from lowres_ssl.tasks.finetune import ValidationEvaluation
from tests.tasks.test_finetune import ft_config, records
from tests.tiny import interrupt_at


class Clock:
    """Seconds that pass only when a step ends (``tick`` is the on_step hook): ``step_s``
    each, ``later_s`` once ``slower_after_s`` have passed since the start."""

    def __init__(self, step_s: float, later_s: float | None = None, slower_after_s: float = 0):
        self.start = self.now = 1000.0
        self.step_s, self.later_s, self.slower_after_s = step_s, later_s, slower_after_s

    def __call__(self) -> float:
        return self.now

    def tick(self, progress, values) -> None:
        late = self.later_s is not None and self.now - self.start >= self.slower_after_s
        self.now += self.later_s if late else self.step_s


def budget_config(labeled, pretrained, budget, val_every_epochs=0):
    return ft_config(
        labeled,
        pretrained,
        train={"time_budget": budget, "epochs": 1, "checkpoint_every": 1000},
        finetune={"val_every_epochs": val_every_epochs},
    )


def run(cfg, out, clock, on_step=None, **kwargs):
    hook = clock.tick if on_step is None else (lambda p, v: (clock.tick(p, v), on_step(p, v)))
    return train(cfg, out, task=FineTuning(), progress_bar=False, on_step=hook, clock=clock,
                 **kwargs)  # fmt: skip


def test_the_first_fit_is_the_measured_step_time(labeled, pretrained, tmp_path):
    clock = Clock(2.0)
    summary = run(budget_config(labeled, pretrained, "30s"), tmp_path / "b", clock)
    # Warm-up: the first step is not measured; step 2 took 2 s, over 5 % of the budget: 4 s
    # had passed in all. Checkpoints and evaluations take no time on this clock, so the total
    # is 2 + (30 (1 - 4 %) - 4) / 2 steps: 14, beyond the one epoch (6 steps) the config names;
    # the re-fits on the same step time agree.
    assert summary["steps"] == 2 + int((30 * (1 - MARGIN) - 4) / 2.0) == 14
    assert summary["time_budget_s"] == 30.0
    assert summary["budget_used_s"] == summary["command_wall_s"] == 28 <= 30


def test_steps_twice_as_slow_halfway_still_end_by_the_deadline(
    labeled,
    pretrained,
    tmp_path,
    caplog,
):
    caplog.set_level(logging.INFO, logger="lowres_ssl")
    clock = Clock(3.0, later_s=6.0, slower_after_s=60)
    out = tmp_path / "slow"
    summary = run(budget_config(labeled, pretrained, "2m"), out, clock)
    # Fitted after 2 steps of 3 s (6 % of the budget): 2 + (115.2 - 6) / 3 = 38 steps. Halfway
    # the steps take 6 s: the re-fits (every 2.4 s of the budget, and every step near the end)
    # bring the total down to about 20 + 55 / 6 = 29.
    used = summary["budget_used_s"]
    assert 0.9 * 120 <= used <= 120, used
    assert summary["steps"] <= 30
    lines = [r.getMessage() for r in caplog.records if "steps now take" in r.getMessage()]
    assert 1 <= len(lines) <= 3, lines  # said when the plan moved by over 10 %, not each time
    # The schedule's tail was cut with the total: the last step ran at about the final rate.
    steps = records(out, "step")
    peak = max(r["lr"] for r in steps)
    assert steps[-1]["step"] == summary["steps"] and steps[-1]["lr"] <= 0.01 * peak
    ends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("time budget 2")]
    assert ends[-1].startswith("time budget 2 min: used 1 min") and "trained" in ends[-1]


def test_an_evaluation_dearer_than_estimated_is_counted(
    labeled,
    pretrained,
    tmp_path,
    monkeypatch,
):
    """The estimate of a validation (a timed forward pass) is 0 s on this clock; each one
    costs 8 s. After the first, the re-fits reserve 8 s for each one still to come."""
    clock = Clock(2.0)
    plain = ValidationEvaluation.run

    def dear(self, model):
        clock.now += 8.0
        return plain(self, model)

    monkeypatch.setattr(ValidationEvaluation, "run", dear)
    cfg = budget_config(labeled, pretrained, "1m", val_every_epochs=1)
    summary = run(cfg, tmp_path / "dear", clock)
    used = summary["budget_used_s"]
    assert 0.85 * 60 <= used <= 60, used
    assert summary["budget_evaluation_s"] >= 8 * 2  # several epochs, each validated


def test_a_resumed_run_keeps_its_deadline(labeled, pretrained, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lowres_ssl")
    cfg = budget_config(labeled, pretrained, "1m")
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        run(cfg, out, Clock(4.0), on_step=interrupt_at(5))
    last = sorted((out / "checkpoints").glob("step_*"))[-1]
    saved = json.loads((last / "trainer_state.json").read_text())
    assert saved["step"] == 5 and saved["budget_used_s"] == 20.0
    # Resumed (a day later: the clock starts anew) with steps as slow as before: 40 s left.
    summary = run(cfg, out, Clock(4.0), resume=True)
    assert 0.9 * 60 <= summary["budget_used_s"] <= 60
    assert summary["command_wall_s"] <= 40
    assert "earlier sessions 20 s" in [r.getMessage() for r in caplog.records][-1]
    # ... and with steps four times slower: the total shrinks to what is left (the first step
    # of a session is not measured, the second is: 20 + 2 x 16 s, and not one more fits).
    out2 = tmp_path / "r2"
    with pytest.raises(KeyboardInterrupt):
        run(cfg, out2, Clock(4.0), on_step=interrupt_at(5))
    slow = run(cfg, out2, Clock(16.0), resume=True)
    assert slow["budget_used_s"] == 52 and slow["steps"] == 7
