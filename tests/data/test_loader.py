"""Batches on the device: the epoch order (replayable for resume), the three loaders, the cache
choice, and datasets by name."""

from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from lowres_ssl.data import (
    ArrayImages,
    EpochOrder,
    FolderImages,
    load_builtin,
    make_loader,
    open_images,
)
from lowres_ssl.data import builtin as builtin_module
from lowres_ssl.errors import UserError
from tests.shared_data import cifar10_root


def _write_pngs(folder, n, size=20, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = rng.integers(0, 256, (size, size + i % 3, 3), dtype=np.uint8)
        Image.fromarray(a).save(folder / f"img{i:03d}.png")


# ---------------------------------------------------------------------------------------------
# EpochOrder


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a = EpochOrder(100, 8, seed=3)
    b = EpochOrder(100, 8, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.batches(5), b.batches(5), strict=True))
    assert not torch.equal(a.permutation(5), a.permutation(6))
    assert not torch.equal(a.permutation(5), EpochOrder(100, 8, seed=4).permutation(5))


def test_epoch_order_start_is_the_tail_of_the_epoch():
    order = EpochOrder(100, 8, seed=1)
    full = order.batches(2)
    tail = order.batches(2, start=5)
    assert len(full) == 12 and len(tail) == 7
    assert all(torch.equal(x, y) for x, y in zip(full[5:], tail, strict=True))


@pytest.mark.parametrize("drop_last", [True, False])
def test_epoch_order_covers_each_row_at_most_once(drop_last):
    order = EpochOrder(103, 10, drop_last=drop_last)
    rows = torch.cat(order.batches(0))
    assert len(set(rows.tolist())) == len(rows)
    assert len(rows) == (100 if drop_last else 103)
    assert len(order) == (10 if drop_last else 11)


@pytest.mark.parametrize("drop_last", [True, False])
def test_processes_split_each_global_batch(drop_last):
    """Two processes together see exactly the global batches of one process of twice the
    batch: the global-batch regulariser sees the same rows either way."""
    one = EpochOrder(45, 8, seed=7, drop_last=drop_last).batches(1)
    ranks = [
        EpochOrder(45, 4, seed=7, drop_last=drop_last, rank=r, world_size=2).batches(1)
        for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for g, r0, r1 in zip(one, ranks[0], ranks[1], strict=True):
        assert torch.equal(torch.cat([r0, r1]), g)
    if not drop_last:  # 45 = 5·8 + 5: the last global batch is split 3 + 2
        assert (len(ranks[0][-1]), len(ranks[1][-1])) == (3, 2)


def test_epoch_order_errors_are_one_line():
    with pytest.raises(UserError, match="fewer than one global batch") as e:
        EpochOrder(10, 8, world_size=2)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="at least 1"):
        EpochOrder(10, 0)


def test_no_shuffle_keeps_file_order():
    assert torch.equal(torch.cat(EpochOrder(20, 5, shuffle=False).batches(3)), torch.arange(20))


# ---------------------------------------------------------------------------------------------
# Loaders


def _array(n=40, size=8, labels=True):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    lab = torch.arange(n) % 4 if labels else None
    return ArrayImages(images, "test", lab, ["a", "b", "c", "d"] if labels else None)


@pytest.mark.parametrize("prefetch", [0, 3])
def test_array_loader_delivers_rows_with_labels(prefetch):
    arr = _array()
    loader = make_loader(arr, 8, seed=2)
    loader.prefetch = prefetch
    seen = []
    for b in loader.iterate(0):
        assert b.images.dtype == torch.uint8 and b.images.shape == (8, 3, 8, 8)
        assert torch.equal(b.images, arr.images[b.indices])
        assert torch.equal(b.labels, arr.labels[b.indices])
        seen += b.indices.tolist()
    assert sorted(seen) == list(range(40))


