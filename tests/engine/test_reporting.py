"""What a run reports: step lines every log_every steps, images per second of training only,
the epoch's line, evaluations."""

import json

from lowres_ssl.data import SkipLog
from lowres_ssl.engine.reporting import Reporter

from .fakes import ManualClock, OneProcess, done, state


def test_steps_every_log_every_and_images_per_second_without_evaluations(tmp_path):
    clock = ManualClock()
    s = state(total=4, clock=clock)
    reporter = Reporter(s, OneProcess(), tmp_path, log_every=2, skips=lambda: SkipLog(),
                        progress_bar=False)  # fmt: skip
    for step in range(1, 5):
        clock.advance(1.0)
        if step == 3:  # an evaluation of 10 s between steps 2 and 3
            with s.timed("evaluation"):
                clock.advance(10.0)
            reporter.evaluation(s, "knn", {"knn_top1": 0.25}, 0.25)
        d = done(loss=float(step), images=8)
        s.count_step(d)
        reporter.after_step(s, d)
    s.count_epoch()
    reporter.after_epoch(s)
    reporter.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in lines] == [
        ("step", 2), ("knn", 2), ("step", 4), ("epoch", 4),
    ]  # fmt: skip
    first, _, second, epoch = lines
    assert first["images_per_s"] == 16 / 2.0 and second["images_per_s"] == 16 / 2.0
    assert second["loss"] == 4.0 and second["mmd"] == 2.0 and second["lr"] == 0.1
    assert epoch["loss_mean"] == 2.5 and epoch["skipped_files"] == 0


def test_resume_drops_the_lines_after_the_checkpoint(tmp_path):
    s = state()
    reporter = Reporter(s, OneProcess(), tmp_path, log_every=1, skips=lambda: SkipLog(),
                        progress_bar=False)  # fmt: skip
    for _ in range(5):
        d = done()
        s.count_step(d)
        reporter.after_step(s, d)
    (tmp_path / "metrics.jsonl").open("a").write('{"kind": "step", "st')  # killed mid-line
    reporter.metrics.truncate_after(3)
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    reporter.close()
