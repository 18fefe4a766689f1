"""Shared fixtures of the engine tests."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """64 small images in nested folders, and one corrupt file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(64):
        path = root / f"part{i % 2}" / f"img{i:02d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (18, 20, 3), dtype=np.uint8)).save(path)
    (root / "part0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    return root
