"""Datasets by name (``cifar10``, ``cifar100``, ``stl10``) for users with internet.

torchvision downloads them once into ``<cache>/datasets``; they are already uint8 arrays, so
they load straight into an :class:`ArrayImages` with no decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lowres_ssl.data.cache import ArrayImages, default_cache_dir
from lowres_ssl.errors import UserError

SPLITS = {
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "stl10": ("train", "test", "unlabeled", "train+unlabeled"),
}
"""Dataset names and their splits (STL-10's 100,000 unlabeled images are for pre-training)."""


def _load_torchvision(name: str, split: str, root: Path, download: bool):
    """(uint8 images (N, 3, H, W), int64 labels (N,) with -1 for unlabeled, class names)."""
    import torchvision.datasets as tvd

    if name in ("cifar10", "cifar100"):
        cls: Callable = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        ds = cls(root=str(root), train=split == "train", download=download)
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2)
        return images.contiguous(), torch.tensor(ds.targets, dtype=torch.long), list(ds.classes)
    ds = tvd.STL10(root=str(root), split=split, download=download)
    return torch.from_numpy(ds.data), torch.from_numpy(ds.labels).long(), list(ds.classes)


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """Resize a uint8 (N, 3, H, W) square set to (N, 3, size, size), bicubic, antialiased."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.empty((images.shape[0], 3, size, size), dtype=torch.uint8)
    for i in range(0, images.shape[0], chunk):
        x = images[i : i + chunk].float()
        y = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)
        out[i : i + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def load_builtin(
    name: str,
    *,
    split: str = "train",
    load_size: int | None = None,
    root: str | Path | None = None,
    download: bool = True,
) -> ArrayImages:
    """A dataset by name as an in-memory uint8 array, resized to ``load_size`` if given.

    With no network and no copy under ``root`` this raises a one-line :class:`UserError` that
    says to pass a folder of images instead.
    """
    if name not in SPLITS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(SPLITS)}")
    if split not in SPLITS[name]:
        raise UserError(f"{name} has no split {split!r}; choose one of {', '.join(SPLITS[name])}")
    root = Path(root) if root is not None else default_cache_dir() / "datasets"
    root.mkdir(parents=True, exist_ok=True)
    try:
        images, labels, classes = _load_torchvision(name, split, root, download)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; torchvision raises both
        cause = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"cannot load {name} from {root} ({cause}); without internet, pass a folder of "
            f"images instead: --data /path/to/images"
        ) from None
    if load_size is not None:
        images = resize_uint8(images, load_size)
    return ArrayImages(
        images=images,
        name=name,
        labels=None if bool((labels < 0).all()) else labels,
        classes=classes,
    )
