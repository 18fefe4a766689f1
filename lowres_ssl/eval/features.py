"""Features of a frozen backbone on labeled images: the sets, the extraction, a disk cache.

A labeled set is an ImageFolder tree (``root/<class>/…/<image>``) or a dataset name with an
optional split (``cifar10``, ``cifar10:test``, ``stl10:train``). Its images are decoded as in
training (bad files skipped and listed; EXIF, RGB), the shorter side resized and the centre
cropped to the evaluation size, normalised with the training statistics, and passed through
the backbone in eval mode (running BatchNorm statistics, no randomness at all), batch by batch
on the device under the training precision.

``cached_features`` keeps each result on disk, keyed by (weights hash, the set's fingerprint,
size, precision), so a second evaluation of the same weights (``linear`` after ``knn``) costs
no extraction; the 16 most recently used files are kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowres_ssl.augment import IMAGENET_MEAN, IMAGENET_STD
from lowres_ssl.data import (
    DATASETS,
    ArrayImages,
    FolderImages,
    Skip,
    SkipLog,
    dataset_spec,
    make_loader,
)
from lowres_ssl.data import open_images as _open_images
from lowres_ssl.data.builtin import check_split
from lowres_ssl.data.cache import default_cache_dir, fingerprint
from lowres_ssl.errors import UserError

FEATURE_CACHE_VERSION = 2  # 2: the rows of the set that were found are stored
KEEP_FEATURE_FILES = 16


# ---------------------------------------------------------------------------------------------
# Labeled sets


def split_spec(spec: str, default_split: str = "train") -> tuple[str, str | None]:
    """``"cifar10:test"`` → ("cifar10", "test"); a dataset name alone takes ``default_split``;
    a folder → (folder, None). An existing folder wins over a name."""
    text = str(spec)
    if Path(text).expanduser().exists():
        return text, None
    if (named := dataset_spec(text)) is not None:
        name, split = named[0], named[1] or default_split
        check_split(name, split)
        return name, split
    raise UserError(
        f"{text} is not a folder; pass a labeled folder (root/<class>/<image>) or a dataset "
        f"name with an optional split ({', '.join(DATASETS)}; e.g. cifar10:test)"
    )


@dataclass
class LabeledSet:
    """Images at the evaluation size. ``labels`` index ``classes`` (CPU, int64); a set opened
    without labels (:func:`open_set` with ``labeled=False``) has every label -1 and no
    classes."""

    name: str
    images: ArrayImages | FolderImages
    labels: Tensor
    classes: list[str]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def has_labels(self) -> bool:
        return bool(self.classes)

    def paths(self) -> list[str] | None:
        """The file of every row, relative to the folder (None for a dataset by name)."""
        images = self.images
        return images.paths if isinstance(images, ArrayImages) else list(images.files.paths)


def evenly_spaced(n: int, limit: int | None) -> Tensor | None:
    """``limit`` row indices spread over ``n`` rows (None: all). No random draw: an
    ImageFolder's rows are sorted by class, so the subset keeps the class balance."""
    if limit is None or limit >= n:
        return None
    return torch.linspace(0, n - 1, limit).round().long().unique()


def take_rows(images: ArrayImages | FolderImages, rows: Tensor) -> ArrayImages | FolderImages:
    """The images (and labels, paths) of ``rows``, as the same kind of set."""
    keep = rows.tolist()
    if isinstance(images, ArrayImages):
        return dataclasses.replace(
            images,
            images=images.images[rows.to(images.images.device)],
            labels=None if images.labels is None else images.labels[rows.to(images.labels.device)],
            paths=None if images.paths is None else [images.paths[i] for i in keep],
        )
    f = images.files
    files = dataclasses.replace(
        f,
        paths=[f.paths[i] for i in keep],
        sizes=[f.sizes[i] for i in keep],
        mtimes_ns=[f.mtimes_ns[i] for i in keep],
        labels=None if f.labels is None else [f.labels[i] for i in keep],
    )
    return FolderImages(
        files, images.load_size, min_size=images.min_size, max_pixels=images.max_pixels
    )


def open_labeled(spec: str, *, size: int, **kwargs) -> LabeledSet:
    """The labeled set ``spec`` (see :func:`split_spec`) with images of side ``size``;
    ``max_images`` takes an evenly spaced subset. The keywords are :func:`open_set`'s."""
    return open_set(spec, size=size, labeled=True, **kwargs)


