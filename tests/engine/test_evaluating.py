"""The evaluator: when it runs, the best result kept, what the summary says."""

import contextlib

from torch import nn

from lowres_ssl.engine.evaluating import EVAL_OVERHEAD, Evaluation, Evaluator

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


class QueuedCard:
    """A CUDA card as a clock sees it: kernels launched now run later, and
    ``torch.cuda.synchronize`` waits for them (the clock moves by the queued seconds)."""

    def __init__(self, clock, queued_s: float) -> None:
        self.clock, self.queued_s = clock, queued_s

    def synchronize(self, device=None) -> None:
        self.clock.advance(self.queued_s)
        self.queued_s = 0.0


class TimedForward(nn.Module):
    """A forward pass whose kernels take 1 ms per image on the card."""

    def __init__(self, card: QueuedCard) -> None:
        super().__init__()
        self.card = card

    def forward(self, x):
        self.card.queued_s += 0.001 * x.shape[0]


def test_the_evaluation_cost_leaves_out_the_last_steps_queued_kernels(monkeypatch):
    """On CUDA the last step's backward and update are still queued when the cost is timed:
    without a synchronize before the first clock read they were counted as the forward's
    (here 5 s queued against 64 ms of forward), and the budget reserved too much."""
    import torch

    from .fakes import ManualClock

    clock = ManualClock()
    card = QueuedCard(clock, queued_s=5.0)
    monkeypatch.setattr(torch.cuda, "synchronize", card.synchronize)
    images = type("OnTheCard", (), {"device": torch.device("cuda"), "shape": (64,)})()
    views = type("Views", (), {"sample_input": lambda self, n: images})()
    accelerator = OneProcess()
    accelerator.autocast = lambda: contextlib.nullcontext()
    evaluation = Scripted([0.5])
    evaluation.images = 1000
    evaluator = Evaluator(evaluation, accelerator, TimedForward(card), Told(), lambda m, r: None)
    cost = evaluator.cost_s(state(clock=clock), views)
    assert abs(cost - 1000 * 0.001 * EVAL_OVERHEAD) < 1e-9, cost
