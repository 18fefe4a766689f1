"""The training loop, and a run from its setup to its summary.

:func:`train` runs one process's share of a run (``accelerate launch`` starts several, plain
``python`` one) of a task (:class:`~lowres_ssl.engine.task.Task`). Reading order:

1. :func:`lowres_ssl.engine.setup.build`: the run folder's check, data, augmentation, the
   task's model, optimizer, objective, step and evaluation, ``--autofit``, the schedule;
2. :func:`start`: the parts beside the loop (:mod:`.hooks`), in the order they hear each event:
   reporting, the non-finite guard, the caller's ``on_step``, evaluating, checkpointing, the
   time budget; a resumed run's progress;
3. :func:`run_loop`: per step the learning rate, the task's views, the task's step, then
   ``hooks.after_step``; at each epoch's end ``hooks.after_epoch``; Ctrl-C or SIGTERM stops
   after a step;
4. :func:`finish`: the last evaluation and checkpoint, the task's result files,
   ``summary.json``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from lowres_ssl.config import Config
from lowres_ssl.data.loader import MIN_TRAIN_BATCH
from lowres_ssl.device import emulate_card, peak_memory_gib, process_age_s, use_the_cores
from lowres_ssl.durations import parse_budget
from lowres_ssl.engine import run_folder, setup
from lowres_ssl.engine.budgeting import TimeBudget
from lowres_ssl.engine.checkpointing import Checkpointer
from lowres_ssl.engine.evaluating import Evaluator
from lowres_ssl.engine.hooks import Hooks, StepCallback
from lowres_ssl.engine.length_check import LengthCheck
from lowres_ssl.engine.reporting import Reporter, start_line
from lowres_ssl.engine.state import UNFITTED, Progress, State, StepDone
from lowres_ssl.engine.stopping import (
    NonFiniteGuard,
    Stopped,
    StopRequest,
    largest_over_processes,
    out_of_memory_message,
)
from lowres_ssl.engine.task import Task
from lowres_ssl.errors import UserError
from lowres_ssl.length import Choice
from lowres_ssl.run_layout import SKIPPED_FILE

log = logging.getLogger("lowres_ssl")


def train(
    cfg: Config,
    out: str | Path,
    task: Task,
    *,
    resume: bool = False,
    init: str | Path | None = None,
    progress_bar: bool = True,
    on_step: Callable[[Progress, dict[str, float]], None] | None = None,
    autofit: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Train ``task`` as ``cfg`` says into the run folder ``out``; returns the summary.

    ``autofit``: before training, a few real steps lower the micro-batch until they fit the
    card (:mod:`.autofit`). ``clock``: the time source of the time budget
    (``train.time_budget``) and the reported wall time (tests inject one). ``progress_bar``:
    a progress bar on stderr; without it, a log line every ``log_every`` steps (what a log
    file or a job scheduler wants). ``on_step(progress, values)`` is called after every step
    (values: the loss and the learning rate).
    """
    started = clock()
    if clock is time.perf_counter:  # a time budget counts from the start of the command
        started -= process_age_s()
    run_dir = Path(out).expanduser()
    planned = setup.plan_run(cfg, task, run_dir, resume=resume)
    if problem := planned.hardware_problem():
        raise UserError(problem)
    accelerator = Accelerator(mixed_precision=planned.mixed_precision, cpu=not planned.machine.cuda)
    if accelerator.num_processes != planned.machine.processes:  # a launcher without WORLD_SIZE
        machine = planned.machine.with_processes(accelerator.num_processes)
        planned = setup.plan_run(cfg, task, run_dir, resume=resume, machine=machine)
    if accelerator.is_main_process:
        for note in planned.notes:
            log.info(note)
    # After Accelerator has chosen this process's card (each rank its own), before training
    # allocates: an emulated card (LOWRES_SSL_GPU_GIB) is capped there.
    if accelerator.device.type == "cuda" and (note := emulate_card(accelerator.device)):
        log.info(note)
    if accelerator.num_processes > 1:  # a default run name holds a timestamp: the main's
        run_dir = Path(broadcast_object_list([str(run_dir)])[0])
    if accelerator.device.type == "cpu" and (note := use_the_cores(accelerator.num_processes)):
        log.info(note)
    with run_folder.exclusive(run_dir, accelerator):
        run = setup.build(
            planned.cfg, run_dir, accelerator, task, resume=resume, init=init,
            progress_bar=progress_bar, autofit=autofit,
        )  # fmt: skip
        if resume and run.resume_from is None:
            log.info("--resume: no checkpoint yet in %s; starting from the beginning", run_dir)
        state, parts = start(run, clock, started, progress_bar, on_step, planned.length)
        try:
            parts.evaluator.before_training(state)  # the untrained baseline (eval.untrained)
            stopped = run_loop(run, state, parts.hooks, budgeted=parts.budget is not None)
        finally:
            parts.reporter.close_bar()
        return finish(run, state, parts, stopped)


