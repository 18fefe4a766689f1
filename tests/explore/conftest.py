"""A tiny labeled folder and a weights file for the explorer's tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lowres_ssl.models import build_backbone
from lowres_ssl.weights import save_safetensors, spec_of

CLASSES = ("cat", "dog", "eel")
PER_CLASS = 6


def write_images(folder, names, seed):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    """root/<class>/<i>.png, 18 good images, and one broken file in the first class."""
    root = tmp_path_factory.mktemp("photos")
    for n, c in enumerate(CLASSES):
        write_images(root / c, [f"{i}.png" for i in range(PER_CLASS)], seed=n)
    (root / CLASSES[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A ResNet-18 for 16-px images as a weights file (what export.py writes)."""
    torch.manual_seed(0)
    net = build_backbone("resnet18", image_size=16)
    path = tmp_path_factory.mktemp("weights") / "backbone.safetensors"
    save_safetensors(net.state_dict(), spec_of(net, 16, None), path)
    return path
