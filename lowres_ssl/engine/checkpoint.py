"""Checkpoints: Accelerate's state plus the trainer's progress, written atomically, last K kept.

A checkpoint is ``run/checkpoints/step_NNNNNNNN/``: what ``accelerator.save_state`` writes (the
model as safetensors, the optimizer state including 8-bit buffers, the grad scaler, every
process's random generators) and ``trainer_state.json`` (epoch, next batch, counters). It is
written under a temporary name and renamed when every process has finished, so a run killed
mid-save leaves the previous checkpoint as the latest. Loading goes through ``torch.load`` with
``weights_only=True`` (Accelerate's default) and safetensors: no code from the file runs.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

PREFIX = "step_"
STATE_FILE = "trainer_state.json"


@dataclass
class Progress:
    """Where a run is. ``batch`` is the next batch of ``epoch`` to train on."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    images: int = 0  # images trained on, over all processes
    bad_steps: int = 0  # non-finite losses skipped, in all
    wall_s: float = 0.0  # training time, all sessions up to this checkpoint
    epoch_loss_sum: float = 0.0  # finite losses of this epoch so far (for its mean)
    epoch_loss_steps: int = 0
    last_loss: float | None = None  # the last finite loss
    knn_step: int = -1  # the step of the last kNN evaluation (the online monitor)
    knn_top1: float | None = None  # its result


def checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"{PREFIX}*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def save(
    accelerator, run_dir: Path, progress: Progress, keep: int, extra: dict | None = None
) -> Path:
    """Save on every process (each writes its own random states), rename on the main one.
    ``extra`` (JSON values) is stored beside the progress, e.g. other random states."""
    folder = Path(run_dir) / "checkpoints"
    final = folder / f"{PREFIX}{progress.step:08d}"
    tmp = folder / f".tmp-{PREFIX}{progress.step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
            json.dump({**asdict(progress), "extra": extra or {}}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # the same step saved again (e.g. Ctrl-C right after a checkpoint)
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, checkpoint: Path) -> tuple[Progress, dict]:
    """Restore model, optimizer, scaler and random states; return the progress and extra."""
    accelerator.load_state(str(checkpoint))
    values = json.loads((Path(checkpoint) / STATE_FILE).read_text(encoding="utf-8"))
    extra = values.pop("extra", {})
    return Progress(**values), extra
