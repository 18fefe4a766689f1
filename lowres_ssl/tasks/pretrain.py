"""Self-supervised pre-training: two views or multi-crop, backbone + projector, the SSL
objective, the online kNN monitor; the run's result is ``backbone.safetensors``."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lowres_ssl.augment import build_augment
from lowres_ssl.config import Config, to_dict
from lowres_ssl.data import Batch, open_images
from lowres_ssl.engine.evaluating import Evaluation
from lowres_ssl.engine.momentum import MemoryStep
from lowres_ssl.engine.steps import accumulation_step, embedding_cache_step, one_pass_step
from lowres_ssl.engine.task import Task, random_batch
from lowres_ssl.errors import UserError
from lowres_ssl.losses import ViewLayout, objective_from_settings
from lowres_ssl.models import build_model, projector_out_dim
from lowres_ssl.optim import build_optimizer
from lowres_ssl.run_layout import BACKBONE_FILE
from lowres_ssl.weights import load_init, save_safetensors, spec_of

log = logging.getLogger("lowres_ssl")

#: SwAV's crop area of its large views beside small crops (the smaller areas are the crops').
MULTI_CROP_LARGE_SCALE = (0.14, 1.0)


def view_layout(cfg: Config) -> ViewLayout:
    """The objective's views and anchors from ``cfg.data.views`` (resolved) and
    ``cfg.loss.reg_small``."""
    v = cfg.data.views
    try:
        return ViewLayout.of(v.layout, v.large, v.small_crops, reg_small=cfg.loss.reg_small)
    except ValueError as err:
        raise UserError(f"config section data.views: {err}") from None


def augment_options(cfg: Config) -> dict[str, Any]:
    """:func:`lowres_ssl.augment.build_augment`'s view arguments from ``cfg.data.views``."""
    v, size = cfg.data.views, cfg.data.view_size
    large_scale = v.large_scale
    if large_scale is None and v.small_crops:
        large_scale = MULTI_CROP_LARGE_SCALE
    return {
        "num_large": v.large,
        "large_scale": None if large_scale is None else tuple(large_scale),
        "num_small_crops": v.small_crops,
        "small_size": v.small_side(size),
        "small_scale": tuple(v.small_scale),
        "original": v.layout == "obow",
    }


def check_view_sizes(cfg: Config, backbone: nn.Module) -> None:
    """A one-line error when multi-crop's small views are smaller than the backbone takes
    (a timm/torchvision model that divides the side by 32 leaves them nothing)."""
    smallest = augment_options(cfg)["small_size"] if cfg.data.views.small_crops else None
    least = getattr(backbone, "min_image_size", 0)
    if smallest is not None and smallest < least:
        raise UserError(
            f"data.views.small_size: {backbone.name} leaves {smallest}-px crops less than a "
            f"2x2 feature map (it needs {least} px); set data.views.small_size={least} or more, "
            "or data.views.small=0"
        )


def describe_views(cfg: Config) -> str:
    """The views in a few words: ``2 × 96 px`` or ``2 × 96 px + 6 × 48 px (swav)``."""
    v, opts = cfg.data.views, augment_options(cfg)
    size = cfg.data.view_size
    text = f"{v.large} × {size} px"
    if v.layout == "obow":
        text = f"the whole image + {text}" if v.large else "the whole image"
    if v.small_crops:
        text += f" + {v.small_crops} × {opts['small_size']} px"
    if v.small_crops or v.layout == "obow":
        text += f" ({v.layout}{', reg_small' if cfg.loss.reg_small else ''})"
    if opts["large_scale"] is not None:
        low, high = opts["large_scale"]
        text += f", crops of {100 * low:.0f}–{100 * high:.0f} % of the image"
    return text


def make_objective(cfg: Config) -> nn.Module:
    """The objective of ``cfg.loss`` on the views of ``cfg.data.views``; SFRIK's λ, when unset,
    follows q (:func:`default_lam`). Settings that cannot work are a :class:`UserError`."""
    loss = cfg.loss
    return objective_from_settings(
        loss.name,
        lam=loss.lam,
        kernel_weights=loss.kernel_weights,
        mmd_path=loss.mmd_path,
        options=loss.options,
        q=projector_out_dim(cfg.model.projector),
        layout=view_layout(cfg),
        memory=bool(loss.memory),
    )


def open_task_images(cfg: Config, device, progress: bool, labeled: bool):
    """The training images of ``cfg.data`` (labeled: with the class of each)."""
    d = cfg.data
    return open_images(
        d.path,
        load_size=d.load_size,
        labeled=labeled,
        split=d.split,
        cache=d.cache,
        cache_dir=d.cache_dir,
        device=device,
        num_workers=d.num_workers,
        min_size=d.min_size,
        max_pixels=d.max_pixels,
        progress=progress,
    )


def make_optimizer(cfg: Config, model_or_groups, peak_lr: float):
    """``cfg.optim``'s optimizer over a model or parameter groups, at ``peak_lr``."""
    o = cfg.optim
    return build_optimizer(
        o.name,
        model_or_groups,
        lr=peak_lr,
        weight_decay=o.weight_decay,
        momentum=o.momentum,
        eta=o.eta,
        betas=tuple(o.betas),
        state_bits=o.state_bits,
    )


