"""What a run tells: ``metrics.jsonl`` (and TensorBoard), the progress bar or log lines.

``metrics.jsonl`` has one JSON object per logged step, per epoch and per evaluation, each with
``kind`` ("step", "epoch", or the evaluation's kind: "knn", "val"; "knn_untrained" for the
baseline before the first step) and ``step``. On resume,
lines after the checkpoint's step are dropped first, so the file reads as one uninterrupted
run. A terminal gets a progress bar; a log file or a job scheduler gets a line every
``log_every`` steps instead.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from lowres_ssl import run_layout
from lowres_ssl.device import peak_memory_gib
from lowres_ssl.engine.hooks import Part
from lowres_ssl.engine.state import State, StepDone
from lowres_ssl.engine.steps import global_mean
from lowres_ssl.files import disk_full_is_a_user_error, write_text_atomic
from lowres_ssl.models import parameter_count

if TYPE_CHECKING:
    from lowres_ssl.engine.setup import Run

log = logging.getLogger("lowres_ssl")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or Infinity
    return value


class MetricsLog:
    """Appends to ``run/metrics.jsonl``; mirrors scalars to TensorBoard when it is installed."""

    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(run_dir) / run_layout.METRICS_FILE
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the optional `tensorboard` extra is not installed
                log.debug("tensorboard is not installed; metrics go to metrics.jsonl only")
            else:
                self._tb = SummaryWriter(str(Path(run_dir) / run_layout.TENSORBOARD_DIR))

    def truncate_after(self, step: int) -> None:
        """Drop the lines logged after ``step`` (they are about to be trained again)."""
        if not (self.enabled and self.path.exists()):
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut short when the run was killed
                continue
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def last(self, kind: str) -> dict[str, Any] | None:
        """The last record of ``kind`` in the file (None: none, or not the main process)."""
        if not (self.enabled and self.path.exists()):
            return None
        found = None
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short when the run was killed
                continue
            if record.get("kind") == kind:
                found = record
        return found

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **{k: _clean(v) for k, v in values.items()}}
        fix = f"free some space, then continue with --resume --out {self.path.parent}"
        with (
            disk_full_is_a_user_error(self.path, "the metrics", fix=fix),
            open(self.path, "a", encoding="utf-8") as f,
        ):
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class Reporter(Part):
    """The metrics of a step every ``log_every`` steps (the loss terms averaged over processes,
    the learning rate, images per second of training, peak memory), of each epoch and of each
    evaluation; the progress bar (``progress_bar``) or log lines."""

    def __init__(self, state: State, accelerator, run_dir: Path, *, log_every: int,
                 skips, progress_bar: bool) -> None:  # fmt: skip
        self.accelerator, self.log_every, self.skips = accelerator, log_every, skips
        self.main = accelerator.is_main_process
        self.lines = self.main and not progress_bar  # a log file or a scheduler: lines
        self.metrics = MetricsLog(run_dir, enabled=self.main)
        self.bar = tqdm(
            total=state.total_steps if state.total_known else None,
            initial=state.progress.step,
            disable=not (self.main and progress_bar),
            unit="step",
            dynamic_ncols=True,
        )
        self.shown: dict[str, str] = {}  # the last step's values, on the bar
        self.shown_eval: dict[str, str] = {}  # the last evaluation's
        self.last_time, self.last_images = state.session_start, 0
        self.last_eval_s = 0.0  # evaluations are left out of images per second

    def after_step(self, state: State, done: StepDone) -> None:
        if state.total_known and self.bar.total != state.total_steps:  # a budget's fit
            self.bar.total = state.total_steps
        self.bar.update(1)
        step = state.progress.step
        if done.result.finite and (step % self.log_every == 0 or step == state.total_steps):
            self.log_step(state, done)

    def log_step(self, state: State, done: StepDone) -> None:
        result = done.result
        values = {"loss": result.loss}
        values.update({k: global_mean(self.accelerator, v) for k, v in result.terms.items()})
        values["lr"] = done.lr
        now, eval_s = state.clock(), state.overhead_s("evaluation")
        elapsed = now - self.last_time - (eval_s - self.last_eval_s)
        rate = (state.session_images - self.last_images) / max(elapsed, 1e-9)
        self.last_time, self.last_images, self.last_eval_s = now, state.session_images, eval_s
        p = state.progress
        mem = peak_memory_gib(self.accelerator.device)
        self.metrics.write(
            "step", p.step, {"epoch": p.epoch, **values, "images_per_s": rate, **mem}
        )
        shown = {k: f"{v:.4g}" for k, v in values.items()}
        shown["img/s"] = f"{rate:.0f}"
        if "gpu_allocated_gib" in mem:
            shown["mem"] = f"{mem['gpu_allocated_gib']:.2f}G"
        self.shown = shown
        self.bar.set_postfix({**shown, **self.shown_eval}, refresh=False)
        if self.lines:
            parts = ", ".join(f"{k} {v}" for k, v in {**shown, **self.shown_eval}.items())
            total = state.total_steps if state.total_known else "?"  # a budget's, not fitted
            log.info("step %d/%s (epoch %d): %s", p.step, total, p.epoch, parts)

    def after_epoch(self, state: State) -> None:
        p, skips = state.progress, self.skips()
        self.metrics.write(
            "epoch",
            p.step,
            {
                "epoch": p.epoch,
                "loss_mean": state.epoch_loss_mean,
                "skipped_files": len(skips),
                "bad_steps": p.bad_steps,
            },
        )
        if self.main and len(skips):
            log.info("epoch %d: %s", p.epoch, skips.summary())

    def evaluation(
        self, state: State, kind: str, record: dict[str, Any], value: float, *, show: bool = True
    ) -> None:
        """An evaluation's record (``kind``: "knn", "val"; ``value``: its metric, on the
        progress bar and the step lines with ``show``)."""
        p = state.progress
        self.metrics.write(kind, p.step, {"epoch": p.epoch, **record})
        if not show:
            return
        self.shown_eval[kind] = f"{value:.3f}"
        self.bar.set_postfix({**self.shown, **self.shown_eval}, refresh=False)

    def close_bar(self) -> None:
        self.bar.close()

    def close(self) -> None:
        self.metrics.close()


def start_line(run: Run, state: State, *, budgeted: bool) -> str:
    """The run's first line: task, preset, device, images, steps, model, start, optimizer."""
    acc, cfg, p = run.accelerator, run.cfg, state.progress
    device = acc.device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    model = acc.unwrap_model(run.model)
    parameters = parameter_count(model) / 1e6
    world = run.world
    total = "(time budget)" if budgeted and p.total_steps is None else state.total_steps
    start = "resuming " + run.resume_from.name if run.resume_from else None
    optimizer = run.optimizer.optimizer
    return (
        f"{run.task.name} {cfg.preset or '(no preset)'} on {where} ({acc.mixed_precision}, "
        f"{world} process{'es' if world > 1 else ''}): {len(run.images):,} images, "
        f"{run.steps_per_epoch} steps/epoch, steps {p.step}→{total}; "
        f"{run.task.describe(cfg, model)} ({parameters:.1f}M parameters); "
        f"{start or run.init_note or 'from scratch'}; optimizer "
        f"{getattr(optimizer, 'description', type(optimizer).__name__)}"
    )


__all__ = ["MetricsLog", "Reporter", "start_line"]
