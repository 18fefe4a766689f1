"""Datasets by name: ``digits`` from scikit-learn, one spec rule for "a name or a folder", the
sizes known without loading (the torchvision datasets' loading is tested in test_loader.py)."""

from __future__ import annotations

import hashlib
import socket
import sys

import pytest
import torch

from lowres_ssl.data import DATASET_SIZES, DATASETS, dataset_size, dataset_spec, open_images
from lowres_ssl.data.builtin import DIGITS_SIDE, load_builtin
from lowres_ssl.errors import UserError


@pytest.fixture(scope="module")
def digits():
    return {split: load_builtin("digits", split=split) for split in ("train", "test")}


def test_digits_are_labeled_uint8_rgb_at_32_px_split_75_25_in_every_class(digits):
    from sklearn.datasets import load_digits

    per_class = torch.bincount(torch.from_numpy(load_digits().target), minlength=10)
    train, test = digits["train"], digits["test"]
    for split, arr in digits.items():
        assert arr.images.dtype == torch.uint8 and arr.labels.dtype == torch.long
        assert arr.images.shape == (DATASET_SIZES["digits", split], 3, DIGITS_SIDE, DIGITS_SIDE)
        assert arr.classes == [str(c) for c in range(10)]
        assert torch.equal(arr.images[:, 0], arr.images[:, 1])  # grey: R = G = B
        assert torch.equal(arr.images[:, 0], arr.images[:, 2])
        assert arr.images.min() == 0 and arr.images.max() == 255  # 0..16 spans 0..255
    assert torch.equal(torch.bincount(test.labels, minlength=10), per_class // 4)
    assert torch.equal(torch.bincount(train.labels, minlength=10), per_class - per_class // 4)
    assert len(train) + len(test) == 1_797


def test_digits_are_the_same_bytes_on_every_machine(digits):
    """The split is a rule and a 4x bilinear upscale of 0..16 is exact in float32: a changed
    hash means scikit-learn's data, the split rule or the interpolation changed."""
    pinned = {"train": "e5dd6a0a3db00d45", "test": "1ea01312bd54dcb0"}
    for split, arr in digits.items():
        h = hashlib.sha256(arr.images.numpy().tobytes())
        h.update(arr.labels.numpy().tobytes())
        assert h.hexdigest()[:16] == pinned[split], split


def test_digits_test_images_are_not_train_images(digits):
    train = {bytes(x) for x in digits["train"].images[:, 0].flatten(1).numpy()}
    test = [bytes(x) for x in digits["test"].images[:, 0].flatten(1).numpy()]
    assert len(train) == len(digits["train"])  # no image twice
    assert not any(x in train for x in test)


def test_digits_need_no_network_and_write_nothing(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("LOWRES_SSL_CACHE", str(tmp_path / "cache"))
    arr = open_images("digits:test", load_size=16, labeled=True, cache="disk")
    assert arr.images.shape == (445, 3, 16, 16) and arr.labels is not None
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("digits", ("digits", None)),
        ("CIFAR10", ("cifar10", None)),
        ("cifar10:test", ("cifar10", "test")),
        ("stl10:train+unlabeled", ("stl10", "train+unlabeled")),
        ("cifar10:val", ("cifar10", "val")),  # the split as written: its check is the caller's
        ("photos", None),
        ("/no/such/folder", None),
        ("imagenet:val", None),
    ],
)
def test_dataset_spec_tells_a_name_from_a_folder(spec, expected):
    assert dataset_spec(spec) == expected


def test_an_existing_folder_wins_over_a_dataset_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()
    assert dataset_spec("digits") is None and dataset_size("digits") is None
    assert dataset_spec(tmp_path / "digits") is None
    assert dataset_spec("cifar10") == ("cifar10", None)


def test_every_split_has_a_size():
    assert set(DATASET_SIZES) == {(name, s) for name, splits in DATASETS.items() for s in splits}


def test_dataset_size_of_a_spec(tmp_path):
    assert dataset_size("digits") == 1_352
    assert dataset_size("digits", "test") == dataset_size("digits:test") == 445
    assert dataset_size("stl10:train", "test") == 5_000  # the spec's own split wins
    assert dataset_size(tmp_path) is None
    with pytest.raises(UserError, match="cifar10 has no split 'val'; choose one of train, test"):
        dataset_size("cifar10:val")


def test_digits_without_scikit_learn_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails
    with pytest.raises(UserError, match="pip install scikit-learn") as e:
        load_builtin("digits")
    assert "\n" not in str(e.value)