class KNNEvaluation(Evaluation):
    """The online kNN monitor on the backbone; ``untrained``: also on the backbone before its
    first step (``eval.untrained``)."""

    kind, key = "knn", "knn_top1"

    def __init__(self, monitor, *, untrained: bool = False) -> None:
        self.monitor = monitor
        self.untrained = untrained
        self.images = len(monitor.train_set) + len(monitor.test_set)

    @property
    def every_epochs(self) -> int:  # type: ignore[override]
        return self.monitor.every_epochs

    @every_epochs.setter
    def every_epochs(self, value: int) -> None:
        self.monitor.every_epochs = value

    def run(self, model: nn.Module) -> dict[str, Any]:
        return self.monitor.run(model.backbone)

    def line(self, step: int, r: dict[str, Any]) -> str:
        """``r`` may carry the baseline (``untrained_knn_top1``), shown beside the result."""
        base = r.get("untrained_knn_top1")
        beside = "" if base is None else f"; untrained backbone {base:.3f}"
        return (
            f"step {step}: kNN top-1 {r['knn_top1']:.3f} (k={r['k']}{beside}), "
            f"top-5 {r['knn_top5']:.3f}; {r['n_train']:,} train / {r['n_test']:,} test images; "
            f"{r['eval_s']:.1f} s"
        )


class Pretraining(Task):
    """Self-supervised pre-training: two views or multi-crop, backbone + projector, the SSL
    objective."""

    name = "pre-training"
    metric = "knn_top1"
    #: Pre-training's values where a config says None (the SFRIK paper's ResNet recipe: LARS,
    #: 10 warm-up epochs, cosine to 0.001; the augmentation: CIFAR's for small images,
    #: VICReg's for photos).
    defaults: ClassVar[dict[str, Any]] = {
        "optim": {"name": "lars", "weight_decay": 1e-6, "warmup_epochs": 10.0,
                  "final_lr_ratio": 0.001},
        "train": {"epochs": 100, "checkpoint_every": 500},
        "data": {"recipe": "cifar"},
        "photos": {"data": {"recipe": "vicreg"}},
    }  # fmt: skip

    def open_images(self, cfg: Config, device, progress: bool):
        return open_task_images(cfg, device, progress, labeled=False)

    def augment(self, cfg: Config, **kwargs):
        return build_augment(cfg.data.recipe, cfg.data.view_size, **augment_options(cfg), **kwargs)

    def build_model(
        self, cfg: Config, images, init, resuming: bool
    ) -> tuple[nn.Module, str | None]:
        model = build_model(
            cfg.model.backbone,
            cfg.model.projector,
            image_size=cfg.data.view_size,
            grad_checkpointing=cfg.model.grad_checkpointing,
        )
        check_view_sizes(cfg, model.backbone)
        note = load_init(model, init) if init and not resuming else None
        return model, note

    def optimizer(self, cfg: Config, model: nn.Module, global_batch: int):
        peak_lr = cfg.optim.base_lr * global_batch / 256
        return make_optimizer(cfg, model, peak_lr), peak_lr

    def objective(self, cfg: Config) -> nn.Module:
        return make_objective(cfg)

    def step_for(self, cfg: Config, micro: int | None):
        if cfg.loss.memory:  # experimental: one pass (config.validate says so)
            return MemoryStep(cfg.loss.memory, cfg.loss.memory_momentum)
        if micro and micro < cfg.train.batch_size:  # the full-batch regulariser in parts
            return functools.partial(embedding_cache_step, micro_batch_size=micro)
        if cfg.train.accumulate_steps > 1:
            return functools.partial(accumulation_step, accumulate_steps=cfg.train.accumulate_steps)
        return one_pass_step

    def views(self, augment, batch: Batch, generator: torch.Generator):
        return augment.plan(batch.images, generator=generator)

    def probe_batch(self, cfg: Config, device, generator: torch.Generator) -> Batch:
        return random_batch(cfg.train.batch_size, cfg.data.load_size, device, generator)

    def evaluation(self, cfg: Config, accelerator, *, channels_last: bool, progress: bool):
        from lowres_ssl.eval.monitor import KNNMonitor

        monitor = KNNMonitor.from_config(
            cfg, accelerator, channels_last=channels_last, progress=progress
        )
        if monitor is None:
            if cfg.eval.untrained and accelerator.is_main_process:
                log.info(
                    "eval.untrained: no kNN check in this run (no labeled test set: set "
                    "eval.test), so the untrained backbone is not measured either"
                )
            return None
        return KNNEvaluation(monitor, untrained=cfg.eval.untrained)

    def describe(self, cfg: Config, model: nn.Module) -> str:
        return (
            f"{cfg.model.backbone} + projector {cfg.model.projector} (q={model.q}), "
            f"views {describe_views(cfg)}, loss {cfg.loss.name}"
        )

    def summary(self, model: nn.Module) -> dict[str, Any]:
        return {"q": model.q}

    def finish(self, model: nn.Module, run_dir: Path, cfg: Config, best_saved: bool) -> None:
        spec = spec_of(model.backbone, cfg.data.view_size, to_dict(cfg))
        save_safetensors(model.backbone.state_dict(), spec, run_dir / BACKBONE_FILE)


__all__ = [
    "KNNEvaluation",
    "Pretraining",
    "augment_options",
    "make_objective",
    "make_optimizer",
    "open_task_images",
    "view_layout",
]
