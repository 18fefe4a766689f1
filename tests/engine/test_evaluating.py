"""The evaluator: when it runs, the best result kept, what the summary says."""

from torch import nn

from lowres_ssl.engine.evaluating import Evaluation, Evaluator

from .fakes import OneProcess, state


class Scripted(Evaluation):
    kind, key = "val", "val_top1"

    def __init__(self, values, every_epochs=1, keeps_best=True):
        self.values, self.every_epochs, self.keeps_best = list(values), every_epochs, keeps_best

    def run(self, model):
        return {"val_top1": self.values.pop(0)}

    def line(self, step, record):
        return f"step {step}: {record['val_top1']}"


class Told:
    def __init__(self):
        self.records = []

    def evaluation(self, state, kind, record, value):
        self.records.append((state.progress.step, kind, value))


def epochs(evaluator, s, n, steps_per_epoch=5):
    for _ in range(n):
        s.progress.step += steps_per_epoch
        s.progress.epoch += 1
        evaluator.after_epoch(s)


def test_due_evaluations_run_and_only_an_improvement_is_kept_as_best():
    best, told, s = [], Told(), state()
    evaluator = Evaluator(Scripted([0.3, 0.5, 0.4]), OneProcess(), nn.Identity(), told,
                          lambda model, record: best.append(record["step"]))  # fmt: skip
    epochs(evaluator, s, 3)
    assert told.records == [(5, "val", 0.3), (10, "val", 0.5), (15, "val", 0.4)]
    assert best == [5, 10]
    p = s.progress
    assert (p.best_value, p.best_step, p.best_epoch, p.eval_value, p.eval_step) == (
        0.5,
        10,
        2,
        0.4,
        15,
    )
    assert not evaluator.final_due(s)
    s.progress.step += 1
    assert evaluator.final_due(s)
    assert evaluator.summary(s, "val_top1") == {
        "val_top1": 0.4, "best_val_top1": 0.5, "best_step": 10, "best_epoch": 2,
    }  # fmt: skip
    assert s.timings["evaluation"] == [0, 0, 0]  # each evaluation timed apart from the steps


def test_every_other_epoch_at_the_end_only_or_off():
    s, told = state(), Told()
    evaluator = Evaluator(Scripted([0.1, 0.2, 0.3], every_epochs=2, keeps_best=False),
                          OneProcess(), nn.Identity(), told, lambda m, r: None)  # fmt: skip
    epochs(evaluator, s, 4)
    assert [step for step, _, _ in told.records] == [10, 20]
    assert evaluator.summary(s, "knn_top1") == {"knn_top1": 0.2}  # no best: it only observes
    evaluator.at_end_only()
    epochs(evaluator, s, 2)
    assert len(told.records) == 2 and evaluator.final_due(s)
    evaluator.turn_off()
    assert not evaluator.final_due(s) and evaluator.every_epochs == 0
