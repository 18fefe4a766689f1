"""Evaluate a backbone from its weights: kNN or a linear probe on labeled train/test sets.

:func:`evaluate` is what ``scripts/evaluate.py`` runs: read the backbone (run folder,
checkpoint or exported file; or the same architecture at a fixed random init), extract the
features of both sets (or read them from the feature cache), and classify. The result is a
dict that the front end prints as JSON and writes to the run folder.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lowres_ssl.config import PRECISIONS, from_dict
from lowres_ssl.errors import UserError
from lowres_ssl.eval.context import InferenceContext
from lowres_ssl.eval.features import (
    Features,
    LabeledSet,
    align_classes,
    cached_features,
    open_labeled,
)
from lowres_ssl.eval.knn import knn_evaluate
from lowres_ssl.eval.linear import linear_probe
from lowres_ssl.eval.monitor import default_sets
from lowres_ssl.models import (
    BACKBONES,
    CIFAR_STEM_MAX_SIZE,
    build_backbone,
    check_backbone_name,
    is_library_name,
)
from lowres_ssl.models.protocol import Backbone
from lowres_ssl.weights import (
    BackboneSpec,
    Weights,
    load_backbone,
    random_backbone,
    spec_of,
    state_sha256,
)

log = logging.getLogger("lowres_ssl")

PROTOCOLS = ("knn", "linear")


def run_sets(config: dict | None) -> tuple[str | None, str | None]:
    """(train, test) defaults from a run's saved config, as its monitor chose them."""
    if not config:  # e.g. a torchvision file: nothing to go by
        return None, None
    try:
        cfg = from_dict(config)
    except UserError:  # a config this version cannot read: no defaults
        return None, None
    return default_sets(cfg)


@dataclass(frozen=True)
class _Target:
    """What is evaluated: a backbone at an image size, on a train and a test set."""

    net: Backbone
    spec: BackboneSpec
    weights: Weights | None  # None for a random init without a checkpoint
    checkpoint: str | Path | None
    random_init: bool
    size: int
    train: str
    test: str


