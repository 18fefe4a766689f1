"""The training loop: images → views → model → objective → 8-bit optimizer.

:func:`train` runs one process's share of a run (``accelerate launch`` starts several, plain
``python`` one) of a task (:mod:`.tasks`): self-supervised pre-training (backbone, projector,
two views, the SSL objective) or supervised fine-tuning (backbone, linear head, one view,
cross-entropy). Reading order, as in ``docs/design.md`` §1 and §3:

1. the run folder (:mod:`.run_folder`): a new one gets ``config.yaml``; ``resume`` continues
   the latest checkpoint; a folder holding another run is never overwritten;
2. data (the task opens it; :mod:`lowres_ssl.data`): uint8 batches on the device, this
   process's slice of each global batch, in an order that depends only on (seed, epoch);
3. augmentation (:mod:`lowres_ssl.augment`) with its own random generator, saved in checkpoints;
4. the task's model and optimizer, prepared by Accelerate (device, mixed precision, DDP); its
   evaluation (the kNN monitor, :mod:`lowres_ssl.eval.monitor`, or validation);
5. the loop: per step the learning rate, the views, the step (:mod:`.steps`: the loss in
   fp32, backward, optimizer; a non-finite loss skips it), then the bookkeeping beside the loop
   (``after_step``: metrics every ``log_every`` steps, a checkpoint every ``checkpoint_every``;
   ``end_epoch``: the epoch's line, the evaluation, a checkpoint; with a time budget
   ``keep_to_budget``: the total fitted to it, :mod:`.budget`); Ctrl-C checkpoints too;
6. the end: the task's weights (``backbone.safetensors``, or ``classifier*.safetensors``),
   ``summary.json``, ``skipped_files.txt``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from tqdm.auto import tqdm

from lowres_ssl import fit
from lowres_ssl.config import Config
from lowres_ssl.data import SkipLog, make_loader
from lowres_ssl.device import (
    MIXED_DTYPES,
    card_memory_gib,
    peak_memory_gib,
    process_age_s,
    resolve_precision,
    use_the_cores,
)
from lowres_ssl.engine import budget, checkpoint, run_folder
from lowres_ssl.engine.autofit import autofit as run_autofit
from lowres_ssl.engine.budget import parse_budget
from lowres_ssl.engine.checkpoint import Progress
from lowres_ssl.engine.metrics import MetricsLog
from lowres_ssl.engine.steps import LabeledViews, StepResult, global_mean
from lowres_ssl.engine.tasks import FineTuning, Pretraining
from lowres_ssl.errors import UserError
from lowres_ssl.losses import objective_from_settings
from lowres_ssl.models import parameter_count, projector_out_dim
from lowres_ssl.optim import CosineSchedule, warmup_steps_for
from lowres_ssl.weights import BACKBONE_FILE

log = logging.getLogger("lowres_ssl")

#: The provisional total of a time-budgeted run until its warm-up has measured a step.
_UNFITTED = 10**9

# ---------------------------------------------------------------------------------------------
# Objective, Ctrl-C and out-of-memory


def make_objective(cfg: Config) -> torch.nn.Module:
    """The objective of ``cfg.loss``; SFRIK's λ, when unset, follows q (:func:`default_lam`).
    Settings that cannot work are a :class:`UserError`."""
    loss = cfg.loss
    return objective_from_settings(
        loss.name,
        lam=loss.lam,
        kernel_weights=loss.kernel_weights,
        mmd_path=loss.mmd_path,
        options=loss.options,
        q=projector_out_dim(cfg.model.projector),
    )


class _StopRequest:
    """The first Ctrl-C asks the loop to stop at the end of the step (and checkpoint); a
    second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping after this step (Ctrl-C again to stop at once)")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _oom_message(cfg: Config) -> str:
    from lowres_ssl.presets import next_smaller

    smaller = next_smaller(cfg.preset)
    smaller = f", --preset {smaller}" if smaller else ""
    batch = cfg.train.batch_size
    micro = min(cfg.train.micro_batch_size or batch, batch)
    return (
        f"CUDA out of memory with preset {cfg.preset or '(none)'} at batch {batch} per process "
        f"(micro-batch {micro}): try --set train.micro_batch_size={max(1, micro // 2)} or "
        f"--autofit (a smaller micro-batch keeps the objective: the regulariser still sees "
        f"{batch}; a smaller batch changes it){smaller}, or --set model.grad_checkpointing=true;"
        " the last checkpoint is kept"
    )


