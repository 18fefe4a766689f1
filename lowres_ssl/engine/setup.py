"""Everything before the loop, once: the run folder's check, the data, the augmentation, the
task's model, optimizer, objective, step and evaluation, ``--autofit``, the schedule; then
the run folder itself (a failed start leaves none). The result is a :class:`Run`.

Random numbers are drawn in a fixed order, so a run from the same seed trains the same
whatever the data setup did: the seed is set before the data and again before the model.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from lowres_ssl.config import Config
from lowres_ssl.data import SkipLog, make_loader
from lowres_ssl.device import MIXED_DTYPES
from lowres_ssl.engine import run_folder
from lowres_ssl.engine.autofit import PROBE_SEED, autofit
from lowres_ssl.engine.evaluating import Evaluation
from lowres_ssl.engine.task import Task
from lowres_ssl.optim import CosineSchedule, warmup_steps_for
from lowres_ssl.plan import Machine, Plan, resolve
from lowres_ssl.run_layout import CONFIG_FILE

log = logging.getLogger("lowres_ssl")


class LearningRate:
    """Linear warm-up and cosine decay over the run's total number of steps, rebuilt when the
    total changes (a time budget fits it)."""

    def __init__(self, cfg: Config, peak_lr: float, steps_per_epoch: int, total: int) -> None:
        self.peak_lr, self.steps_per_epoch = peak_lr, steps_per_epoch
        self.warmup_epochs, self.final_lr_ratio = cfg.optim.warmup_epochs, cfg.optim.final_lr_ratio
        self.schedule = self._for(total)

    def _for(self, total: int) -> CosineSchedule:
        warmup = warmup_steps_for(total, self.steps_per_epoch, self.warmup_epochs)
        return CosineSchedule(self.peak_lr, total, warmup, self.final_lr_ratio)

    def apply(self, optimizer, step: int, total: int) -> float:
        """Set the learning rate of ``step`` of ``total``; returns it."""
        if total != self.schedule.total_steps:
            self.schedule = self._for(total)
        return self.schedule.apply(optimizer, step)


@dataclass
class Run:
    """What setup built, for the loop and its parts."""

    cfg: Config
    run_dir: Path
    accelerator: Accelerator
    task: Task
    images: Any  # the task's image set
    loader: Any
    skip_log: SkipLog
    augment: torch.nn.Module
    aug_rng: torch.Generator
    model: torch.nn.Module  # prepared by Accelerate
    optimizer: Any
    objective: torch.nn.Module
    step: Any  # the task's step function
    evaluation: Evaluation | None
    learning_rate: LearningRate
    steps_per_epoch: int
    total_steps: int  # from the config (a time budget replaces it)
    resume_from: Path | None  # the checkpoint to resume from
    init_note: str | None

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def all_skips(self) -> SkipLog:
        """The files every process skipped (a collective: every process calls it)."""
        merged = SkipLog(self.cfg.data.path)
        for part in gather_object([list(self.skip_log)]):  # one process: the list itself
            merged.add(part)
        return merged

    def images_used(self, skips: SkipLog) -> int:
        """The images of the set that were not skipped while the run read them (files that
        vanished or broke mid-run; the scan's and the cache build's skips were never in it)."""
        paths = getattr(self.images, "paths", None)
        if paths is None and hasattr(self.images, "files"):
            paths = self.images.files.paths
        if not paths:
            return len(self.images)
        in_set = set(map(str, paths))
        return len(self.images) - sum(1 for s in skips if s.path in in_set)


def build(
    cfg: Config,
    run_dir: Path,
    accelerator: Accelerator,
    task: Task,
    *,
    resume: bool,
    init: str | Path | None,
    progress_bar: bool,
    autofit: bool,
) -> Run:
    """Set up a run of ``task`` as ``cfg`` says in ``run_dir``; the folder exists afterwards."""
    resume_from = run_folder.check_run_folder(run_dir, cfg, resume)
    set_seed(cfg.train.seed, device_specific=True)
    data = _data(cfg, accelerator, task, progress_bar)
    channels_last = accelerator.device.type == "cuda" and cfg.model.channels_last
    augment = task.augment(
        cfg, out_dtype=MIXED_DTYPES[accelerator.mixed_precision], channels_last=channels_last
    ).to(accelerator.device)
    # Seeded again here, so the initial weights do not depend on what the data setup drew
    # (building a cache or reusing one).
    set_seed(cfg.train.seed, device_specific=True)
    model, init_note = task.build_model(cfg, data["images"], init, resuming=resume_from is not None)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, peak_lr = task.optimizer(
        cfg, model, cfg.train.batch_size * accelerator.num_processes
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    objective = task.objective(cfg)
    evaluation = task.evaluation(
        cfg, accelerator, channels_last=channels_last, progress=progress_bar
    )
    if autofit and accelerator.device.type != "cuda":
        log.info("--autofit sizes the micro-batch for a CUDA card; nothing to fit on the CPU")
    elif autofit:
        cfg = autofit_micro_batch(cfg, accelerator, task, model, optimizer, objective, augment)
    steps_per_epoch = len(data["loader"])
    total = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    learning_rate = LearningRate(cfg, peak_lr, steps_per_epoch, total)
    _create_folder(run_dir, cfg, accelerator, task, resuming=resume_from is not None)
    aug_rng = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + accelerator.process_index)
    step = task.step_for(cfg, cfg.train.micro_batch_size)
    return Run(
        cfg, run_dir, accelerator, task, data["images"], data["loader"], data["skip_log"],
        augment, aug_rng, model, optimizer, objective, step, evaluation, learning_rate,
        steps_per_epoch, total, resume_from, init_note,
    )  # fmt: skip


def plan_run(
    cfg: Config, task: Task, run_dir: Path, *, resume: bool, machine: Machine | None = None
) -> Plan:
    """The run's plan: :func:`lowres_ssl.plan.resolve` on ``machine`` (this one by default)
    with the task's defaults, and on ``--resume`` what the run resolved when it started. The
    run and ``--dry-run`` both plan here."""
    saved_file = run_dir / CONFIG_FILE
    saved = run_folder.saved_config(run_dir) if resume and saved_file.is_file() else None
    return resolve(cfg, machine or Machine.this_one(), defaults=task.defaults, saved=saved)


def _data(cfg: Config, accelerator: Accelerator, task: Task, progress_bar: bool):
    """The task's images and this process's loader of uint8 batches on the device."""
    d, device, world = cfg.data, accelerator.device, accelerator.num_processes
    main = accelerator.is_main_process
    with accelerator.main_process_first():
        images = task.open_images(cfg, device, main and progress_bar)
    skip_log = SkipLog(d.path)
    loader = make_loader(
        images,
        cfg.train.batch_size,
        device=device,
        seed=cfg.train.seed,
        rank=accelerator.process_index,
        world_size=world,
        num_workers=d.num_workers,
        skip_log=skip_log,
    )
    return {"images": images, "loader": loader, "skip_log": skip_log}


def autofit_micro_batch(
    cfg: Config, accelerator, task: Task, model, optimizer, objective, augment
) -> Config:
    """``--autofit``: ``cfg`` with the micro-batch that real steps of the task on its own probe
    batch (:meth:`Task.probe_batch`, made into the step's input by :meth:`Task.views`) fit."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    probe = task.probe_batch(cfg, accelerator.device, generator)
    batch = cfg.train.batch_size
    micro = autofit(
        lambda m: task.step_for(cfg, m),
        model,
        objective,
        lambda: task.views(augment, probe, generator),
        accelerator=accelerator,
        optimizer=optimizer,
        batch_size=batch,
        micro_batch_size=cfg.train.micro_batch_size or batch,
    )
    chosen = micro if micro < batch else None
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=chosen))


def _create_folder(run_dir: Path, cfg: Config, accelerator, task: Task, resuming: bool) -> None:
    """Everything is set up: only now does the run folder appear."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run_folder.create(run_dir, cfg, resuming=resuming)
        task.write_records(run_dir)
    accelerator.wait_for_everyone()


__all__ = ["LearningRate", "Run", "autofit_micro_batch", "build", "plan_run"]