def open_set(
    spec: str,
    *,
    size: int,
    labeled: bool,
    default_split: str = "train",
    cache: str = "disk",
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    num_workers: int | None = None,
    max_images: int | None = None,
    progress: bool = True,
) -> LabeledSet:
    """The set ``spec`` with images of side ``size``: labeled (an ImageFolder tree or a
    dataset name) or, with ``labeled=False``, every image under a folder with label -1."""
    source, split = split_spec(spec, default_split)
    images = _open_images(
        source,
        load_size=size,
        labeled=labeled,
        split=split or "train",
        cache=cache,
        cache_dir=cache_dir,
        device=device,
        num_workers=num_workers,
        progress=progress,
    )
    if labeled and (images.labels is None or images.classes is None):
        raise UserError(f"{spec} has no labels; evaluation needs a labeled set (e.g. stl10:train)")
    if split is not None:  # a dataset by name: its files never change
        key = f"{source}:{split}:{size}"
    elif isinstance(images, ArrayImages) and images.fingerprint:
        key = images.fingerprint
    else:
        key = fingerprint(images)
    rows = evenly_spaced(len(images), max_images)
    if rows is not None:
        images = take_rows(images, rows)
        key += f":rows{len(rows)}"
    if not labeled:  # the same files opened both ways: the cached labels differ
        key += ":unlabeled"
    if labeled:
        labels, classes = images.labels.cpu(), list(images.classes)
    else:
        labels, classes = torch.full((len(images),), -1, dtype=torch.long), []
    return LabeledSet(str(spec), images, labels, classes, key)


def align_classes(train: list[str], test: list[str], test_labels: Tensor, name: str) -> Tensor:
    """Test labels as indices into the train classes; a test class the train set lacks is a
    one-line error (its images could never be classified right)."""
    if train == test:
        return test_labels
    index = {c: i for i, c in enumerate(train)}
    present = sorted({test[i] for i in test_labels.unique().tolist()})
    missing = [c for c in present if c not in index]
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise UserError(
            f"--test {name} has classes the train set lacks ({shown}); train classes: "
            f"{', '.join(train[:10])}{' …' if len(train) > 10 else ''}"
        )
    lookup = torch.tensor([index.get(c, -1) for c in test], dtype=torch.long)
    return lookup[test_labels]


# ---------------------------------------------------------------------------------------------
# Extraction


def to_input(images: Tensor, channels_last: bool = False) -> Tensor:
    """uint8 (B, 3, S, S) → float32, normalised with the training mean and std."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    x = (images.float() / 255.0 - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def extract(
    backbone: nn.Module,
    labeled: LabeledSet,
    *,
    device: torch.device,
    batch_size: int = 256,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    channels_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor, SkipLog]:
    """(features (N, D) float32, found (N,) bool, skipped files) on ``device``.

    With several processes each computes its share of the rows; the others stay zero and
    ``found`` False, so summing the processes' results gathers the whole set. Rows of files
    that could not be decoded are not found either. The backbone is put in eval mode and back.
    """
    n = len(labeled)
    skips = SkipLog(labeled.name)
    loader = make_loader(
        labeled.images,
        batch_size,
        device=device,
        shuffle=False,
        drop_last=False,
        rank=rank,
        world_size=world_size,
        num_workers=0 if isinstance(labeled.images, ArrayImages) else num_workers,
        skip_log=skips,
    )
    features: Tensor | None = None
    found = torch.zeros(n, dtype=torch.bool, device=device)
    was_training = backbone.training
    backbone.eval()
    bar = tqdm(
        total=len(loader), desc=f"features {labeled.name}", unit="batch", disable=not progress
    )
    try:
        with torch.no_grad():
            for batch in loader.iterate(0):
                with autocast():
                    out = backbone(to_input(batch.images, channels_last))
                if features is None:
                    features = torch.zeros((n, out.shape[1]), dtype=torch.float32, device=device)
                rows = batch.indices.to(device)
                features[rows] = out.float()
                found[rows] = True
                bar.update(1)
    finally:
        bar.close()
        backbone.train(was_training)
    if features is None:  # this process had no rows (more processes than batches)
        width = getattr(backbone, "out_dim", None) or _probe_width(backbone, labeled, device)
        features = torch.zeros((n, width), dtype=torch.float32, device=device)
    return features, found, skips


def extract_all(
    module: nn.Module,
    labeled: LabeledSet,
    *,
    device: torch.device,
    accelerator=None,
    batch_size: int = 256,
    channels_last: bool = False,
    num_workers: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(outputs (N, D), found (N,)) of the whole set on every process: each process runs its
    share (:func:`extract`) under the accelerator's autocast, and the disjoint shares are summed
    (one process, or none: the share is the whole)."""
    world = 1 if accelerator is None else accelerator.num_processes
    out, found, _ = extract(
        module,
        labeled,
        device=device,
        batch_size=batch_size,
        autocast=accelerator.autocast if accelerator is not None else contextlib.nullcontext,
        channels_last=channels_last,
        rank=0 if accelerator is None else accelerator.process_index,
        world_size=world,
        num_workers=num_workers,
    )
    if world > 1:
        out = accelerator.reduce(out, reduction="sum")
        found = accelerator.reduce(found.int(), reduction="sum") > 0
    return out, found