@dataclass
class Parts:
    """The parts beside the loop, and the hooks that call them."""

    reporter: Reporter
    evaluator: Evaluator
    checkpointer: Checkpointer
    budget: TimeBudget | None
    hooks: Hooks


def start(
    run: setup.Run,
    clock,
    started: float,
    progress_bar: bool,
    on_step,
    length: Choice | None = None,
) -> tuple[State, Parts]:
    """The session's state (a resumed run's progress, the total of steps) and its parts
    (``length``: the plan's choice for long runs on photos, checked once a budget is fitted)."""
    cfg, acc, t = run.cfg, run.accelerator, run.cfg.train
    checkpointer = Checkpointer(
        acc, run.run_dir, every=t.checkpoint_every, keep=t.keep_checkpoints,
        aug_rng=run.aug_rng, images=len(run.images), skips=run.all_skips,
    )  # fmt: skip
    progress = checkpointer.resume(run.resume_from) if run.resume_from else Progress()
    budget_s = parse_budget(t.time_budget) if t.time_budget else None
    total = run.total_steps
    if progress.total_steps is not None:  # a budgeted run keeps the total it chose
        total = progress.total_steps
    elif budget_s is not None:  # provisional: the warm-up measures, then the budget fits it
        total = UNFITTED  # the budget decides the total: not the epochs, not max_steps
    state = State(progress, total, clock, command_start=started)
    reporter = Reporter(state, acc, run.run_dir, log_every=t.log_every, skips=run.all_skips,
                        progress_bar=progress_bar)  # fmt: skip
    if run.resume_from is not None:
        reporter.metrics.truncate_after(progress.step)
    if acc.is_main_process:
        log.info(start_line(run, state, budgeted=budget_s is not None))

    def on_best(model, record: dict) -> None:
        run.task.on_best(model, run.run_dir, cfg, record)

    evaluator = Evaluator(run.evaluation, acc, run.model, reporter, on_best)
    budget = None
    if budget_s is not None:
        budget = TimeBudget(
            budget_s, state, accelerator=acc, evaluator=evaluator,
            checkpointer=checkpointer, steps_per_epoch=run.steps_per_epoch,
            checkpoint_every=t.checkpoint_every, images_per_step=t.batch_size * run.world,
        )  # fmt: skip
    parts = [reporter, NonFiniteGuard(t.max_bad_steps, getattr(acc, "scaler", None))]
    parts += [StepCallback(on_step)] if on_step is not None else []
    parts += [evaluator, checkpointer] + ([budget] if budget is not None else [])
    if budget is not None and length is not None:  # after the budget: its fitted total
        check = LengthCheck(length, budget.images_per_step, main_process=acc.is_main_process)
        parts.append(check)
    return state, Parts(reporter, evaluator, checkpointer, budget, Hooks(parts))


def run_loop(run: setup.Run, state: State, hooks: Hooks, *, budgeted: bool) -> int | None:
    """Train until the total number of steps (or the epochs, without a time budget); returns
    the signal that stopped it (Ctrl-C, SIGTERM: after a step, on every process at the same
    one), or None. A step that runs out of GPU memory is a one-line error."""
    p, epochs, acc = state.progress, run.cfg.train.epochs, run.accelerator
    run.model.train()
    with StopRequest() as stop:
        while (budgeted or p.epoch < epochs) and p.step < state.total_steps:
            completed = True
            for batch in run.loader.iterate(p.epoch, start=p.batch, keep_empty=True):
                if p.step >= state.total_steps or stop.agreed(acc):
                    completed = False
                    break
                if too_small(batch, acc):
                    state.skip_batch(batch.position)
                    continue
                lr = run.learning_rate.apply(run.optimizer, p.step, state.total_steps)
                views = run.task.views(run.augment, batch, run.aug_rng)
                try:
                    result = run.step(
                        run.model, run.objective, views, accelerator=acc, optimizer=run.optimizer
                    )
                except torch.cuda.OutOfMemoryError:
                    raise UserError(out_of_memory_message(run.cfg)) from None
                done = StepDone(result, lr, batch.images.shape[0] * run.world, views)
                state.count_step(done)
                hooks.after_step(state, done)
            if completed:
                state.count_epoch()
                hooks.after_epoch(state)
            if stop.agreed(acc):
                break
        return stop.signum