@pytest.mark.parametrize(("held_on", "given"), [("cpu", "cpu:0"), ("cpu:0", "cpu")])
def test_a_set_on_the_device_under_another_name_is_indexed_in_place(monkeypatch, held_on, given):
    """Accelerate's device on one GPU is ``cuda`` while the set cached there reports
    ``cuda:0``; ``==`` calls them different, and the loader then took the threaded path that
    pins rows ("cannot pin 'torch.cuda.ByteTensor'"). ``cpu`` and ``cpu:0`` are the same
    pair on the CPU: the loader must index the set in place, without a thread or a pin."""

    def refused(*args, **kwargs):
        raise AssertionError("a set on the training device took the copying path")

    arr = _array().to(held_on)
    loader = make_loader(arr, 8, seed=2, device=given)
    monkeypatch.setattr(type(loader), "_threaded", refused)
    monkeypatch.setattr(torch.Tensor, "pin_memory", refused)
    batches = list(loader.iterate(0))
    assert len(batches) == 5
    assert all(torch.equal(b.images, arr.images[b.indices]) for b in batches)


def test_array_loader_resumes_mid_epoch_and_stops_early():
    loader = make_loader(_array(), 8, seed=2)
    full = [b.indices for b in loader.iterate(4)]
    tail = [b.indices for b in loader.iterate(4, start=3)]
    assert all(torch.equal(x, y) for x, y in zip(full[3:], tail, strict=True))
    it = loader.iterate(5)
    next(it)
    it.close()  # the prefetch thread must stop, not hang
    # Iterating the loader itself walks the epochs 0, 1, 2, …
    assert torch.equal(next(iter(loader)).indices, loader.order.batches(0)[0])
    assert torch.equal(next(iter(loader)).indices, loader.order.batches(1)[0])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_decoding_and_disk_cache_deliver_identical_batches(tmp_path, num_workers):
    """With no bad files, decoding every epoch and reading the disk cache give the same
    batches, bit for bit: the cache changes speed, never the data."""
    _write_pngs(tmp_path / "imgs" / "sub", 13)
    _write_pngs(tmp_path / "imgs", 11, seed=1)
    decoded = open_images(tmp_path / "imgs", load_size=10, cache="none")
    cached = open_images(
        tmp_path / "imgs", load_size=10, cache="disk", cache_dir=tmp_path / "c", progress=False
    )
    assert isinstance(decoded, FolderImages) and isinstance(cached, ArrayImages)
    assert cached.paths == decoded.files.paths
    a = make_loader(decoded, 5, seed=9, num_workers=num_workers)
    b = make_loader(cached, 5, seed=9)
    for epoch in (0, 1):
        pairs = list(zip(a.iterate(epoch, start=1), b.iterate(epoch, start=1), strict=True))
        assert len(pairs) == 3
        for x, y in pairs:
            assert torch.equal(x.indices, y.indices)
            assert torch.equal(x.images, y.images)


def test_folder_loader_drops_bad_files_and_logs_them(tmp_path):
    _write_pngs(tmp_path, 6)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    images = open_images(tmp_path, load_size=8, cache="none")
    loader = make_loader(images, 7, drop_last=False, num_workers=0)
    batches = list(loader.iterate(0))
    assert sum(len(b.indices) for b in batches) == 6
    assert [s.path for s in loader.skip_log] == ["broken.jpg"]
    assert loader.skip_log.summary(used=6) == "skipped 1 file (1 corrupt); 6 used"


def test_decoding_a_folder_of_only_bad_files_is_a_one_line_error(tmp_path):
    """Without a cache the bad files are found while decoding: an epoch that delivers no
    image at all stops with the same error as the cache build."""
    (tmp_path / "a.png").write_bytes(b"nope")
    (tmp_path / "b.jpg").write_bytes(b"nope")
    loader = make_loader(open_images(tmp_path, load_size=8, cache="none"), 1, num_workers=0)
    with pytest.raises(UserError, match="no usable image") as e:
        list(loader.iterate(0))
    assert "\n" not in str(e.value) and "2 files, all unusable" in str(e.value)


