"""Datasets by name: ``digits`` inside scikit-learn, and ``cifar10``, ``cifar100``, ``stl10``
for users with internet.

``digits`` is read from the installed scikit-learn (no network, no cache). torchvision
downloads the others once into ``<cache>/datasets``; they are already uint8 arrays, so they load
straight into an :class:`ArrayImages` with no decoding.

A spec such as ``cifar10:test`` names a dataset and a split; :func:`dataset_spec` is the one
place that tells a dataset by name from a folder.
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
    "digits": ("train", "test"),
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "stl10": ("train", "test", "unlabeled", "train+unlabeled"),
}
"""Dataset names and their splits (STL-10's 100,000 unlabeled images are for pre-training)."""

SIZES = {
    ("digits", "train"): 1_352,
    ("digits", "test"): 445,
    ("cifar10", "train"): 50_000,
    ("cifar10", "test"): 10_000,
    ("cifar100", "train"): 50_000,
    ("cifar100", "test"): 10_000,
    ("stl10", "train"): 5_000,
    ("stl10", "test"): 8_000,
    ("stl10", "unlabeled"): 100_000,
    ("stl10", "train+unlabeled"): 105_000,
}
"""Images in each (dataset, split), known without loading it."""

#: The side of the ``digits`` images: the 8 × 8 originals upscaled 4× to the kit's small size.
DIGITS_SIDE = 32
#: Every ``DIGITS_TEST_EVERY``-th image of each class (in the package's order) is a test image.
DIGITS_TEST_EVERY = 4


def dataset_spec(spec: str | Path) -> tuple[str, str | None] | None:
    """A built-in dataset named by ``spec``, or None for a folder.

    ``"CIFAR10"`` → ``("cifar10", None)``, ``"cifar10:test"`` → ``("cifar10", "test")``: the
    lower-cased name and the split as written (None when none is; not checked against
    :data:`SPLITS`). Anything else is a folder, and so is an existing path that bears a
    dataset's name: a folder wins over a name.

    >>> dataset_spec("digits:test"), dataset_spec("photos")
    (('digits', 'test'), None)
    """
    text = str(spec)
    if Path(text).expanduser().exists():
        return None
    name, sep, split = text.partition(":")
    if name.lower() not in SPLITS:
        return None
    return name.lower(), split if sep else None


def dataset_size(spec: str | Path, split: str = "train") -> int | None:
    """The images of the built-in dataset ``spec`` names (at its own split if it has one, else
    at ``split``), known without loading it; None for a folder."""
    named = dataset_spec(spec)
    if named is None:
        return None
    name, split = named[0], named[1] or split
    check_split(name, split)
    return SIZES[name, split]


def check_split(name: str, split: str) -> None:
    """A one-line :class:`UserError` unless the dataset ``name`` has the split ``split``."""
    if split not in SPLITS[name]:
        raise UserError(f"{name} has no split {split!r}; choose one of {', '.join(SPLITS[name])}")


def _load_digits(split: str):
    """(uint8 images (N, 3, 32, 32), int64 labels (N,), class names) of scikit-learn's 1,797
    handwritten digits, split by a fixed rule.

    Split: within each class, in the package's order, every fourth image is a test image
    (positions 3, 7, 11, …): 75 % / 25 % stratified, with no random stream that a library
    version could change. Pixels: each of the 8 × 8 counts the ink in a 4 × 4 block of a
    32 × 32 scan (0..16), scaled to 0..255 (ink bright). Upscaling back to 32 × 32: bilinear,
    which draws the strokes as smooth ramps; nearest would draw 4 × 4 blocks whose edges are a
    grid no pen made, and bicubic overshoots at the full-contrast edges (clipped rims). The
    weights of a 4× bilinear upscale are multiples of 1/8, so every value is exact in float32
    and the images are the same bytes on every machine.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # an environment installed before scikit-learn was a dependency
        raise UserError(
            "digits is read from scikit-learn, which is not installed: pip install scikit-learn "
            "(or pass a folder of images: --data /path/to/images)"
        ) from None
    digits = load_digits()
    labels = torch.from_numpy(digits.target.astype(np.int64))
    rank = torch.empty_like(labels)  # each image's position within its class
    for c in range(10):
        rows = torch.nonzero(labels == c).flatten()
        rank[rows] = torch.arange(len(rows))
    test = rank % DIGITS_TEST_EVERY == DIGITS_TEST_EVERY - 1
    rows = torch.nonzero(test if split == "test" else ~test).flatten()
    grey = torch.from_numpy(digits.images.astype(np.float32))[rows].unsqueeze(1)
    big = F.interpolate(grey, size=(DIGITS_SIDE, DIGITS_SIDE), mode="bilinear", align_corners=False)
    images = (big * (255 / 16)).round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
    return images.contiguous(), labels[rows], [str(c) for c in range(10)]


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


def _download(name: str, split: str, root: str | Path | None, download: bool):
    """:func:`_load_torchvision` under ``root`` (default ``<cache>/datasets``); no network and
    no copy there is a one-line :class:`UserError`."""
    root = Path(root) if root is not None else default_cache_dir() / "datasets"
    root.mkdir(parents=True, exist_ok=True)
    try:
        return _load_torchvision(name, split, root, download)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; torchvision raises both
        cause = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"cannot load {name} from {root} ({cause}); without internet, pass a folder of "
            f"images instead (--data /path/to/images), or --data digits, which is installed"
        ) from None


def load_builtin(
    name: str,
    *,
    split: str = "train",
    load_size: int | None = None,
    root: str | Path | None = None,
    download: bool = True,
) -> ArrayImages:
    """A dataset by name as an in-memory uint8 array, resized to ``load_size`` if given.

    ``digits`` comes from the installed scikit-learn (``root`` and ``download`` unused). The
    others, with no network and no copy under ``root``, raise a one-line :class:`UserError` that
    says to pass a folder of images instead.
    """
    if name not in SPLITS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(SPLITS)}")
    check_split(name, split)
    if name == "digits":
        images, labels, classes = _load_digits(split)
    else:
        images, labels, classes = _download(name, split, root, download)
    if load_size is not None:
        images = resize_uint8(images, load_size)
    return ArrayImages(
        images=images,
        name=name,
        labels=None if bool((labels < 0).all()) else labels,
        classes=classes,
    )
