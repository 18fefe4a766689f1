"""Evaluating at epoch ends: the task's evaluation when due, the best result kept.

A task hands the engine an :class:`Evaluation` (pre-training: the online kNN monitor;
fine-tuning: validation top-1 / top-5); the :class:`Evaluator` runs it when it is due and at
the end of the run, records its metric in the progress (so a resumed run keeps comparing
against the best), reports it, and has the task keep the best result's model. An evaluation
that asks for it (``untrained``) also runs once before the first step: the baseline that the
last evaluation's line and the summary show beside the result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lowres_ssl.device import synchronize
from lowres_ssl.engine.hooks import Part
from lowres_ssl.engine.state import State

log = logging.getLogger("lowres_ssl")

#: An evaluation is estimated as this much slower per image than a bare forward pass
#: (decoding, the kNN vote, gathering).
EVAL_OVERHEAD = 1.25


class Evaluation:
    """What a task evaluates: ``due(epoch)``, ``run(model)`` → a record with ``key`` in it,
    ``line(step, record)`` for the log; ``images``: how many images one evaluation forwards
    (a time budget estimates its cost from it); ``optional``: may be turned off to fit a
    time budget; ``keeps_best``: the best result's model is the run's result (the summary
    names its value, step and epoch); ``untrained``: also evaluate the model before its first
    step (the baseline; its record's kind is ``<kind>_untrained``, at step 0)."""

    kind = "eval"
    key = "top1"
    optional = True
    keeps_best = False
    untrained = False
    every_epochs = 1
    images = 0

    def due(self, epoch: int) -> bool:
        return self.every_epochs > 0 and epoch % self.every_epochs == 0

    def run(self, model: nn.Module) -> dict[str, Any]:
        raise NotImplementedError

    def line(self, step: int, record: dict[str, Any]) -> str:
        raise NotImplementedError


class Evaluator(Part):
    """Runs ``evaluation`` (None: nothing to evaluate) at the epoch ends it is due and at the
    end; ``on_best(model, record)`` on the main process whenever the metric improves."""

    def __init__(
        self,
        evaluation: Evaluation | None,
        accelerator,
        model: nn.Module,
        reporter,
        on_best: Callable[[nn.Module, dict[str, Any]], None],
    ) -> None:
        self.evaluation = evaluation
        self.accelerator, self.model, self.reporter = accelerator, model, reporter
        self.on_best = on_best
        self.untrained_value: float | None = None  # the baseline's metric, when there is one

    @property
    def every_epochs(self) -> int:
        return self.evaluation.every_epochs if self.evaluation is not None else 0

    def turn_off(self) -> None:
        self.evaluation = None

    def at_end_only(self) -> None:
        if self.evaluation is not None:
            self.evaluation.every_epochs = 0

    def after_epoch(self, state: State) -> None:
        if self.evaluation is not None and self.evaluation.due(state.progress.epoch):
            self.evaluate(state)

    def before_training(self, state: State) -> None:
        """The baseline, when the evaluation asks for one: a fresh run evaluates the model
        before its first step (a record of kind ``<kind>_untrained`` at step 0); a resumed run
        reads that record back from its metrics."""
        e = self.evaluation
        if e is None or not e.untrained:
            return
        kind = f"{e.kind}_untrained"
        if state.progress.step > 0:
            logged = self.reporter.metrics.last(kind)  # None on the other processes
            self.untrained_value = None if logged is None else logged.get(e.key)
            return
        unwrapped = self.accelerator.unwrap_model(self.model)
        with state.timed("evaluation"):
            record = e.run(unwrapped)
        self.untrained_value = record[e.key]
        self.reporter.evaluation(state, kind, record, self.untrained_value, show=False)
        if self.accelerator.is_main_process:
            log.info("%s (untrained)", e.line(state.progress.step, record))

    def final_due(self, state: State) -> bool:
        """Whether the end of the run still needs an evaluation of its last step."""
        return self.evaluation is not None and state.progress.eval_step != state.progress.step

    def evaluate(self, state: State) -> None:
        e, p = self.evaluation, state.progress
        unwrapped = self.accelerator.unwrap_model(self.model)
        synchronize(self.accelerator.device)  # the last step's queued kernels are the step's
        with state.timed("evaluation"):
            record = e.run(unwrapped)
        value = record[e.key]
        p.eval_step, p.eval_value = p.step, value
        self.reporter.evaluation(state, e.kind, record, value)
        main = self.accelerator.is_main_process
        if p.best_value is None or value > p.best_value:
            p.best_value, p.best_step, p.best_epoch = value, p.step, p.epoch
            if main:
                self.on_best(unwrapped, {**record, "step": p.step})
        if main:
            base = self.untrained_value
            log.info(
                e.line(p.step, record if base is None else {**record, f"untrained_{e.key}": base})
            )

    def cost_s(self, state: State, views) -> float:
        """The estimated seconds of one evaluation: its images at the measured seconds per
        image of a forward pass in eval mode on (up to 64 of) the step's ``views``."""
        if self.evaluation is None:
            return 0.0
        unwrapped = self.accelerator.unwrap_model(self.model)
        x = views.sample_input(64)
        was = unwrapped.training
        unwrapped.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                synchronize(x.device)  # the last step's queued kernels are not the forward's
                t0 = state.clock()
                unwrapped(x)
                synchronize(x.device)
                per_image = (state.clock() - t0) / x.shape[0]
        finally:
            unwrapped.train(was)
        return self.evaluation.images * per_image * EVAL_OVERHEAD

    def summary(self, state: State, metric: str) -> dict[str, Any]:
        """The last result under ``metric`` (the task's name for it), the baseline's under
        ``untrained_<metric>`` and, for an evaluation that keeps the best, the best result's
        value, step and epoch."""
        p = state.progress
        out: dict[str, Any] = {} if p.eval_value is None else {metric: p.eval_value}
        if self.untrained_value is not None:
            out[f"untrained_{metric}"] = self.untrained_value
        if p.eval_value is not None and self.evaluation is not None and self.evaluation.keeps_best:
            out.update(
                {f"best_{metric}": p.best_value, "best_step": p.best_step,
                 "best_epoch": p.best_epoch}
            )  # fmt: skip
        return out


__all__ = ["EVAL_OVERHEAD", "Evaluation", "Evaluator"]