def evaluate(
    protocol: str,
    *,
    checkpoint: str | Path | None = None,
    random_init: bool = False,
    backbone: str | None = None,
    train: str | None = None,
    test: str | None = None,
    size: int | None = None,
    k: int = 200,
    temperature: float = 0.07,
    batch_size: int = 256,
    device: str = "auto",
    precision: str = "auto",
    cache_dir: str | Path | None = None,
    feature_cache: bool = True,
    num_workers: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate as ``scripts/evaluate.py`` does; returns the result record (docs/evaluation.md)."""
    start = time.perf_counter()
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    target = _resolve_target(checkpoint, random_init, backbone, size, seed, train, test)
    context = InferenceContext.choose(
        device,
        precision,
        target.spec.config,
        batch_size=batch_size,
        cache_dir=cache_dir,
        use_cache=feature_cache,
        num_workers=num_workers,
        progress=progress,
    )
    opened = _open_sets(target, context)
    train_feats, test_feats = _extract_features(target.net, opened, context)
    test_labels = align_classes(
        train_feats.classes, test_feats.classes, test_feats.labels, target.test
    )
    if protocol == "knn":
        record = _knn_record(train_feats, test_feats, test_labels, k, temperature, context.device)
    else:
        record = _linear_record(train_feats, test_feats, test_labels, context.device)
    record.update(_provenance(target, context, train_feats, test_feats, start))
    return record


def _resolve_target(
    checkpoint: str | Path | None,
    random_init: bool,
    backbone: str | None,
    size: int | None,
    seed: int,
    train: str | None,
    test: str | None,
) -> _Target:
    """The backbone to evaluate, its image size and the two sets, checked in that order."""
    net, spec, weights = backbone_to_evaluate(checkpoint, random_init, backbone, size, seed)
    default_train, default_test = run_sets(spec.config)
    train, test = train or default_train, test or default_test
    if train is None or test is None:
        raise UserError(
            "--train and --test are needed (labeled folders root/<class>/<image>, or a dataset "
            "name with a split such as cifar10:test)"
        )
    return _Target(
        net=net,
        spec=spec,
        weights=weights,
        checkpoint=checkpoint,
        random_init=random_init,
        size=size or spec.image_size,
        train=train,
        test=test,
    )


def backbone_to_evaluate(
    checkpoint: str | Path | None,
    random_init: bool,
    backbone: str | None,
    size: int | None,
    seed: int,
) -> tuple[Backbone, BackboneSpec, Weights | None]:
    """The network, its spec and, with a checkpoint, the weights it was read from."""
    if checkpoint is not None:
        net, weights = load_backbone(checkpoint)
        spec = weights.spec
        if backbone and backbone != spec.backbone:
            raise UserError(
                f"--backbone {backbone}: the checkpoint holds a {spec.backbone}; drop --backbone"
            )
        if random_init:  # the checkpoint's architecture, untrained
            net = random_backbone(spec, seed)
        return net, spec, weights
    if random_init and backbone:
        if not size:
            raise UserError("--random-init --backbone needs --size (the image side in pixels)")
        check_backbone_name(backbone)
        if is_library_name(backbone):  # its feature width and size rules: from the model
            with torch.device("meta"):
                spec = spec_of(build_backbone(backbone, image_size=size), size, None)
        else:
            spec = BackboneSpec(backbone, size, size <= CIFAR_STEM_MAX_SIZE, BACKBONES[backbone])
        return random_backbone(spec, seed), spec, None
    raise UserError(
        "pass --checkpoint (a run folder, checkpoint or weights file), or --random-init "
        "with --backbone and --size"
    )


def _open_sets(target: _Target, context: InferenceContext) -> dict[str, LabeledSet]:
    """The train and test sets, by role, at the evaluation size."""
    opened = {
        role: open_labeled(
            spec_text,
            size=target.size,
            default_split=role,
            cache_dir=context.cache_dir,
            device="cpu",
            num_workers=context.num_workers,
            progress=context.progress,
        )
        for role, spec_text in (("train", target.train), ("test", target.test))
    }
    # Before any feature is computed: a test class the train set lacks.
    train, test = opened["train"], opened["test"]
    align_classes(train.classes, test.classes, test.labels, target.test)
    return opened


def _extract_features(
    net: Backbone, opened: dict[str, LabeledSet], context: InferenceContext
) -> tuple[Features, Features]:
    """The train and test features, from the feature cache where it has them."""
    net = context.prepare(net)
    sha = state_sha256(net.state_dict())  # the feature cache's key
    train, test = (features_of(net, sha, opened[r], context, r) for r in ("train", "test"))
    return train, test


def features_of(
    net: Backbone,
    sha: str,
    labeled: LabeledSet,
    context: InferenceContext,
    role: str,
    flag: str | None = None,
) -> Features:
    """The features of one set by ``net`` (prepared by ``context``; ``sha``: the hash of its
    weights), from the feature cache where it has them (``role`` names the set in the log
    line, ``flag`` in the error; default ``--<role>``); a set without one usable image is a
    one-line error."""
    f = cached_features(
        net,
        labeled,
        weights_sha256=sha,
        precision=context.precision,
        device=context.device,
        cache_dir=context.cache_dir,
        use_cache=context.use_cache,
        batch_size=context.batch_size,
        autocast=context.autocast,
        channels_last=context.channels_last,
        num_workers=context.num_workers,
        progress=context.progress,
    )
    how = "from the feature cache" if f.from_cache else f"extracted in {f.seconds:.1f} s"
    log.info("%s %s: %s images, %s; %s", role, labeled.name, f"{len(f.labels):,}",
             f.skipped.summary(), how)  # fmt: skip
    if len(f.labels) == 0:
        raise UserError(f"{flag or '--' + role} {labeled.name}: no usable image")
    return f


def _knn_record(
    train_feats: Features,
    test_feats: Features,
    test_labels: Tensor,
    k: int,
    temperature: float,
    device: torch.device,
) -> dict[str, Any]:
    """kNN top-1/top-5 at ``k`` and, under their own keys, at k = 20."""
    ks = tuple(sorted({20, k}))
    results = knn_evaluate(
        train_feats.features.to(device),
        train_feats.labels.to(device),
        test_feats.features.to(device),
        test_labels.to(device),
        ks=ks,
        temperature=temperature,
        num_classes=len(train_feats.classes),
    )
    record: dict[str, Any] = {"knn_top1": results[k].top1, "knn_top5": results[k].top5, "k": k}
    for other in ks:
        if other != k:
            record[f"knn{other}_top1"] = results[other].top1
            record[f"knn{other}_top5"] = results[other].top5
    record["temperature"] = temperature
    return record


def _linear_record(
    train_feats: Features, test_feats: Features, test_labels: Tensor, device: torch.device
) -> dict[str, Any]:
    """Linear-probe top-1/top-5, the weight decay chosen and the held-out top-1 of each."""
    probe = linear_probe(
        train_feats.features,
        train_feats.labels,
        test_feats.features,
        test_labels,
        num_classes=len(train_feats.classes),
        device=device,
    )
    return {
        "top1": probe.top1,
        "top5": probe.top5,
        "weight_decay": probe.weight_decay,
        "val_top1": {f"{wd:g}": acc for wd, acc in probe.val_top1.items()},
    }


def _provenance(
    target: _Target,
    context: InferenceContext,
    train_feats: Features,
    test_feats: Features,
    start: float,
) -> dict[str, Any]:
    """The record's fields after the protocol's own: what was evaluated, on what, how, how long."""
    weights = target.weights
    return {
        "n_train": len(train_feats.labels),
        "n_test": len(test_feats.labels),
        "checkpoint": None if target.checkpoint is None else str(target.checkpoint),
        "random_init": target.random_init,
        "backbone": target.spec.backbone,
        "stem": target.spec.stem,
        "image_size": target.size,
        "precision": context.precision,
        "device": str(context.device),
        "train": target.train,
        "test": target.test,
        "skipped_train": len(train_feats.skipped),
        "skipped_test": len(test_feats.skipped),
        "feature_s": train_feats.seconds + test_feats.seconds,
        "wall_s": time.perf_counter() - start,
        "run_dir": str(weights.run_dir) if weights is not None and weights.run_dir else None,
    }


def evaluation_line(protocol: str, r: dict[str, Any]) -> str:
    """The line for people, e.g. ``kNN top-1 0.812 (k=200), top-5 0.987; …``."""
    what = f"{r['backbone']} at random init" if r["random_init"] else r["checkpoint"]
    images = f"{r['n_train']:,} train / {r['n_test']:,} test images"
    if protocol == "knn":
        others = "".join(
            f", top-1 {v:.3f} (k={key[3:-5]})"
            for key, v in r.items()
            if key.startswith("knn") and key.endswith("_top1") and key != "knn_top1"
        )
        return (
            f"kNN top-1 {r['knn_top1']:.3f} (k={r['k']}), top-5 {r['knn_top5']:.3f}{others}; "
            f"{images}; {what}"
        )
    return (
        f"linear top-1 {r['top1']:.3f}, top-5 {r['top5']:.3f} (weight decay "
        f"{r['weight_decay']:g}); {images}; {what}"
    )


__all__ = [
    "PRECISIONS",
    "PROTOCOLS",
    "backbone_to_evaluate",
    "evaluate",
    "evaluation_line",
    "features_of",
    "run_sets",
]
