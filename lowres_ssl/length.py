"""How long a run will be, in images seen, known before it starts: the plan's rule for long
runs on photos.

A preset's ``photos`` overlay may hold a section for long runs, ``photos.long``: config keys
that apply on photos where the run sees at least ``min_images`` images. The ``cpu`` preset's
trains SFRIK there, which on photos learns less than SimCLR in a short run and more in a long
one (``docs/training.md#long-runs-on-photos``). :func:`lowres_ssl.plan.resolve` decides it once,
before the run, and says why in the plan's lines (``--dry-run`` prints them); the run folder's
``config.yaml`` holds the loss it chose, so a resumed run keeps it, however long it grows.

The length in images is known where the run is held to epochs or steps: the smaller of
``train.epochs`` passes over the images and ``train.max_steps`` steps, each of
``train.batch_size`` images per process. A time budget becomes steps only at run time, once the
warm-up has measured a step (:mod:`lowres_ssl.engine.budgeting`), so the rule counts it at the
rate it states, ``images_per_s``: images seen per second of budget, the preset's measured rate
on the machine it is for (setup, evaluation and checkpoints included).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lowres_ssl.config import LONG, TrainConfig, flatten, long_keys
from lowres_ssl.durations import format_duration, parse_budget


@dataclass(frozen=True)
class Length:
    """A run's planned length: the images it will see, and how that was counted."""

    images: int
    how: str  # e.g. "100 steps of 32 images", "a 1 h budget at 48 images/s"
    budget_s: float | None = None  # a time budget's, counted at a rate


def planned_length(
    train: TrainConfig, processes: int, count: Callable[[], int], images_per_s: float
) -> Length:
    """The images a run of ``train`` on ``processes`` processes will see (``count``: the
    images of its data, asked only for a run held to epochs)."""
    per_step = train.batch_size * processes
    if train.time_budget is not None:
        seconds = parse_budget(train.time_budget)
        how = f"a {format_duration(seconds)} budget at {images_per_s:g} images/s"
        return Length(round(seconds * images_per_s), how, seconds)
    steps_per_epoch = max(1, count() // per_step)  # training drops the last partial batch
    epochs = train.epochs or 1
    steps, how = epochs * steps_per_epoch, f"{epochs} epoch{'s' if epochs > 1 else ''}"
    if train.max_steps is not None and train.max_steps < steps:
        steps, how = train.max_steps, f"{train.max_steps} steps"
    return Length(steps * per_step, f"{how} of {per_step} images")


@dataclass(frozen=True)
class LongRule:
    """``photos.long``: its config keys apply where a run sees at least ``min_images``."""

    min_images: int
    images_per_s: float
    keys: dict[str, Any]

    @classmethod
    def of(cls, photos: dict[str, Any]) -> LongRule | None:
        """The rule of a ``photos`` overlay (None: it has none); checked by the config."""
        rule = photos.get(LONG)
        if not rule:
            return None
        return cls(int(rule["min_images"]), float(rule["images_per_s"]), long_keys(rule))

    def decide(self, train: TrainConfig, processes: int, count: Callable[[], int]) -> Choice:
        """Whether the keys apply to a run of ``train``, and why."""
        length = planned_length(train, processes, count, self.images_per_s)
        return Choice(self, length, length.images >= self.min_images)


@dataclass(frozen=True)
class Choice:
    """What the plan chose for a run: the rule, the length it counted, long or not."""

    rule: LongRule
    length: Length
    long: bool

    @property
    def keys(self) -> str:
        """The section's keys, as the plan's line names them."""
        return ", ".join(f"{k}={v}" for k, v in flatten(self.rule.keys).items())

    @property
    def line(self) -> str:
        """The plan's line (``--dry-run`` prints it, the run logs it)."""
        n, at_least = self.length.images, self.rule.min_images
        if self.long:
            return (
                f"photos, a long run: about {n:,} images ({self.length.how}), at least "
                f"{at_least:,}: photos.long applies ({self.keys})"
            )
        return (
            f"photos, a short run: about {n:,} images ({self.length.how}), under "
            f"{at_least:,}: photos.long ({self.keys}) left out"
        )

    def measured(self, images: int) -> str | None:
        """Where a time budget, once fitted to the measured steps, gives ``images`` on the
        other side of the threshold than the rule's rate counted: the line that says so (the
        run keeps its plan, decided once). None: the two agree, or no budget was counted."""
        budget_s = self.length.budget_s
        if budget_s is None or (images >= self.rule.min_images) == self.long:
            return None
        side = "at least" if images >= self.rule.min_images else "under"
        plan = "long (photos.long applied)" if self.long else "short"
        return (
            f"photos.long: this machine's steps fit about {images:,} images in the budget, "
            f"{side} {self.rule.min_images:,}; the plan counted {self.length.images:,} at "
            f"{self.rule.images_per_s:g} images/s and chose {plan}, and the run keeps that. "
            f"To plan at this machine's rate, start again with --set "
            f"photos.long.images_per_s={images / budget_s:.3g}"
        )
