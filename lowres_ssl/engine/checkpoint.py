"""Checkpoints: Accelerate's state plus the trainer's progress, written atomically, last K kept.

A checkpoint is ``run/checkpoints/step_NNNNNNNN/``: what ``accelerator.save_state`` writes (the
model as safetensors, the optimizer state including 8-bit buffers, the grad scaler, every
process's random generators) and ``trainer_state.json`` (epoch, next batch, counters). It is
written under a temporary name and renamed when every process has finished, so a run killed
mid-save leaves the previous checkpoint as the latest. The size and sha256 of every file are
recorded in ``trainer_state.json``, so a checkpoint damaged later (a full disk, a partial copy,
bit rot) is recognised and an older intact one used instead. Loading goes through
``torch.load`` with ``weights_only=True`` (Accelerate's default) and safetensors: no code from
the file runs.
"""

from __future__ import annotations

import hashlib
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
    knn_step: int = -1  # the step of the last evaluation (the kNN monitor, or validation)
    knn_top1: float | None = None  # its result (kNN top-1, or validation top-1)
    best_top1: float | None = None  # the best evaluation result so far
    best_step: int = -1  # ... its step (-1: none yet)
    best_epoch: int = 0
    total_steps: int | None = None  # the total a time budget chose (None: from the config)


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
        state = {**asdict(progress), "extra": extra or {}, "files": _manifest(tmp)}
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1)
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
    values.pop("files", None)
    return Progress(**values), extra


# ---------------------------------------------------------------------------------------------
# Verification: a checkpoint cut short by a full disk, a partial copy or bit rot is not trusted


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(folder: Path) -> dict[str, list]:
    """Every file of a checkpoint (but the state file) → [size in bytes, sha256]."""
    return {
        p.relative_to(folder).as_posix(): [p.stat().st_size, _sha256(p)]
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != STATE_FILE
    }


def damage(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be trusted (a file missing, of another size or content than
    when it was saved), or None when it is intact. Checkpoints saved before files were
    recorded cannot be checked and count as intact."""
    try:
        values = json.loads((Path(checkpoint) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        return f"{STATE_FILE} unreadable ({type(err).__name__})"
    for name, (size, digest) in values.get("files", {}).items():
        path = Path(checkpoint) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size:,} bytes, {size:,} when saved"
        if _sha256(path) != digest:
            return f"{name} has changed since it was saved (checksum)"
    return None


def latest_intact(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint, and a line for each newer damaged one passed over."""
    passed: list[str] = []
    for candidate in reversed(checkpoints(run_dir)):
        why = damage(candidate)
        if why is None:
            return candidate, passed
        passed.append(f"{candidate.name}: {why}")
    return None, passed
