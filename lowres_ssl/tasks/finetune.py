"""Supervised fine-tuning: the pre-trained backbone and a new linear head, cross-entropy on
one augmented view, validation top-1 / top-5 at epoch ends; the run's result is
``classifier.safetensors`` (the best validation's model) and ``classifier_last.safetensors``.
A class-balanced subset (``--train-fraction``, ``--per-class``) is drawn per class from a
generator seeded by (seed, class) and written to ``train_subset.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lowres_ssl.augment import build_augment
from lowres_ssl.config import Config, layer, to_dict
from lowres_ssl.data import ArrayImages, Batch, FolderImages, dataset_spec
from lowres_ssl.engine.evaluating import Evaluation
from lowres_ssl.engine.steps import LabeledViews, supervised_step
from lowres_ssl.engine.task import Task, random_batch
from lowres_ssl.errors import UserError
from lowres_ssl.eval.features import align_classes, extract_all, open_labeled, take_rows
from lowres_ssl.files import write_text_atomic
from lowres_ssl.models import Classifier, build_backbone, is_library_name
from lowres_ssl.optim import parameter_groups
from lowres_ssl.run_layout import CLASSIFIER_FILE, CLASSIFIER_LAST_FILE, SUBSET_FILE
from lowres_ssl.tasks.pretrain import make_optimizer, open_task_images
from lowres_ssl.weights import load_into, load_weights, save_classifier, spec_of

log = logging.getLogger("lowres_ssl")


def balanced_subset(
    labels: torch.Tensor,
    num_classes: int,
    *,
    fraction: float | None = None,
    per_class: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Sorted row indices of a class-balanced subset: ``per_class`` images of each class (all
    of a smaller class), or ``fraction`` of each class (at least one). The draw depends only on
    (seed, class, the class's rows), so the same seed gives the same subset."""
    rows = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) == 0:
            continue
        k = per_class if per_class is not None else max(1, round(fraction * len(idx)))
        gen = torch.Generator().manual_seed(seed * 1_000_003 + c)
        rows.append(idx[torch.randperm(len(idx), generator=gen)[: min(k, len(idx))]])
    return torch.cat(rows).sort().values


class ValidationEvaluation(Evaluation):
    """Validation top-1 / top-5 of the classifier (eval mode, no autograd, resize + centre
    crop: the images decoded at the training view size)."""

    kind, key = "val", "val_top1"
    optional = False
    keeps_best = True  # the best validation's model is the run's classifier

    def __init__(self, labeled, labels, *, every_epochs, accelerator, batch_size, channels_last):
        self.labeled, self.labels = labeled, labels
        self.every_epochs = every_epochs
        self.accelerator = accelerator
        self.batch_size = batch_size
        self.channels_last = channels_last
        self.images = len(labeled)

    def run(self, model: nn.Module) -> dict[str, Any]:
        acc = self.accelerator
        start = time.perf_counter()
        logits, found = extract_all(
            model,
            self.labeled,
            device=acc.device,
            accelerator=acc,
            batch_size=self.batch_size,
            channels_last=self.channels_last,
        )
        labels = self.labels.to(logits.device)[found]
        top5 = logits[found].topk(min(5, logits.shape[1]), dim=1).indices
        n = max(int(found.sum()), 1)
        return {
            "val_top1": (top5[:, 0] == labels).sum().item() / n,
            "val_top5": (top5 == labels[:, None]).any(1).sum().item() / n,
            "n_val": int(found.sum()),
            "eval_s": time.perf_counter() - start,
        }

    def line(self, step: int, r: dict[str, Any]) -> str:
        return (
            f"step {step}: validation top-1 {r['val_top1']:.3f}, top-5 {r['val_top5']:.3f} on "
            f"{r['n_val']:,} images; {r['eval_s']:.1f} s"
        )


#: What fine-tuning takes from a preset: the card's settings, not pre-training's recipe.
PRESET_KEYS = {
    "data": ("cache", "cache_dir", "num_workers", "min_size", "max_pixels"),
    "model": ("backbone", "grad_checkpointing", "channels_last"),
    "train": ("precision", "micro_batch_size", "seed"),
    "optim": ("state_bits",),
}


