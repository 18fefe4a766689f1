"""Shared fixtures of the task tests: a labeled folder of colours, and a tiny pre-trained run."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lowres_ssl.tasks import train
from tests.tiny import tiny

CLASSES = ("blue", "green", "red")


def _labeled(root, per_class, seed, broken=False):
    """Images whose class is their dominant colour (learnable in a few steps), 18 x 20 px."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (18, 20, 3))
            pixels[..., 2 - c] += 160  # blue → channel 2, green → 1, red → 0
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i:02d}.png")
    if broken:
        (root / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    return root


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    """(train, val): 3 classes of 16 and of 6 images; the train set has one corrupt file."""
    base = tmp_path_factory.mktemp("labeled")
    return _labeled(base / "train", 16, 0, broken=True), _labeled(base / "val", 6, 1)


@pytest.fixture(scope="module")
def pretrained(labeled, tmp_path_factory):
    """A tiny self-supervised run on the training images (weights to fine-tune from)."""
    out = tmp_path_factory.mktemp("pre") / "run"
    train(tiny(labeled[0], train={"epochs": 1, "batch_size": 8}), out, progress_bar=False)
    return out
