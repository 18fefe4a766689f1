"""What the engine trains: each task behind the engine's one interface
(:class:`lowres_ssl.engine.task.Task`).

- :class:`Pretraining` (``scripts/train.py``): self-supervised, two views, the SSL objective;
- :class:`FineTuning` (``scripts/finetune.py``): supervised, a linear head, validation.

:func:`train` is the engine's :func:`~lowres_ssl.engine.train` with pre-training when no task is
named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowres_ssl.config import Config
from lowres_ssl.engine import train as train_task
from lowres_ssl.engine.task import Task
from lowres_ssl.tasks.finetune import FineTuning, balanced_subset
from lowres_ssl.tasks.pretrain import Pretraining


def train(cfg: Config, out: str | Path, *, task: Task | None = None, **options) -> dict[str, Any]:
    """Train ``task`` (default: :class:`Pretraining`) as ``cfg`` says into the run folder
    ``out``; ``options`` as :func:`lowres_ssl.engine.train` takes them. Returns the summary."""
    return train_task(cfg, out, task if task is not None else Pretraining(), **options)


__all__ = ["FineTuning", "Pretraining", "Task", "balanced_subset", "train"]
