"""The plan's rule for long runs on photos against the steps a time budget fits: a run whose
budget, at this machine's measured steps, gives images on the other side of the threshold
than the rule's stated rate counted says so in one line (with the rate that would plan it
right) and keeps its plan; one on the same side says nothing."""

from __future__ import annotations

import logging

from lowres_ssl.config import load_yaml
from lowres_ssl.engine.length_check import LengthCheck
from lowres_ssl.engine.state import UNFITTED
from lowres_ssl.length import Choice, Length, LongRule
from lowres_ssl.tasks import Pretraining, train
from tests.engine.fakes import done, state
from tests.tiny import tiny

RULE = LongRule(min_images=200, images_per_s=1.0, keys={"loss": {"lam": 0.5}})
COUNTED = Length(600, "a 10 min budget at 1 images/s", budget_s=600.0)


class Clock:
    """Seconds that pass only when a step ends: ``step_s`` each."""

    def __init__(self, step_s: float) -> None:
        self.now, self.step_s = 1000.0, step_s

    def __call__(self) -> float:
        return self.now

    def tick(self, progress, values) -> None:
        self.now += self.step_s


def photo_run(folder, step_s: float, tmp_path, caplog):
    """A 10-minute budget that the rule counts at 1 image/s: 600 images, at least the 200 of
    its threshold, so the plan applies ``photos.long`` (λ = 0.5 here, a cheap mark)."""
    rule = {"min_images": 200, "images_per_s": 1, "loss": {"lam": 0.5}}
    cfg = tiny(
        folder, data={"load_size": 72}, train={"time_budget": "10m", "batch_size": 4},
        photos={"long": rule},
    )  # fmt: skip
    clock, out = Clock(step_s), tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="lowres_ssl"):
        train(cfg, out, task=Pretraining(), clock=clock, on_step=clock.tick, progress_bar=False)
    checks = [r.getMessage() for r in caplog.records if r.getMessage().startswith("photos.long:")]
    return load_yaml(out / "config.yaml"), checks


def test_a_budget_that_fits_fewer_images_than_counted_says_so(folder, tmp_path, caplog):
    """20 s a step: about 28 steps of 4 images fit the budget, under 200, where the plan
    counted 600; the run keeps its plan and says so once."""
    saved, checks = photo_run(folder, 20.0, tmp_path, caplog)
    assert any("a long run" in r.getMessage() for r in caplog.records)  # the plan's line
    assert saved["loss"]["lam"] == 0.5  # the run kept its plan
    (line,) = checks
    assert "under 200" in line and "counted 600 at 1 images/s" in line
    rate = float(line.rsplit("photos.long.images_per_s=", 1)[1])
    assert 0.15 < rate < 0.22  # about 112 images in 600 s


def test_the_check_waits_for_the_fit_and_speaks_once(caplog):
    """Nothing before the budget has fitted the total; after it, one look: silent where the
    fitted images agree with the plan, one line where they do not."""
    choice = Choice(RULE, COUNTED, True)  # the plan chose long
    with caplog.at_level(logging.INFO, logger="lowres_ssl"):
        s = state(total=UNFITTED)
        silent = LengthCheck(choice, images_per_step=4, main_process=True)
        silent.after_step(s, done())
        assert not silent.done  # the total is not known yet
        s.total_steps = 140  # 560 images: at least 200, as planned
        silent.after_step(s, done())
        assert silent.done and caplog.records == []
        loud = LengthCheck(choice, images_per_step=4, main_process=True)
        s.total_steps = 28  # 112 images: under 200
        loud.after_step(s, done())
        loud.after_step(s, done())
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["photos.long"]
