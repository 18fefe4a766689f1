"""The view size a set of images should be trained at, chosen from the images themselves.

``data.load_size: auto`` (the default) reads the headers of up to :data:`SAMPLE` files spread
over the folder (no decoding; a few milliseconds each) and takes the median shorter side:

- **small images** (median shorter side ≤ 64 px: CIFAR, Tiny ImageNet, icons) are trained at
  their own size, rounded to a multiple of 8 (32 px for CIFAR's 32 × 32, 32 for 28 × 28), with
  the CIFAR stem;
- **photos** (anything larger) at the preset's ``photos.data.load_size`` (96–128 px), or at
  their own size rounded down to a multiple of 16 where that is smaller (96 px for STL-10's).

A dataset name has its known size (cifar10/cifar100: 32 px, stl10: 96 px). ``--set
data.load_size=N`` chooses the size by hand.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from lowres_ssl.small_images import SMALL_MAX

#: Files whose headers are read.
SAMPLE = 64
#: Known sizes of the datasets by name (their shorter side).
DATASET_SIDES = {"digits": 32, "cifar10": 32, "cifar100": 32, "stl10": 96}


@dataclass(frozen=True)
class ViewSizeChoice:
    size: int
    median_side: int | None  # the images' median shorter side (None: not measured)
    sampled: int  # headers read
    reason: str  # one line: what was found and what was chosen

    def __str__(self) -> str:
        return self.reason


def size_for_side(side: int, photo_size: int) -> int:
    """The view size for images of median shorter side ``side`` (see the module doc)."""
    if side <= SMALL_MAX:
        return max(16, min(SMALL_MAX, 8 * int(side / 8 + 0.5)))  # halves round up
    return max(SMALL_MAX + 16, min(photo_size, 16 * (side // 16)))


def median_short_side(root: str | Path, sample: int = SAMPLE) -> tuple[int | None, int]:
    """(median shorter side, headers read) of up to ``sample`` images spread over ``root``."""
    from PIL import Image

    from lowres_ssl.data.folders import scan_folder

    files = scan_folder(root)
    n = len(files)
    picks = sorted({i * n // sample for i in range(min(sample, n))})
    sides = []
    for i in picks:
        try:
            with Image.open(files.root / files.paths[i]) as im:
                sides.append(min(im.size))
        except Exception:  # unreadable files are listed by the loader, not here
            continue
    if not sides:
        return None, 0
    return int(statistics.median(sides)), len(sides)


def choose_view_size(data: str, photo_size: int) -> ViewSizeChoice:
    """The view size for the data ``data`` (a folder or a dataset name); see the module doc."""
    from lowres_ssl.data.builtin import dataset_spec

    named = dataset_spec(data)
    if named is not None:
        name = named[0]
        side = DATASET_SIDES[name]
        size = size_for_side(side, photo_size)
        return ViewSizeChoice(size, side, 0, f"{name}: {side} px images → views of {size} px")
    side, sampled = median_short_side(Path(data).expanduser())
    if side is None:
        size = photo_size
        return ViewSizeChoice(size, None, 0, f"no readable image headers → views of {size} px")
    size = size_for_side(side, photo_size)
    kind = "small images" if side <= SMALL_MAX else "photos"
    why = "the preset's photo size" if side > SMALL_MAX and size == photo_size else "their size"
    return ViewSizeChoice(
        size,
        side,
        sampled,
        f"{kind} (median shorter side {side} px, {sampled} files read) → views of {size} px "
        f"({why}; --set data.load_size=N to choose)",
    )


__all__ = [
    "DATASET_SIDES",
    "SAMPLE",
    "SMALL_MAX",
    "ViewSizeChoice",
    "choose_view_size",
    "median_short_side",
    "size_for_side",
]
