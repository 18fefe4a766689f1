"""The state the parts share: counters, the epoch's mean, timings kept apart from steps."""

import math

from lowres_ssl.engine.state import UNFITTED, Progress, State

from .fakes import ManualClock, done, state


def test_steps_and_epochs_are_counted_and_bad_losses_leave_the_mean():
    s = state()
    for loss, finite in [(2.0, True), (math.nan, False), (4.0, True)]:
        s.count_step(done(loss, finite=finite, images=8))
    p = s.progress
    assert (p.step, p.batch, p.images, s.session_images, p.bad_steps) == (3, 3, 24, 24, 1)
    assert p.last_loss == 4.0
    s.count_epoch()
    assert s.epoch_loss_mean == 3.0  # the two finite losses
    assert (p.epoch, p.batch, p.epoch_loss_steps) == (1, 0, 0)
    s.count_epoch()  # an epoch without a finite loss has no mean
    assert math.isnan(s.epoch_loss_mean)


def test_timed_work_is_kept_apart_and_wall_time_spans_sessions():
    clock = ManualClock()
    s = State(Progress(wall_s=50.0, step=7), 20, clock)
    clock.advance(3)
    with s.timed("checkpoint"):
        clock.advance(2)
    with s.timed("evaluation"):
        clock.advance(5)
    assert s.timings == {"checkpoint": [2], "evaluation": [5], "export": []}
    assert s.overhead_s() == 7 and s.overhead_s("evaluation") == 5
    assert s.wall_s() == 50 + 10 and s.start_step == 7
    assert s.total_known and not State(Progress(), UNFITTED, clock).total_known


def test_a_checkpoint_of_an_earlier_version_reads_with_its_old_field_names():
    old = {"step": 9, "knn_step": 8, "knn_top1": 0.4, "best_top1": 0.5, "best_step": 8}
    p = Progress.from_saved(old)
    assert (p.eval_step, p.eval_value, p.best_value, p.best_step) == (8, 0.4, 0.5, 8)
