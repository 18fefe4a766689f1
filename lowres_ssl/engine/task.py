"""What the engine asks of a task: the one interface between the loop and what it trains.

The engine never imports a task module and never asks which task it runs; a task
(:mod:`lowres_ssl.tasks`: pre-training, fine-tuning, …) subclasses :class:`Task` and supplies
what differs — the images, the augmentation, the model, the optimizer's groups, the
objective, the step, the step's input from a loaded batch, the probe batch of ``--autofit``,
the evaluation that decides "best", the name of its metric and the files a run writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lowres_ssl.config import Config, from_dict, layer, validate
from lowres_ssl.data import Batch
from lowres_ssl.engine.evaluating import Evaluation


class Task:
    """The interface; ``name`` is for the log, ``metric`` names the evaluation's result in
    the run's summary."""

    name = "task"
    metric = "top1"
    #: The task's own values where a config says None (a partial config, with a ``photos``
    #: section of its own if it likes); :func:`lowres_ssl.plan.resolve` applies them.
    defaults: ClassVar[dict[str, Any]] = {}

    def request(
        self,
        layers: list[dict[str, Any]],
        *,
        preset: dict[str, Any] | None = None,
        resuming: bool = False,
    ) -> Config:
        """The config a user asks for: what the task takes of ``preset`` (a preset file's
        values), then each of ``layers`` (a saved run's config, a config file, flags,
        ``--set``) over it (:func:`lowres_ssl.config.layer`), validated. Not resolved: see
        :func:`lowres_ssl.plan.resolve`. ``resuming``: the run folder's run goes on (what a
        new run needs, e.g. weights to start from, it has)."""
        values = self.from_preset(preset) if preset is not None else {}
        for over in layers:
            values = layer(values, over)
        if not resuming:
            values = self.new_run(values, layers)
        return validate(from_dict(values))

    def new_run(self, values: dict[str, Any], layers: list[dict[str, Any]]) -> dict[str, Any]:
        """What a new run of the task adds to the layered ``values`` (e.g. what its starting
        weights say), or a one-line error for what it lacks; ``layers``: what the user gave."""
        return values

    def from_preset(self, preset: dict[str, Any]) -> dict[str, Any]:
        """The values of a preset this task takes (all of them)."""
        return dict(preset)

    def open_images(self, cfg: Config, device: torch.device, progress: bool):
        """The training images (an image set :func:`lowres_ssl.data.make_loader` takes)."""
        raise NotImplementedError

    def augment(self, cfg: Config, **kwargs) -> nn.Module:
        """The augmentation (``kwargs``: ``out_dtype``, ``channels_last``)."""
        raise NotImplementedError

    def build_model(
        self, cfg: Config, images, init: str | Path | None, resuming: bool
    ) -> tuple[nn.Module, str | None]:
        """The model, and a note on where its weights came from (None: from scratch)."""
        raise NotImplementedError

    def optimizer(self, cfg: Config, model: nn.Module, global_batch: int):
        """(optimizer, the schedule's peak learning rate) for a batch of ``global_batch``."""
        raise NotImplementedError

    def objective(self, cfg: Config) -> nn.Module:
        raise NotImplementedError

    def step_for(self, cfg: Config, micro: int | None):
        """The step function (:mod:`lowres_ssl.engine.steps`) for micro-batches of ``micro``."""
        raise NotImplementedError

    def views(self, augment: nn.Module, batch: Batch, generator: torch.Generator):
        """The step's input from a loaded batch; it has ``sample_input(n)``, a tensor of up to
        ``n`` images as the model takes them (a time budget times a forward pass on it)."""
        raise NotImplementedError

    def probe_batch(self, cfg: Config, device: torch.device, generator: torch.Generator) -> Batch:
        """A random batch of the run's shape, for ``--autofit``'s probe steps."""
        raise NotImplementedError

    def evaluation(
        self, cfg: Config, accelerator, *, channels_last: bool, progress: bool
    ) -> Evaluation | None:
        """What is evaluated at epoch ends (None: nothing)."""
        return None

    def describe(self, cfg: Config, model: nn.Module) -> str:
        """The model in a few words, for the run's first log line."""
        raise NotImplementedError

    def write_records(self, run_dir: Path) -> None:
        """Files a new run writes beside its config (e.g. the subset it trains on)."""

    def summary(self, model: nn.Module) -> dict[str, Any]:
        """The task's own entries of ``summary.json``."""
        return {}

    def on_best(self, model: nn.Module, run_dir: Path, cfg: Config, record: dict) -> None:
        """The evaluation has reached its best result so far (main process only)."""

    def finish(self, model: nn.Module, run_dir: Path, cfg: Config, best_saved: bool) -> None:
        """The finished run's result files (main process only)."""
        raise NotImplementedError


def random_batch(
    batch_size: int, load_size: int, device: torch.device, generator: torch.Generator,
    num_classes: int = 0,
) -> Batch:  # fmt: skip
    """Random uint8 images (and, with ``num_classes``, random labels) on ``device``."""
    shape = (batch_size, 3, load_size, load_size)
    images = torch.randint(0, 256, shape, generator=generator).to(torch.uint8).to(device)
    labels = None
    if num_classes:
        labels = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)
    return Batch(images, torch.arange(batch_size), labels)


__all__ = ["Task", "random_batch"]
