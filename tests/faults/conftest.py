"""Shared fixtures of the fault suite: the engine tests' small image folder, and a finished tiny
run with a labeled folder to evaluate or fine-tune it on."""

import numpy as np
import pytest
from PIL import Image

from lowres_ssl.tasks import train
from tests.engine.conftest import folder  # noqa: F401 (a fixture, found by name)
from tests.tiny import tiny


@pytest.fixture(scope="module")
def finished(folder, tmp_path_factory):  # noqa: F811
    """(run, labeled): a finished tiny run and a labeled folder of two classes of 6 images."""
    base = tmp_path_factory.mktemp("finished")
    run = base / "run"
    train(tiny(folder, train={"max_steps": 3}), run, progress_bar=False)
    labeled = base / "labeled"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (labeled / c).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(labeled / c / f"{i}.png")
    return run, labeled
