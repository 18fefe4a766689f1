"""Bad configuration and input: each preset with one field of the wrong type, negative, zero
or absurdly large; an empty folder, a folder of one image, images of 1 x 1 and 20,000 x 20,000
pixels — one line each, never a traceback (``--dry-run`` where the config is the question, a
real short run where the images are)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lowres_ssl import cli
from lowres_ssl.presets import available

#: (key, value) that no run can use, by kind: one line naming the key.
BAD = {
    "wrong type": [("train.batch_size", "many"), ("optim.base_lr", "fast"), ("loss.lam", "[1]"),
                   ("data.load_size", "[96, 96]"), ("train.precision", "7")],
    "negative": [("train.batch_size", "-4"), ("optim.base_lr", "-1"), ("loss.lam", "-1"),
                 ("train.epochs", "-1"), ("data.load_size", "-16")],
    "zero": [("train.batch_size", "0"), ("train.epochs", "0"), ("data.load_size", "0"),
             ("train.checkpoint_every", "0"), ("train.keep_checkpoints", "0")],
    "huge": [("train.batch_size", "1000000000"), ("data.load_size", "100000"),
             ("photos.data.load_size", "100000"), ("model.projector", "1024-100000000")],
}  # fmt: skip
CASES = [(kind, key, value) for kind, pairs in BAD.items() for key, value in pairs]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("preset", available())
@pytest.mark.parametrize(("kind", "key", "value"), CASES, ids=[f"{k}-{n}" for k, n, _ in CASES])
def test_a_bad_field_of_any_preset_is_one_line(images, capsys, preset, kind, key, value):
    argv = ["--preset", preset, "--data", str(images), "--set", f"{key}={value}", "--dry-run"]
    assert cli.train_main(argv) == 2, (preset, key, value)
    assert key.split(".")[-1] in _one_line(capsys)


def _png(path, width, height):
    """A PNG whose header says ``width`` x ``height`` (pixels: one deflated zero row each)."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    raw = zlib.compress(b"\0" * (1 + 3 * width) * min(height, 4))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw)
                     + chunk(b"IEND", b""))  # fmt: skip
    return path


def _train(folder, tmp_path, capsys):
    """One epoch of the cpu preset, small; the decoded cache reads every file first."""
    argv = ["--preset", "cpu", "--data", str(folder), "--out", str(tmp_path / "run"),
            "--epochs", "1", "--set", f"data.cache_dir={tmp_path / 'cache'}",
            "--set", "data.num_workers=0",
            "--set", "model.projector=32-64", "--set", "train.batch_size=2"]  # fmt: skip
    return cli.train_main(argv)


def test_an_empty_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert _train(tmp_path / "empty", tmp_path, capsys) == 2
    assert "empty" in _one_line(capsys)


def test_a_folder_of_one_image_is_one_line(tmp_path, capsys):
    folder = tmp_path / "one"
    folder.mkdir()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(folder / "only.png")
    assert _train(folder, tmp_path, capsys) == 2
    assert "1 image" in _one_line(capsys)


def test_tiny_and_enormous_images_are_skipped_and_listed(tmp_path, capsys):
    """1 x 1 px (too small) and a 20,000 x 20,000 header (a decompression bomb: too large)
    beside good images: both skipped and listed, the run goes on."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    Image.new("RGB", (1, 1)).save(folder / "dot.png")
    _png(folder / "bomb.png", 20_000, 20_000)
    assert _train(folder, tmp_path, capsys) == 0
    listed = (tmp_path / "run" / "skipped_files.txt").read_text()
    assert "dot.png\ttoo-small" in listed and "bomb.png\ttoo-large" in listed


def test_a_folder_of_only_unusable_images_is_one_line(tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    Image.new("RGB", (1, 1)).save(folder / "dot.png")
    _png(folder / "bomb.png", 20_000, 20_000)
    assert _train(folder, tmp_path, capsys) == 2
    line = _one_line(capsys)
    assert "unusable" in line or "no usable" in line
