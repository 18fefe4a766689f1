"""Non-finite losses and the order in which the parts hear the loop's events."""

import math

import pytest

from lowres_ssl.engine.hooks import Hooks, Part
from lowres_ssl.engine.stopping import NonFiniteGuard
from lowres_ssl.errors import UserError

from .fakes import done, state


def test_non_finite_losses_in_a_row_end_the_run_a_finite_one_resets_the_count():
    guard, s = NonFiniteGuard(max_in_a_row=3), state()
    for finite in (False, False, True, False, False):  # never 3 in a row
        s.count_step(done(1.0 if finite else math.nan, finite=finite))
        guard.after_step(s, done(1.0 if finite else math.nan, finite=finite))
    with pytest.raises(UserError, match="3 non-finite losses in a row"):
        guard.after_step(s, done(math.nan, finite=False))


def test_parts_hear_each_event_in_the_order_given():
    heard = []

    class Named(Part):
        def __init__(self, name, epochs=True):
            self.name, self.epochs = name, epochs

        def after_step(self, state, done):
            heard.append(("step", self.name))

        def after_epoch(self, state):
            if self.epochs:
                heard.append(("epoch", self.name))

    hooks = Hooks([Named("a"), Named("b", epochs=False), Named("c")])
    hooks.after_step(state(), done())
    hooks.after_epoch(state())
    assert heard == [("step", "a"), ("step", "b"), ("step", "c"), ("epoch", "a"), ("epoch", "c")]


class Scale:
    """The loss scaler as the guard reads it."""

    def __init__(self, value: float) -> None:
        self.value = value

    def get_scale(self) -> float:
        return self.value


def test_loss_scaler_skips_count_once_the_scale_is_below_one():
    """The scaler skips a few updates while it halves its scale from 2^16 (its normal work);
    below a scale of 1 the gradients overflow fp16 unscaled, and every update would be
    skipped in silence: those count, and end the run like non-finite losses."""
    from lowres_ssl.engine.state import StepDone
    from lowres_ssl.engine.steps import StepResult

    skipped = StepDone(StepResult(1.0, {}, True, scaler_skipped=True), 0.1, 8, None)
    scale = Scale(2.0**10)
    guard, s = NonFiniteGuard(max_in_a_row=3, scaler=scale), state()
    for _ in range(10):
        s.count_step(skipped)
        guard.after_step(s, skipped)
    assert s.progress.bad_steps == 10 and guard.in_a_row == 0
    scale.value = 0.5
    guard.after_step(s, skipped)
    guard.after_step(s, skipped)
    with pytest.raises(UserError, match=r"3 skipped fp16 updates in a row.*loss scale 0.5"):
        guard.after_step(s, skipped)
