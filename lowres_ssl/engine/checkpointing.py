"""Checkpoints: when to save, how (atomically, the last K kept), and where a resumed run starts.

A checkpoint is ``run/checkpoints/step_NNNNNNNN/`` (:mod:`lowres_ssl.run_layout`): what
``accelerator.save_state`` writes (the model as safetensors, the optimizer state including
8-bit buffers, the grad scaler, every process's random generators) and ``trainer_state.json``
(the :class:`~lowres_ssl.engine.state.Progress`, the augmentation's generators, the size and
sha256 of every file). It is written under a temporary name and renamed when every process has
finished, so a run killed mid-save leaves the previous checkpoint as the latest. Loading goes
through ``torch.load`` with ``weights_only=True`` (Accelerate's default) and safetensors: no
code from the file runs.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate.utils import gather_object
from safetensors import SafetensorError

from lowres_ssl import run_layout
from lowres_ssl.data import SkipLog
from lowres_ssl.engine.hooks import Part
from lowres_ssl.engine.state import Progress, State, StepDone
from lowres_ssl.errors import UserError
from lowres_ssl.files import disk_full_is_a_user_error, disk_full_message, free_bytes, tree_bytes


def save(
    accelerator, run_dir: Path, progress: Progress, keep: int, extra: dict | None = None
) -> Path:
    """Save on every process (each writes its own random states), rename on the main one.
    ``extra`` (JSON values) is stored beside the progress, e.g. other random states. A full
    disk is a one-line error (the previous checkpoint stays the latest, the partial one is
    removed), before any byte is written where the last checkpoint's size is not free."""
    final = run_layout.checkpoint_dir(run_dir, progress.step)
    tmp = run_layout.checkpoint_dir(run_dir, progress.step, temporary=True)
    previous = run_layout.checkpoints(run_dir)
    needed = tree_bytes(previous[-1]) if previous else None
    fix = (
        f"free some space, then continue with --resume --out {run_dir} (the previous checkpoint "
        "is intact)" if previous else "free some space and start again"
    )  # fmt: skip
    what = f"the checkpoint of step {progress.step}"
    free = free_bytes(run_dir)
    if needed and free is not None and free < needed:  # every process sees the same disk
        raise UserError(disk_full_message(tmp, what, needed, fix, free))
    try:
        with disk_full_is_a_user_error(tmp, what, needed=needed, fix=fix):
            _write(accelerator, tmp, final, progress, extra)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        for old in run_layout.checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _write(accelerator, tmp: Path, final: Path, progress: Progress, extra: dict | None) -> None:
    """Every process writes its part under ``tmp``; the main one adds the progress and the
    manifest and renames ``tmp`` to ``final``."""
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {**asdict(progress), "extra": extra or {}, "files": run_layout.manifest(tmp)}
        with open(tmp / run_layout.STATE_FILE, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # the same step saved again (e.g. Ctrl-C right after a checkpoint)
            shutil.rmtree(final)
        os.rename(tmp, final)


def load(accelerator, checkpoint: Path) -> tuple[Progress, dict]:
    """Restore model, optimizer, scaler and random states; return the progress and extra. A
    file that is not what the kit saved (e.g. a pickle that would run code, its checksum
    forged) is a one-line error; nothing in it runs."""
    try:
        accelerator.load_state(str(checkpoint))
    except (pickle.UnpicklingError, SafetensorError, EOFError, RuntimeError, ValueError) as e:
        if isinstance(e, pickle.UnpicklingError):  # torch's message suggests weights_only=False
            cause = "a pickle holding more than plain weights"
        else:
            cause = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(
            f"--resume: {checkpoint} cannot be loaded ({cause}); it holds a file the kit did not "
            "write (nothing in it was run): move it away to resume from the checkpoint before, "
            "or start a new --out"
        ) from None
    path = Path(checkpoint) / run_layout.STATE_FILE
    values = json.loads(path.read_text(encoding="utf-8"))
    extra = values.pop("extra", {})
    values.pop("files", None)
    return Progress.from_saved(values), extra


def rng_to_text(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def rng_from_text(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


class Checkpointer(Part):
    """Owns saving: every ``every`` steps, at every epoch's end, on request (the time budget,
    Ctrl-C, the end of the run). Beside Accelerate's state it keeps what exact resume needs:
    each process's augmentation generator and the number of images (a changed set is refused
    on resume); the skipped-files list is rewritten with every checkpoint."""

    def __init__(
        self,
        accelerator,
        run_dir: Path,
        *,
        every: int,
        keep: int,
        aug_rng: torch.Generator,
        images: int,
        skips: Callable[[], SkipLog],
    ) -> None:
        self.accelerator, self.run_dir = accelerator, run_dir
        self.every, self.keep = every, keep
        self.aug_rng, self.images, self.skips = aug_rng, images, skips
        self.saved_at = -1  # the step of the last checkpoint this session or the resumed one

    def resume(self, checkpoint: Path) -> Progress:
        """Restore the run from ``checkpoint``: model, optimizer, generators; its progress."""
        progress, extra = load(self.accelerator, checkpoint)
        if extra.get("images", self.images) != self.images:
            raise UserError(
                f"--resume: the image set has changed since {checkpoint.name} "
                f"({extra['images']:,} then, {self.images:,} now; e.g. files added, or "
                "data.cache resolved differently): resume with the same data, or start a new --out"
            )
        own = extra["augment_rng"][self.accelerator.process_index]
        self.aug_rng.set_state(rng_from_text(own))
        self.saved_at = progress.step
        return progress

    def after_step(self, state: State, done: StepDone) -> None:
        if state.progress.step % self.every == 0:
            self.save(state)

    def after_epoch(self, state: State) -> None:
        self.save(state)

    def unsaved(self, state: State) -> bool:
        """Whether steps were taken since the last checkpoint."""
        return state.progress.step != self.saved_at

    def save(self, state: State) -> None:
        """A checkpoint of the current step (collectives first, on every process)."""
        with state.timed("checkpoint"):
            rng_states = gather_object([rng_to_text(self.aug_rng.get_state())])
            skips = self.skips()
            extra = {"augment_rng": rng_states, "images": self.images}
            state.progress.wall_s = state.wall_s()
            state.progress.budget_used_s = state.budget_used_s()
            save(self.accelerator, self.run_dir, state.progress, self.keep, extra)
            if self.accelerator.is_main_process:
                skips.write(self.run_dir / run_layout.SKIPPED_FILE)
        self.saved_at = state.progress.step


__all__ = ["Checkpointer", "load", "rng_from_text", "rng_to_text", "save"]