# ---------------------------------------------------------------------------------------------
# The run


def train(
    cfg: Config,
    out: str | Path,
    *,
    task: Pretraining | FineTuning | None = None,
    resume: bool = False,
    init: str | Path | None = None,
    progress_bar: bool = True,
    on_step: Callable[[Progress, dict[str, float]], None] | None = None,
    autofit: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Train as ``cfg`` says into the run folder ``out``; returns the summary.

    ``task``: what is trained (:mod:`.tasks`): self-supervised pre-training (the default) or
    supervised fine-tuning. ``autofit``: before training, a few real steps lower the
    micro-batch until they fit the card (:mod:`.autofit`). ``clock``: the time source of the
    time budget (``train.time_budget``) and the reported wall time (tests inject one).

    ``progress_bar``: a progress bar on stderr; without it, a log line every ``log_every``
    steps (what a log file or a job scheduler wants). ``on_step(progress, values)`` is called
    after every step (values: loss terms and lr).
    """
    started = clock()
    if clock is time.perf_counter:  # a time budget counts from the start of the command
        started -= process_age_s()
    task = task if task is not None else Pretraining()
    run_dir = Path(out).expanduser()
    precision = resolve_precision(cfg.train.precision)
    if torch.cuda.is_available():
        card_memory_gib()  # an emulated card (LOWRES_SSL_GPU_GIB) is capped before any allocation
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    if accelerator.num_processes > 1:  # a default run name holds a timestamp: the main's
        run_dir = Path(broadcast_object_list([str(run_dir)])[0])
    if accelerator.device.type == "cpu" and (note := use_the_cores(accelerator.num_processes)):
        log.info(note)
    with run_folder.exclusive(run_dir, accelerator):
        return _train(
            cfg, run_dir, accelerator, task, resume, init, progress_bar, on_step, autofit,
            clock, started,
        )  # fmt: skip


def _train(
    cfg: Config,
    run_dir: Path,
    accelerator: Accelerator,
    task: Pretraining | FineTuning,
    resume: bool,
    init: str | Path | None,
    progress_bar: bool,
    on_step: Callable[[Progress, dict[str, float]], None] | None,
    autofit: bool,
    clock: Callable[[], float],
    started: float,
) -> dict[str, Any]:
    main = accelerator.is_main_process
    device = accelerator.device
    world = accelerator.num_processes
    resume_from = run_folder.check_run_folder(run_dir, cfg, resume)
    if resume_from is not None:  # "auto" keeps what it resolved to when the run started
        cfg = fit.keep_saved(cfg, run_folder.saved_config(run_dir))
    cfg, note = fit.resolve_view_size(cfg)
    if main and note:
        log.info(note)
    set_seed(cfg.train.seed, device_specific=True)

    # Data: this process's slice of each global batch, as uint8 on the device.
    d = cfg.data
    with accelerator.main_process_first():
        images = task.open_images(cfg, device, main and progress_bar)
    skip_log = SkipLog(d.path)
    on_gpu = getattr(images, "device", torch.device("cpu")).type == "cuda"  # data.cache gpu
    on_device = len(images) if on_gpu else 0
    cfg, _, note = fit.resolve_micro_batch(
        cfg, device, processes=world, cached_images=on_device, mixed=precision_in_use(accelerator)
    )
    if main and note:
        log.info(note)
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
    dtype = MIXED_DTYPES[accelerator.mixed_precision]
    channels_last = device.type == "cuda" and cfg.model.channels_last
    augment = task.augment(cfg, out_dtype=dtype, channels_last=channels_last).to(device)
    aug_rng = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + accelerator.process_index)

    # Model, optimizer, objective, schedule. Seeded again here, so the initial weights do not
    # depend on what the data setup drew (building a cache or reusing one).
    set_seed(cfg.train.seed, device_specific=True)
    model, init_note = task.build_model(cfg, images, init, resuming=resume_from is not None)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    o = cfg.optim
    global_batch = cfg.train.batch_size * world
    optimizer, peak_lr = task.optimizer(cfg, model, global_batch)
    model, optimizer = accelerator.prepare(model, optimizer)
    objective = task.objective(cfg)
    evaluation = task.evaluation(
        cfg, accelerator, channels_last=channels_last, progress=progress_bar
    )
    step = task.step_for(cfg, cfg.train.micro_batch_size)
    if autofit and device.type != "cuda":
        log.info("--autofit sizes the micro-batch for a CUDA card; nothing to fit on the CPU")
    elif autofit:
        micro = run_autofit(
            lambda m: task.step_for(cfg, m),
            model,
            objective,
            augment,
            accelerator=accelerator,
            optimizer=optimizer,
            batch_size=cfg.train.batch_size,
            load_size=d.load_size,
            micro_batch_size=cfg.train.micro_batch_size or cfg.train.batch_size,
        )
        chosen = micro if micro < cfg.train.batch_size else None
        cfg = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, micro_batch_size=chosen)
        )
        step = task.step_for(cfg, micro)
    steps_per_epoch = len(loader)
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)

    def make_schedule(total: int) -> CosineSchedule:
        warmup = warmup_steps_for(total, steps_per_epoch, o.warmup_epochs)
        return CosineSchedule(peak_lr, total, warmup, o.final_lr_ratio)

    schedule = make_schedule(total_steps)

    # Everything is set up: only now does the run folder appear (a failed start leaves none).
    accelerator.wait_for_everyone()
    if main:
        run_folder.create(run_dir, cfg, resuming=resume_from is not None)
        task.write_records(run_dir)
    accelerator.wait_for_everyone()
    metrics = MetricsLog(run_dir, enabled=main)
    progress = Progress()
    if resume_from is not None:
        progress, extra = checkpoint.load(accelerator, resume_from)
        if extra.get("images", len(images)) != len(images):
            raise UserError(
                f"--resume: the image set has changed since {resume_from.name} "
                f"({extra['images']:,} then, {len(images):,} now; e.g. files added, or "
                "data.cache resolved differently): resume with the same data, or start a new --out"
            )
        aug_rng.set_state(_rng_from_text(extra["augment_rng"][accelerator.process_index]))
        metrics.truncate_after(progress.step)
    elif resume:
        log.info("--resume: no checkpoint yet in %s; starting from the beginning", run_dir)
    base_wall, start_step = progress.wall_s, progress.step
    budget_s = parse_budget(cfg.train.time_budget) if cfg.train.time_budget else None
    if progress.total_steps is not None:  # a budgeted run keeps the total it chose
        total_steps = progress.total_steps
        schedule = make_schedule(total_steps)
    elif budget_s is not None:  # provisional: the warm-up below measures, then fits the total
        total_steps = _UNFITTED  # the budget decides the total: not the epochs, not max_steps
        schedule = make_schedule(total_steps)

    if main:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        log.info(
            "%s %s on %s (%s, %d process%s): %s images, %d steps/epoch, steps %d→%s; "
            "%s (%.1fM parameters); %s; optimizer %s",
            task.name,
            cfg.preset or "(no preset)",
            where,
            accelerator.mixed_precision,
            world,
            "es" if world > 1 else "",
            f"{len(images):,}",
            steps_per_epoch,
            progress.step,
            "(time budget)" if budget_s and progress.total_steps is None else total_steps,
            task.describe(cfg, accelerator.unwrap_model(model)),
            parameter_count(accelerator.unwrap_model(model)) / 1e6,
            "resuming " + resume_from.name if resume_from else (init_note or "from scratch"),
            getattr(optimizer.optimizer, "description", type(optimizer.optimizer).__name__),
        )

    def save_checkpoint() -> None:
        with watch.timed("checkpoint") if watch else contextlib.nullcontext():
            _save_checkpoint()

    def _save_checkpoint() -> None:
        # Collectives first, on every process.
        rng_states = gather_object([_rng_to_text(aug_rng.get_state())])
        skips = _all_skips(skip_log)
        extra = {"augment_rng": rng_states, "images": len(images)}
        progress.wall_s = base_wall + clock() - session_start
        checkpoint.save(accelerator, run_dir, progress, cfg.train.keep_checkpoints, extra)
        if main:
            skips.write(run_dir / "skipped_files.txt")

    def _all_skips(own: SkipLog) -> SkipLog:
        merged = SkipLog(d.path)
        for part in gather_object([list(own)]):  # one process: the list itself
            merged.add(part)
        return merged

    def evaluate() -> None:
        """The task's evaluation (kNN monitor, validation); the best result's model is kept."""
        nonlocal last_log_time
        unwrapped = accelerator.unwrap_model(model)
        eval_start = clock()
        with watch.timed("evaluation") if watch else contextlib.nullcontext():
            record = evaluation.run(unwrapped)
        last_log_time += clock() - eval_start  # images/s counts training time only
        value = record[evaluation.key]
        progress.knn_step, progress.knn_top1 = progress.step, value
        metrics.write(evaluation.kind, progress.step, {"epoch": progress.epoch, **record})
        shown_knn[evaluation.kind] = f"{value:.3f}"
        bar.set_postfix({**bar_values, **shown_knn}, refresh=False)
        if progress.best_top1 is None or value > progress.best_top1:
            progress.best_top1, progress.best_step = value, progress.step
            progress.best_epoch = progress.epoch
            if main:
                task.on_best(unwrapped, run_dir, cfg, {**record, "step": progress.step})
        if main:
            log.info(evaluation.line(progress.step, record))

    def log_step(values: dict[str, float]) -> None:
        nonlocal last_log_time, last_log_images
        now = clock()
        rate = (session_images - last_log_images) / max(now - last_log_time, 1e-9)
        last_log_time, last_log_images = now, session_images
        mem = peak_memory_gib(device)
        metrics.write(
            "step", progress.step, {"epoch": progress.epoch, **values, "images_per_s": rate, **mem}
        )
        shown = {k: f"{v:.4g}" for k, v in values.items()}
        shown["img/s"] = f"{rate:.0f}"
        if "gpu_allocated_gib" in mem:
            shown["mem"] = f"{mem['gpu_allocated_gib']:.2f}G"
        bar_values.clear()
        bar_values.update(shown)
        bar.set_postfix({**shown, **shown_knn}, refresh=False)
        if main and not progress_bar:  # a log file or a scheduler: lines, not a bar
            parts = ", ".join(f"{k} {v}" for k, v in {**shown, **shown_knn}.items())
            total = "?" if total_steps == _UNFITTED else total_steps  # a budget's, not yet fitted
            log.info("step %d/%s (epoch %d): %s", progress.step, total, progress.epoch, parts)

    bar_values: dict[str, str] = {}
    shown_knn: dict[str, str] = {}

    def after_step(result: StepResult, lr: float, images: int) -> None:
        """Counters, the metrics line, skipped steps, the hook and periodic checkpoints."""
        nonlocal session_images, bad_in_a_row, saved_at
        progress.step += 1
        progress.batch += 1
        progress.images += images
        session_images += images
        bar.update(1)
        values = {"loss": result.loss, "lr": lr}
        if result.finite:
            bad_in_a_row = 0
            progress.last_loss = result.loss
            progress.epoch_loss_sum += result.loss
            progress.epoch_loss_steps += 1
            if progress.step % cfg.train.log_every == 0 or progress.step == total_steps:
                values = {"loss": result.loss}
                values.update({k: global_mean(accelerator, v) for k, v in result.terms.items()})
                values["lr"] = lr
                log_step(values)
        else:
            progress.bad_steps += 1
            bad_in_a_row += 1
            log.warning("step %d: loss is %s; step skipped", progress.step, result.loss)
            if bad_in_a_row >= cfg.train.max_bad_steps:
                raise UserError(
                    f"{bad_in_a_row} non-finite losses in a row (step {progress.step}); try a "
                    "lower optim.base_lr, or train.precision=fp32 (or bf16 instead of fp16); "
                    "the last good checkpoint is kept"
                )
        if on_step is not None:
            on_step(progress, values)
        if progress.step % cfg.train.checkpoint_every == 0:
            save_checkpoint()
            saved_at = progress.step

    def end_epoch() -> None:
        """The epoch's metrics line, the kNN monitor when due, and a checkpoint."""
        nonlocal saved_at
        done = progress.epoch_loss_steps
        mean = progress.epoch_loss_sum / done if done else math.nan
        progress.epoch += 1
        progress.batch = 0
        progress.epoch_loss_sum, progress.epoch_loss_steps = 0.0, 0
        skips = _all_skips(skip_log)
        metrics.write(
            "epoch",
            progress.step,
            {
                "epoch": progress.epoch,
                "loss_mean": mean,
                "skipped_files": len(skips),
                "bad_steps": progress.bad_steps,
            },
        )
        if main and len(skips):
            log.info("epoch %d: %s", progress.epoch, skips.summary())
        if evaluation is not None and evaluation.due(progress.epoch):
            evaluate()
        save_checkpoint()
        saved_at = progress.step

    def fit_to_budget(views) -> None:
        """After the warm-up: the total number of steps that ends within the time budget."""
        nonlocal evaluation, saved_at
        save_checkpoint()  # also what one checkpoint costs
        saved_at = progress.step
        eval_s = 0.0
        if evaluation is not None:
            eval_s = evaluation.images * forward_s(views) * 1.25
            if world > 1:  # every process decides the same: the main process's measurement
                eval_s = broadcast_object_list([eval_s])[0]
            if evaluation.optional and eval_s > budget.EVAL_SHARE_FINAL * budget_s:
                log.info(
                    "time budget: the %s evaluation (≈ %s each) is off; evaluate afterwards "
                    "with scripts/evaluate.py", evaluation.kind, budget.format_duration(eval_s),
                )  # fmt: skip
                evaluation = None
            elif eval_s > budget.EVAL_SHARE_EPOCH * budget_s and evaluation.every_epochs:
                log.info(
                    "time budget: the %s evaluation (≈ %s each) runs at the end only",
                    evaluation.kind, budget.format_duration(eval_s),
                )  # fmt: skip
                evaluation.every_epochs = 0
        watch.eval_estimate = eval_s if evaluation is not None else 0.0
        timings, plan = watch.timings(), budget_plan()
        set_total(budget.fit_total_steps(budget_s, timings, plan))
        if main:
            log.info(budget.choice_line(budget_s, total_steps, timings, plan, global_batch))

    def budget_plan() -> budget.Schedule:
        return budget.Schedule(
            done_steps=progress.step,
            steps_per_epoch=steps_per_epoch,
            checkpoint_every=cfg.train.checkpoint_every,
            eval_every_epochs=evaluation.every_epochs if evaluation is not None else 0,
            final_eval=evaluation is not None,
        )

    def set_total(total: int) -> None:
        nonlocal total_steps, schedule
        if world > 1:  # the main process's measurement, for all
            total = broadcast_object_list([total])[0]
        total_steps = progress.total_steps = total
        schedule = make_schedule(total)
        bar.total = total

    def refit_to_budget() -> None:
        """Steps that have become slower (or faster) than the warm-up's: the total again."""
        timings = watch.timings(recent=True)
        total = budget.fit_total_steps(budget_s, timings, budget_plan())
        if world > 1:  # every process decides the same: the main process's measurement
            total = broadcast_object_list([total])[0]
        if abs(total - total_steps) > max(2, budget.REFIT_CHANGE * total_steps):
            if main:
                log.info(
                    "time budget: steps now take %.2f s; %s steps in all instead of %s",
                    timings.step, f"{total:,}", f"{total_steps:,}",
                )  # fmt: skip
            set_total(total)

    def forward_s(views) -> float:
        """Seconds per image of a forward pass in eval mode (what an evaluation runs)."""
        unwrapped = accelerator.unwrap_model(model)
        images = views.views if isinstance(views, LabeledViews) else views
        x = images.take(slice(0, min(len(images), 64)), 1)[0]
        was = unwrapped.training
        unwrapped.eval()
        try:
            with torch.no_grad(), accelerator.autocast():
                t0 = clock()
                unwrapped(x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                return (clock() - t0) / x.shape[0]
        finally:
            unwrapped.train(was)

    bar = tqdm(
        total=None if total_steps == _UNFITTED else total_steps,
        initial=progress.step,
        disable=not (main and progress_bar),
        unit="step",
        dynamic_ncols=True,
    )
    model.train()
    session_start = clock()
    session_images = 0
    # A time budget without a total yet: a measured warm-up (steps after the first), then the
    # fit. The first step is left out of the measurement (allocations, cuDNN's search).
    # A time budget without a total yet: measured steps (a warm-up), then the fit; in this
    # session, re-fits every few steps. A resumed run keeps the total it chose.
    watch = budget.BudgetWatch(budget_s, started, clock) if budget_s is not None else None
    fit_state = {"fitted": progress.total_steps is not None, "refits": False}

    def keep_to_budget(views) -> None:
        """After each step of a budgeted run: the fit after the warm-up, then the re-fits."""
        watch.end_iteration()
        fitted = fit_state["fitted"]
        done = not fitted and watch.warmed_up()
        if world > 1 and not fitted:  # the main process's clock decides
            done = broadcast_object_list([done])[0]
        if done:
            fit_to_budget(views)
            fit_state["fitted"] = fit_state["refits"] = True
        elif fit_state["refits"] and progress.step % budget.REFIT_EVERY == 0:
            refit_to_budget()
        watch.start_iteration()

    last_log_time, last_log_images = session_start, 0
    bad_in_a_row = 0
    saved_at = progress.step if resume_from is not None else -1
    stopped = False
    # The loop: schedule, views, step, bookkeeping (after_step), and the epoch's end.
    try:
        with _StopRequest() as stop:
            while (
                budget_s is not None or progress.epoch < cfg.train.epochs
            ) and progress.step < total_steps:
                completed = True
                for batch in loader.iterate(progress.epoch, start=progress.batch):
                    if progress.step >= total_steps or stop.requested:
                        completed = False
                        break
                    lr = schedule.apply(optimizer, progress.step)
                    views = task.views(augment, batch, aug_rng)
                    try:
                        result = step(
                            model, objective, views, accelerator=accelerator, optimizer=optimizer
                        )
                    except torch.cuda.OutOfMemoryError:
                        raise UserError(_oom_message(cfg)) from None
                    after_step(result, lr, batch.images.shape[0] * world)
                    if watch is not None:
                        keep_to_budget(views)
                if completed:
                    end_epoch()
                    if watch is not None:
                        watch.start_iteration()
                if stop.requested:
                    break
            stopped = stop.requested
    finally:
        bar.close()
    final_knn = evaluation is not None and not stopped and progress.knn_step != progress.step
    if final_knn:  # the end of the run (saved below, so a resume does not evaluate again)
        evaluate()
    wall = clock() - session_start
    if progress.step != saved_at or final_knn:
        save_checkpoint()
    progress.wall_s = base_wall + wall
    if stopped:
        metrics.close()
        if main:
            log.warning(
                "stopped at step %d; checkpoint saved. Continue with --resume --out %s",
                progress.step,
                run_dir,
            )
        raise KeyboardInterrupt

    finished = run_folder.read_summary(run_dir) if progress.step == start_step else None
    if finished is not None:
        # Resumed a run that had already finished: nothing was trained, keep its files.
        metrics.close()
        if main:
            log.info("nothing to train: %s already reached step %d", run_dir, progress.step)
        return finished
    unwrapped = accelerator.unwrap_model(model)
    skips = _all_skips(skip_log)
    summary = {
        "final_loss": progress.last_loss,
        "steps": progress.step,
        "epochs": progress.epoch,
        "images": progress.images,
        "images_per_s": session_images / max(wall, 1e-9),
        "wall_time_s": progress.wall_s,
        "bad_steps": progress.bad_steps,
        "skipped_files": len(skips),
        "precision": accelerator.mixed_precision,
        "processes": world,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "optimizer": getattr(optimizer.optimizer, "description", ""),
        **task.summary(unwrapped),
        **peak_memory_gib(device),
    }
    if evaluation is not None and progress.knn_top1 is not None:
        summary[evaluation.key] = progress.knn_top1
        if evaluation.kind == "val":
            summary["best_val_top1"] = progress.best_top1
            summary["best_step"] = progress.best_step
            summary["best_epoch"] = progress.best_epoch
    elif progress.knn_top1 is not None:
        summary["knn_top1"] = progress.knn_top1
    if budget_s is not None:
        summary["time_budget_s"] = budget_s
        summary["command_wall_s"] = clock() - started
    if main:
        task.finish(unwrapped, run_dir, cfg, best_saved=progress.best_step >= 0)
        skips.write(run_dir / "skipped_files.txt")
        run_folder.write_summary(run_dir, summary)
        log.info(
            "done: %d steps, final loss %.4g, %.0f images/s; %s; run folder %s",
            progress.step,
            progress.last_loss or math.nan,
            summary["images_per_s"],
            skips.summary(used=len(images)),
            run_dir,
        )
        if budget_s is not None:
            log.info(
                "time budget %s: used %s (the run, from the start of the command)",
                budget.format_duration(budget_s),
                budget.format_duration(summary["command_wall_s"]),
            )
    metrics.close()
    accelerator.wait_for_everyone()
    return summary


def precision_in_use(accelerator: Accelerator) -> bool:
    """Whether the network runs under 16-bit autocast."""
    return accelerator.mixed_precision in ("bf16", "fp16")


def _rng_to_text(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _rng_from_text(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


__all__ = ["BACKBONE_FILE", "make_objective", "resolve_precision", "train"]
