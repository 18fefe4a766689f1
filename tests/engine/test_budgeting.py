"""The time budget: the fit's arithmetic, and what the watch measures."""

from lowres_ssl.engine.budgeting import BudgetWatch

from .fakes import ManualClock, state


def test_the_watch_measures_steps_net_of_checkpoints_and_evaluations():
    clock = ManualClock()
    s = state(clock=clock)
    watch = BudgetWatch(100.0, state=s)
    clock.advance(9.0)  # the first iteration (allocations): not counted
    watch.end_iteration()
    for _ in range(3):
        watch.start_iteration()
        clock.advance(1.5)
        with s.timed("checkpoint"):
            clock.advance(4.0)
        watch.end_iteration()
    assert watch.measured == 3 and watch.measured_s == 4.5
    assert not watch.warmed_up()  # 3 steps, 4.5 % of the budget
    watch.start_iteration()
    clock.advance(1.5)
    watch.end_iteration()
    t = watch.timings()
    assert (t.step, t.checkpoint, t.evaluation) == (1.5, 4.0, 0.0)
    assert t.elapsed == 9 + 3 * 5.5 + 1.5
    watch.eval_estimate = 7.0
    assert watch.timings().evaluation == 7.0  # an estimate until one is measured
    with s.timed("evaluation"):
        clock.advance(3.0)
    assert watch.timings().evaluation == 3.0


def test_fit_counts_evaluations_and_checkpoints():
    from lowres_ssl.engine.budgeting import MARGIN, Schedule, Timings, fit_total_steps, overhead_s

    t = Timings(elapsed=20.0, step=1.0, evaluation=30.0, checkpoint=5.0)
    s = Schedule(done_steps=10, steps_per_epoch=100, checkpoint_every=10_000, eval_every_epochs=1,
                 final_eval=True)  # fmt: skip
    total = fit_total_steps(1000, t, s)
    available = 1000 * (1 - MARGIN) - 20
    assert (total - 10) * 1.0 + overhead_s(total, t, s) <= available
    assert (total + 1 - 10) * 1.0 + overhead_s(total + 1, t, s) > available
    # 960 - 20 = 940 s available. 699: 689 steps, 6 epoch ends (6 evaluations) and the final
    # evaluation (7 x 30 s), 6 + 2 saves (40 s) = 939 s. 700 would end epoch 7 (its evaluation
    # is the final one) with 9 saves: 690 + 210 + 45 = 945 s.
    assert total == 699
    no_eval = fit_total_steps(1000, t, Schedule(10, 100, 10_000, 0, False))
    assert no_eval > total
    assert fit_total_steps(10, t, s) == 10  # not one more step fits: the run stops where it is


def test_an_epoch_end_still_to_come_is_counted():
    """Right after an epoch's last step (before its end's evaluation and checkpoint) those are
    still to pay; once the epoch has ended they are not."""
    from lowres_ssl.engine.budgeting import Schedule, Timings, overhead_s

    t = Timings(elapsed=0.0, step=1.0, evaluation=30.0, checkpoint=5.0)
    ended = Schedule(30, 6, 10_000, 1, True)
    pending = Schedule(30, 6, 10_000, 1, True, epoch_end_pending=True)
    # One more step: the final evaluation and two saves; pending: also the end of epoch 5.
    assert overhead_s(31, t, ended) == 30 + 2 * 5
    assert overhead_s(31, t, pending) == 2 * 30 + 3 * 5
    # Stopping right there: the pending epoch end's evaluation is the final one.
    assert overhead_s(30, t, pending) == 30 + 3 * 5


def test_costs_measured_on_a_faster_machine_are_scaled_by_the_slowdown():
    """An evaluation estimated (or measured) while steps took 1 s costs twice as much once they
    take 2 s; a speed-up does not make it cheaper."""
    clock = ManualClock()
    s = state(clock=clock)
    watch = BudgetWatch(100.0, state=s)
    watch.end_iteration()  # the first, not counted

    def steps(n, seconds):
        for _ in range(n):
            watch.start_iteration()
            clock.advance(seconds)
            watch.end_iteration()

    steps(20, 1.0)
    watch.eval_estimate = 10.0
    assert watch.timings().evaluation == 10.0  # the fit: the costs' step time is 1 s
    steps(20, 2.0)
    t = watch.timings(recent=True)
    assert (t.step, t.evaluation) == (2.0, 20.0)
    with s.timed("evaluation"):  # measured now, at 2 s a step
        clock.advance(30.0)
    assert watch.timings(recent=True).evaluation == 30.0
    steps(20, 0.5)
    assert watch.timings(recent=True).evaluation == 30.0  # faster now: not cheaper
