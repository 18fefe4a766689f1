"""The one place that names the files of a run folder, and finds its checkpoints.

    runs/NAME/config.yaml                 the resolved config (reusable with --config)
    runs/NAME/metrics.jsonl               one JSON object per logged step, epoch, evaluation
    runs/NAME/tensorboard/                the same scalars, with the tensorboard extra
    runs/NAME/checkpoints/step_NNNNNNNN/  Accelerate's state + trainer_state.json, last K kept
    runs/NAME/summary.json                what the finished run did
    runs/NAME/skipped_files.txt           the images that could not be read, and why
    runs/NAME/backbone.safetensors        pre-training's result
    runs/NAME/classifier.safetensors      fine-tuning's best model (classifier_last: its last)
    runs/NAME/train_subset.json           fine-tuning's class-balanced subset, when drawn
    runs/NAME/eval_knn.json …             scripts/evaluate.py's records
    runs/.NAME.lock                       held while a training writes into the folder

A checkpoint records the size and sha256 of each of its files, so one damaged after it was
written (a full disk, a partial copy, bit rot) is recognised here and an older one used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
SKIPPED_FILE = "skipped_files.txt"
TENSORBOARD_DIR = "tensorboard"
BACKBONE_FILE = "backbone.safetensors"
CLASSIFIER_FILE = "classifier.safetensors"  # a fine-tuning run's best model by validation
CLASSIFIER_LAST_FILE = "classifier_last.safetensors"  # ... and its final one
SUBSET_FILE = "train_subset.json"
CURVES_FILE = "curves.png"  # scripts/plot.py's default

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"  # the trainer's progress, beside Accelerate's files
CHECKPOINT_MODEL_FILE = "model.safetensors"  # the model in a checkpoint (Accelerate's name)


def eval_file(protocol: str, random_init: bool = False) -> str:
    """``eval_knn.json``, ``eval_linear.json``, ``eval_knn_random.json``."""
    return f"eval_{protocol}{'_random' if random_init else ''}.json"


def report_lock(run_dir: Path, name: str) -> Path:
    """The lock of one report (``eval_knn.json``) while ``evaluate.py`` makes it."""
    return Path(run_dir) / f".{name}.lock"


def lock_path(run_dir: Path) -> Path:
    """The lock of a run folder: beside it, so a start that fails leaves no folder."""
    return run_dir.parent / f".{run_dir.name}.lock"


def checkpoint_dir(run_dir: Path, step: int, *, temporary: bool = False) -> Path:
    """Where the checkpoint of ``step`` lives (``temporary``: while it is being written)."""
    name = f"{CHECKPOINT_PREFIX}{step:08d}"
    return Path(run_dir) / CHECKPOINTS_DIR / (f".tmp-{name}" if temporary else name)


def checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def latest(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest(folder: Path) -> dict[str, list]:
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


__all__ = [
    "BACKBONE_FILE",
    "CHECKPOINTS_DIR",
    "CHECKPOINT_MODEL_FILE",
    "CHECKPOINT_PREFIX",
    "CLASSIFIER_FILE",
    "CLASSIFIER_LAST_FILE",
    "CONFIG_FILE",
    "CURVES_FILE",
    "METRICS_FILE",
    "SKIPPED_FILE",
    "STATE_FILE",
    "SUBSET_FILE",
    "SUMMARY_FILE",
    "TENSORBOARD_DIR",
    "checkpoint_dir",
    "checkpoints",
    "damage",
    "eval_file",
    "latest",
    "latest_intact",
    "lock_path",
    "manifest",
    "report_lock",
]