def test_labeled_folder_gives_labels(tmp_path):
    for name in ("cat", "ant"):
        _write_pngs(tmp_path / name, 3)
    images = open_images(tmp_path, load_size=8, labeled=True, cache="none")
    assert images.classes == ["ant", "cat"]
    loader = make_loader(images, 2, shuffle=False, num_workers=0)
    labels = torch.cat([b.labels for b in loader.iterate(0)])
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]


# ---------------------------------------------------------------------------------------------
# Cache choice


def test_cache_choices_on_cpu(tmp_path):
    _write_pngs(tmp_path / "imgs", 4)
    kw = dict(load_size=8, cache_dir=tmp_path / "c", progress=False)
    assert isinstance(open_images(tmp_path / "imgs", cache="none", **kw), FolderImages)
    for cache in ("disk", "gpu", "auto"):
        arr = open_images(tmp_path / "imgs", cache=cache, **kw)
        assert isinstance(arr, ArrayImages) and len(arr) == 4
    with pytest.raises(UserError, match="choose one of auto, none, disk, gpu"):
        open_images(tmp_path / "imgs", cache="ram", **kw)
    with pytest.raises(UserError, match="does not exist"):
        open_images(tmp_path / "nothing", cache="none", load_size=8)


def test_a_cache_of_only_bad_files_is_a_one_line_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"nope")
    (tmp_path / "b.jpg").write_bytes(b"nope")
    with pytest.raises(UserError, match="no usable image") as e:
        open_images(tmp_path, load_size=8, cache="disk", cache_dir=tmp_path / "c", progress=False)
    assert "\n" not in str(e.value) and ".jpg" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Datasets by name


def test_dataset_by_name_offline_is_a_one_line_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(builtin_module, "_load_torchvision", offline)
    with pytest.raises(UserError, match="pass a folder of images instead") as e:
        open_images("cifar10", load_size=32, cache_dir=tmp_path)
    assert "\n" not in str(e.value) and "cifar10" in str(e.value)


def test_dataset_names_and_splits_are_checked(tmp_path):
    with pytest.raises(UserError, match="choose one of train, test"):
        load_builtin("cifar10", split="unlabeled", root=tmp_path)
    with pytest.raises(UserError, match="unknown dataset"):
        load_builtin("imagenet", root=tmp_path)


def test_cifar_arrays_are_converted_to_chw_and_resized(tmp_path, monkeypatch):
    """torchvision's CIFAR keeps (N, 32, 32, 3) uint8 data and a list of targets; checked
    without the download by a stand-in class with the same attributes."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            self.data, self.targets, self.classes = data, [0, 1, 2, 3, 4, 5], list("abcdef")

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    arr = load_builtin("cifar10", root=tmp_path)
    assert arr.images.shape == (6, 3, 32, 32)
    assert torch.equal(arr.images[2], torch.from_numpy(data[2]).permute(2, 0, 1))
    assert arr.labels.tolist() == [0, 1, 2, 3, 4, 5] and arr.classes == list("abcdef")
    small = load_builtin("cifar10", root=tmp_path, load_size=16)
    assert small.images.shape == (6, 3, 16, 16) and small.images.dtype == torch.uint8
    # A 2x antialiased downscale of a constant image stays constant.
    data[:] = 77
    assert (load_builtin("cifar10", root=tmp_path, load_size=16).images == 77).all()


# ---------------------------------------------------------------------------------------------
# Real images


def test_shared_cifar10_through_the_disk_cache(tmp_path):
    root = cifar10_root() / "test"
    arr = open_images(
        root, load_size=32, labeled=True, cache="disk", cache_dir=tmp_path, progress=False
    )
    assert len(arr) == 10_000 and arr.classes[0] == "airplane" and not arr.skipped
    assert torch.bincount(arr.labels).tolist() == [1000] * 10
    loader = make_loader(arr, 256, seed=0)
    first = next(iter(loader))
    assert first.images.shape == (256, 3, 32, 32) and first.images.dtype == torch.uint8
    path = root / arr.paths[int(first.indices[0])]
    expected = np.array(Image.open(path).convert("RGB"))
    assert torch.equal(first.images[0], torch.from_numpy(expected).permute(2, 0, 1))
