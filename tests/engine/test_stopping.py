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
