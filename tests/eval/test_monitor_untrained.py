"""The untrained baseline (``eval.untrained``): the kNN of the backbone before its first step,
logged, in the summary and beside the last kNN; training is the same with it as without."""

from __future__ import annotations

import json
import logging
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lowres_ssl.config import from_dict
from lowres_ssl.engine.evaluating import Evaluation, Evaluator
from lowres_ssl.engine.stopping import Stopped
from lowres_ssl.tasks import train
from tests.engine.fakes import OneProcess, state


class Counted(Evaluation):
    kind, key, keeps_best = "knn", "knn_top1", False

    def __init__(self, untrained: bool) -> None:
        self.untrained, self.runs = untrained, 0

    def run(self, model):
        self.runs += 1
        return {"knn_top1": 0.5 + self.runs / 10}

    def line(self, step, record):
        return f"step {step}: {record['knn_top1']:.1f} beside {record.get('untrained_knn_top1')}"


class Logged:
    """A reporter whose metrics file holds ``saved`` records."""

    def __init__(self, saved=()):
        self.records, self.saved = [], list(saved)
        self.metrics = self

    def evaluation(self, state, kind, record, value, show=True):
        self.records.append((state.progress.step, kind, value, show))

    def last(self, kind):
        return next((r for r in reversed(self.saved) if r["kind"] == kind), None)


def test_a_fresh_run_evaluates_before_its_first_step_and_shows_it_beside_the_last(caplog):
    e, reporter, s = Counted(untrained=True), Logged(), state()
    evaluator = Evaluator(e, OneProcess(), nn.Identity(), reporter, lambda m, r: None)
    with caplog.at_level(logging.INFO, logger="lowres_ssl"):
        evaluator.before_training(s)
        p = s.progress
        assert (p.eval_step, p.eval_value, p.best_value) == (-1, None, None)  # not a result
        s.progress.step = 7
        evaluator.evaluate(s)
    assert reporter.records == [(0, "knn_untrained", 0.6, False), (7, "knn", 0.7, True)]
    assert caplog.messages[-1] == "step 7: 0.7 beside 0.6"
    assert evaluator.summary(s, "knn_top1") == {"knn_top1": 0.7, "untrained_knn_top1": 0.6}


def test_a_resumed_run_reads_its_baseline_back_and_none_is_run_unless_asked():
    saved = [{"kind": "knn_untrained", "step": 0, "knn_top1": 0.25}, {"kind": "knn", "step": 4}]
    e, s = Counted(untrained=True), state()
    s.progress.step = 4
    evaluator = Evaluator(e, OneProcess(), nn.Identity(), Logged(saved), lambda m, r: None)
    evaluator.before_training(s)
    assert e.runs == 0 and evaluator.summary(s, "knn_top1") == {"untrained_knn_top1": 0.25}
    off = Counted(untrained=False)
    evaluator = Evaluator(off, OneProcess(), nn.Identity(), Logged(), lambda m, r: None)
    evaluator.before_training(state())
    assert off.runs == 0 and evaluator.summary(state(), "knn_top1") == {}


def _digits(**eval_section):
    """4 steps of 8 digits at 16 px; a kNN check on 200 / 100 of them."""
    return from_dict(
        {
            "data": {"path": "digits", "load_size": 16, "cache": "none", "num_workers": 0},
            "model": {"backbone": "resnet18", "projector": "64-128"},
            "optim": {"state_bits": 32},  # 8-bit state is slow on the CPU
            "train": {"epochs": 1, "max_steps": 4, "batch_size": 8, "precision": "fp32",
                      "log_every": 1, "checkpoint_every": 2},
            "eval": {"max_train_images": 200, "max_test_images": 100, "k": 20, **eval_section},
        }
    )  # fmt: skip


def _records(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_the_baseline_leaves_training_bit_identical(tmp_path, caplog):
    plain = train(_digits(), tmp_path / "plain", progress_bar=False)
    with caplog.at_level(logging.INFO, logger="lowres_ssl"):
        based = train(_digits(untrained=True), tmp_path / "based", progress_bar=False)
    losses = [[r["loss"] for r in _records(tmp_path / run, "step")] for run in ("plain", "based")]
    assert len(losses[0]) == 4 and losses[0] == losses[1]  # bit for bit
    a = load_file(str(tmp_path / "plain" / "backbone.safetensors"))
    b = load_file(str(tmp_path / "based" / "backbone.safetensors"))  # BatchNorm's statistics too
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not _records(tmp_path / "plain", "knn_untrained") and "untrained_knn_top1" not in plain
    (baseline,) = _records(tmp_path / "based", "knn_untrained")
    assert baseline["step"] == 0 and based["untrained_knn_top1"] == baseline["knn_top1"]
    assert based["knn_top1"] == plain["knn_top1"]
    final = next(m for m in reversed(caplog.messages) if "kNN top-1" in m)
    assert f"untrained backbone {baseline['knn_top1']:.3f}" in final


def test_a_resumed_run_keeps_its_baseline(tmp_path):
    def stop_at_2(progress, values):
        if progress.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: stop after this step

    run = tmp_path / "run"
    with pytest.raises(Stopped):
        train(_digits(untrained=True), run, progress_bar=False, on_step=stop_at_2)
    (before,) = _records(run, "knn_untrained")
    summary = train(_digits(untrained=True), run, resume=True, progress_bar=False)
    assert _records(run, "knn_untrained") == [before]  # not evaluated again
    assert summary["untrained_knn_top1"] == before["knn_top1"]
    saved = json.loads((run / "summary.json").read_text())
    assert saved["untrained_knn_top1"] == before["knn_top1"]


def test_the_baseline_without_a_test_set_says_so(tmp_path, caplog):
    """``eval.untrained: true`` where the run has no kNN check (a folder without a test set):
    one line says why nothing is measured, instead of silence."""
    from PIL import Image

    from tests.tiny import tiny

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        Image.new("RGB", (16, 16), (i * 30, 0, 0)).save(folder / f"{i}.png")
    cfg = tiny(folder, eval={"untrained": True}, train={"max_steps": 1, "epochs": 1})
    with caplog.at_level(logging.INFO, logger="lowres_ssl"):
        summary = train(cfg, tmp_path / "run", progress_bar=False)
    assert any("eval.untrained: no kNN check" in r.getMessage() for r in caplog.records)
    assert "untrained_knn_top1" not in summary