class FineTuning(Task):
    """Supervised fine-tuning: the pre-trained backbone and a new linear head, cross-entropy
    on one augmented view, backbone and head at their own learning rates."""

    name = "fine-tuning"
    metric = "val_top1"
    #: Fine-tuning's values where a config says None (the SFRIK paper's semi-supervised
    #: protocol: SGD with momentum, no weight decay, no warm-up, cosine to 0, 20 epochs).
    defaults: ClassVar[dict[str, Any]] = {
        "optim": {"name": "sgd", "weight_decay": 0.0, "warmup_epochs": 0.0,
                  "final_lr_ratio": 0.0},
        "train": {"epochs": 20, "checkpoint_every": 1000},
        "data": {"recipe": "supervised"},
        "eval": {"every_epochs": 0},  # the kNN monitor is pre-training's; validation replaces it
    }  # fmt: skip

    def from_preset(self, preset: dict[str, Any]) -> dict[str, Any]:
        """A preset's card settings (:data:`PRESET_KEYS`) and its photos' view side."""
        values: dict[str, Any] = {
            section: {k: preset[section][k] for k in keys if k in preset.get(section, {})}
            for section, keys in PRESET_KEYS.items()
        }
        photo_size = ((preset.get("photos") or {}).get("data") or {}).get("load_size")
        if photo_size is not None:
            values["photos"] = {"data": {"load_size": photo_size}}
        return values

    def new_run(self, values: dict[str, Any], layers: list[dict[str, Any]]) -> dict[str, Any]:
        """A new fine-tuning run needs the pre-trained weights (or ``random_init``) and a
        labeled folder, and takes the backbone and the image size of the weights (read here,
        once, for the run)."""
        f = values.get("finetune") or {}
        if f.get("checkpoint"):
            weights = load_weights(f["checkpoint"], "--checkpoint")
            of_weights: dict[str, Any] = {"model": {"backbone": weights.spec.backbone}}
            if (values.get("data") or {}).get("load_size", "auto") == "auto":
                of_weights["data"] = {"load_size": weights.spec.image_size}
            values = layer(values, of_weights)
            self.weights = None if f.get("random_init") else weights
        elif not f.get("random_init"):
            raise UserError(
                "finetune.py needs --checkpoint (the pre-trained weights), or --random-init to "
                "train the architecture from scratch"
            )
        if not any((over.get("data") or {}).get("path") for over in layers):
            raise UserError("finetune.py needs --train, the labeled folder to train on")
        return values

    def __init__(self, weights=None) -> None:
        """``weights``: the pre-trained weights when the caller has read them already
        (:func:`lowres_ssl.weights.load_weights` of ``finetune.checkpoint``)."""
        self.classes: list[str] = []
        self.subset: dict[str, Any] | None = None
        self.weights = weights

    def open_images(self, cfg: Config, device, progress: bool):
        images = open_task_images(cfg, device, progress, labeled=True)
        if images.labels is None or images.classes is None:
            raise UserError(
                f"--train {cfg.data.path} has no labels; fine-tuning needs a labeled folder "
                "(root/<class name>/<image>) or a dataset name such as cifar10"
            )
        self.classes = list(images.classes)
        if len(self.classes) < 2:
            raise UserError(
                f"--train {cfg.data.path} has {len(self.classes)} class; a classifier needs two "
                "or more class subfolders"
            )
        f = cfg.finetune
        if f.train_fraction is None and f.per_class is None:
            return images
        labels = images.labels.cpu()
        rows = balanced_subset(
            labels,
            len(self.classes),
            fraction=f.train_fraction,
            per_class=f.per_class,
            seed=cfg.train.seed,
        )
        counts = torch.bincount(labels[rows], minlength=len(self.classes)).tolist()
        paths = _paths(images)
        self.subset = {
            "train_fraction": f.train_fraction,
            "per_class": f.per_class,
            "seed": cfg.train.seed,
            "images": len(rows),
            "of": len(images),
            "per_class_counts": dict(zip(self.classes, counts, strict=True)),
            "files": [paths[i] for i in rows.tolist()] if paths is not None else rows.tolist(),
        }
        return _take_rows(images, rows)

    def augment(self, cfg: Config, **kwargs):
        return build_augment(cfg.data.recipe, cfg.data.view_size, **kwargs)

    def build_model(
        self, cfg: Config, images, init, resuming: bool
    ) -> tuple[nn.Module, str | None]:
        f = cfg.finetune
        if f.checkpoint and self.weights is None and is_library_name(cfg.model.backbone):
            self.weights = load_weights(f.checkpoint, "--checkpoint")
        built = {}  # a timm/torchvision model is rebuilt as it was trained (its patch, stem)
        if self.weights is not None and self.weights.spec.library:
            built = {"kwargs": self.weights.spec.kwargs, "cifar_stem": self.weights.spec.cifar_stem}
        backbone = build_backbone(
            cfg.model.backbone,
            image_size=cfg.data.view_size,
            grad_checkpointing=cfg.model.grad_checkpointing,
            **built,
        )
        note = "random init"
        if f.checkpoint and not f.random_init and not resuming:  # a resumed run has its own
            if self.weights is None:
                self.weights = load_weights(f.checkpoint, "--checkpoint")
            load_into(backbone, self.weights, "--checkpoint")
            note = f"backbone from {self.weights.file}"
        model = Classifier(backbone, len(self.classes), freeze_backbone=f.freeze_backbone)
        if f.freeze_backbone:
            note += ", frozen"
        return model, note

    def optimizer(self, cfg: Config, model: Classifier, global_batch: int):
        f, o = cfg.finetune, cfg.optim
        scale = global_batch / 256
        peak = f.head_lr * scale  # the schedule's lr is the head's; the backbone's is scaled
        groups = [dict(g, lr_scale=1.0) for g in parameter_groups(model.head, o.weight_decay)]
        if not f.freeze_backbone:
            ratio = f.backbone_lr / f.head_lr if f.head_lr else 0.0
            groups += [
                dict(g, lr_scale=ratio) for g in parameter_groups(model.backbone, o.weight_decay)
            ]
        for g in groups:
            g["lr"] = peak * g["lr_scale"]
        return make_optimizer(cfg, groups, peak), peak

    def objective(self, cfg: Config) -> nn.Module:
        return nn.CrossEntropyLoss(label_smoothing=cfg.finetune.label_smoothing)

    def step_for(self, cfg: Config, micro: int | None):
        return functools.partial(supervised_step, micro_batch_size=micro)

    def views(self, augment, batch: Batch, generator: torch.Generator):
        return LabeledViews(augment.plan(batch.images, generator=generator), batch.labels)

    def probe_batch(self, cfg: Config, device, generator: torch.Generator) -> Batch:
        n = cfg.train.batch_size
        return random_batch(n, cfg.data.load_size, device, generator, len(self.classes))

    def evaluation(self, cfg: Config, accelerator, *, channels_last: bool, progress: bool):
        f, d = cfg.finetune, cfg.data
        spec = f.val
        if spec is None:
            if (named := dataset_spec(d.path)) is not None:
                spec = f"{named[0]}:test"
            else:
                log.warning("no --val: no validation; %s is the last model", CLASSIFIER_FILE)
                return None
        with accelerator.main_process_first():
            labeled = open_labeled(
                spec,
                size=d.view_size,
                default_split="test",
                cache="none" if d.cache == "none" else "disk",
                cache_dir=d.cache_dir,
                device=accelerator.device,
                num_workers=d.num_workers,
                progress=progress and accelerator.is_main_process,
            )
        labels = align_classes(self.classes, labeled.classes, labeled.labels, spec)
        return ValidationEvaluation(
            labeled,
            labels,
            every_epochs=f.val_every_epochs,
            accelerator=accelerator,
            batch_size=cfg.eval.batch_size,
            channels_last=channels_last,
        )

    def describe(self, cfg: Config, model: Classifier) -> str:
        return f"{cfg.model.backbone} + linear head ({model.num_classes} classes)"

    def write_records(self, run_dir: Path) -> None:
        if self.subset is not None:
            write_text_atomic(run_dir / SUBSET_FILE, json.dumps(self.subset, indent=1) + "\n")

    def summary(self, model: Classifier) -> dict[str, Any]:
        out: dict[str, Any] = {"classes": len(self.classes)}
        if self.subset is not None:
            out["train_images"] = self.subset["images"]
        return out

    def _save(self, model: Classifier, path: Path, cfg: Config, info: dict[str, Any]) -> None:
        spec = spec_of(model.backbone, cfg.data.view_size, to_dict(cfg))
        save_classifier(model, spec, self.classes, path, info)

    def on_best(self, model, run_dir: Path, cfg: Config, record: dict[str, Any]) -> None:
        self._save(model, run_dir / CLASSIFIER_FILE, cfg, record)

    def finish(self, model: Classifier, run_dir: Path, cfg: Config, best_saved: bool) -> None:
        self._save(model, run_dir / CLASSIFIER_LAST_FILE, cfg, {"last": True})
        if not best_saved:  # no validation: the last model is the one to use
            self._save(model, run_dir / CLASSIFIER_FILE, cfg, {"last": True})


def _paths(images) -> list[str] | None:
    if isinstance(images, FolderImages):
        return list(images.files.paths)
    return list(images.paths) if images.paths is not None else None


def _take_rows(images: ArrayImages | FolderImages, rows: torch.Tensor):
    out = take_rows(images, rows)
    if isinstance(out, ArrayImages) and images.fingerprint:  # a subset of that cache
        out = dataclasses.replace(out, fingerprint=f"{images.fingerprint}:rows{len(rows)}")
    return out


__all__ = ["FineTuning", "ValidationEvaluation", "balanced_subset"]