def too_small(batch, accelerator) -> bool:
    """Whether a batch that bad files left with fewer than two images (on any process: a
    collective where there are several) is skipped: BatchNorm and the losses need two."""
    short = batch.images.shape[0] < MIN_TRAIN_BATCH
    if accelerator.num_processes > 1:
        short = bool(largest_over_processes(accelerator, int(short)))
    if short and accelerator.is_main_process:
        log.warning(
            "batch %d of the epoch has %d usable image(s) (its other files are bad, listed in "
            "skipped_files.txt): skipped", batch.position, batch.images.shape[0],
        )  # fmt: skip
    return short


def finish(run: setup.Run, state: State, parts: Parts, stopped: int | None) -> dict[str, Any]:
    """The last evaluation and checkpoint; a run stopped by a signal raises :class:`Stopped`
    (a KeyboardInterrupt), a finished one writes the task's result files and ``summary.json``
    and returns the summary."""
    p, main = state.progress, run.accelerator.is_main_process
    final_eval = stopped is None and parts.evaluator.final_due(state)
    if final_eval:  # the end of the run (saved below, so a resume does not evaluate again)
        parts.evaluator.evaluate(state)
    wall = state.clock() - state.session_start
    if parts.checkpointer.unsaved(state) or final_eval:
        parts.checkpointer.save(state)
    p.wall_s = state.base_wall_s + wall
    if stopped is not None:
        parts.reporter.close()
        if main:
            log.warning(
                "stopped at step %d; checkpoint saved. Continue with --resume --out %s",
                p.step, run.run_dir,
            )  # fmt: skip
        raise Stopped(stopped)
    finished = run_folder.read_summary(run.run_dir) if p.step == state.start_step else None
    if finished is not None:  # resumed a finished run: nothing was trained, keep its files
        parts.reporter.close()
        if main:
            log.info("nothing to train: %s already reached step %d", run.run_dir, p.step)
        return finished
    skips = run.all_skips()
    with state.timed("export"):
        if main:
            unwrapped = run.accelerator.unwrap_model(run.model)
            run.task.finish(unwrapped, run.run_dir, run.cfg, best_saved=p.best_step >= 0)
    summary = _summary(run, state, parts, wall, skipped=len(skips))
    if main:
        skips.write(run.run_dir / SKIPPED_FILE)
        run_folder.write_summary(run.run_dir, summary)
        log.info(
            "done: %d steps, final loss %.4g, %.0f images/s; %s; run folder %s",
            p.step, p.last_loss or math.nan, summary["images_per_s"],
            skips.summary(used=run.images_used(skips)), run.run_dir,
        )  # fmt: skip
        if parts.budget is not None:
            log.info(parts.budget.end_line(summary))
    parts.reporter.close()
    run.accelerator.wait_for_everyone()
    return summary


def _summary(run: setup.Run, state: State, parts: Parts, wall: float, skipped: int) -> dict:
    p, acc = state.progress, run.accelerator
    device = acc.device
    summary = {
        "final_loss": p.last_loss,
        "steps": p.step,
        "epochs": p.epoch,
        "images": p.images,
        "images_per_s": state.session_images / max(wall, 1e-9),
        "wall_time_s": p.wall_s,
        "bad_steps": p.bad_steps,
        "skipped_files": skipped,
        "precision": acc.mixed_precision,
        "processes": run.world,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "optimizer": getattr(run.optimizer.optimizer, "description", ""),
        **run.task.summary(acc.unwrap_model(run.model)),
        **peak_memory_gib(device),
        **parts.evaluator.summary(state, run.task.metric),
    }
    if parts.budget is not None:
        summary.update(parts.budget.summary(state))
    return summary


__all__ = ["Parts", "finish", "run_loop", "start", "train"]