def _probe_width(backbone: nn.Module, labeled: LabeledSet, device: torch.device) -> int:
    side = labeled.images.load_size
    with torch.no_grad():
        was = backbone.training
        backbone.eval()
        width = backbone(torch.zeros((1, 3, side, side), device=device)).shape[1]
        backbone.train(was)
    return width


# ---------------------------------------------------------------------------------------------
# The disk cache of features


@dataclass
class Features:
    """The features of the decodable images of a labeled set."""

    features: Tensor  # (n, D) float32, CPU
    labels: Tensor  # (n,) int64, indices into classes
    classes: list[str]
    skipped: SkipLog
    from_cache: bool
    seconds: float  # extraction time (0 when read from the cache)
    rows: Tensor | None = None  # (n,) int64: the rows of the set these are (None: all, in order)


def features_dir(cache_dir: str | Path | None = None) -> Path:
    return (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "features"


def feature_key(weights_sha256: str, labeled: LabeledSet, size: int, precision: str) -> str:
    parts = {
        "version": FEATURE_CACHE_VERSION,
        "weights": weights_sha256,
        "set": labeled.fingerprint,
        "size": size,
        "precision": precision,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _read_cached(path: Path, name: str) -> Features | None:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            features, labels = f.get_tensor("features"), f.get_tensor("labels")
            rows = f.get_tensor("rows")
        classes = json.loads(meta["classes"])
        skipped = [Skip(*s) for s in json.loads(meta["skipped"])]
    except (SafetensorError, OSError, KeyError, ValueError):
        return None  # damaged: extract again
    log = SkipLog(name)
    log.add(skipped)
    os.utime(path)  # most recently used
    return Features(features, labels, classes, log, True, 0.0, rows)


def _write_cached(path: Path, result: Features) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "classes": json.dumps(result.classes),
        "skipped": json.dumps([[s.path, s.kind, s.detail] for s in result.skipped]),
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tensors = {"features": result.features, "labels": result.labels, "rows": result.rows}
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    kept = sorted(path.parent.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in kept[KEEP_FEATURE_FILES:]:
        old.unlink(missing_ok=True)


def cached_features(
    backbone: nn.Module,
    labeled: LabeledSet,
    *,
    weights_sha256: str,
    precision: str,
    device: torch.device,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    **extract_kwargs,
) -> Features:
    """The features of ``labeled``, from the disk cache when this (weights, set, size,
    precision) was extracted before; otherwise extracted (see :func:`extract`) and stored."""
    size = labeled.images.load_size
    key = feature_key(weights_sha256, labeled, size, precision)
    path = features_dir(cache_dir) / f"{key}.safetensors"
    if use_cache and path.is_file():
        hit = _read_cached(path, labeled.name)
        if hit is not None:
            return hit
    start = time.perf_counter()
    features, found, skips = extract(backbone, labeled, device=device, **extract_kwargs)
    found = found.cpu()
    result = Features(
        features.cpu()[found],
        labeled.labels[found],
        labeled.classes,
        skips,
        False,
        time.perf_counter() - start,
        torch.nonzero(found).flatten(),
    )
    if use_cache:
        _write_cached(path, result)
    return result


__all__ = [
    "Features",
    "LabeledSet",
    "align_classes",
    "cached_features",
    "evenly_spaced",
    "extract",
    "extract_all",
    "feature_key",
    "features_dir",
    "open_labeled",
    "open_set",
    "split_spec",
    "take_rows",
    "to_input",
]
