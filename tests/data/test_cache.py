"""The disk cache of decoded images: its fingerprint, its contents, reuse without decoding, and
atomic builds (an interrupted build leaves nothing that looks complete)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lowres_ssl.data.cache as cache_mod
import lowres_ssl.data.folders as folders_mod
from lowres_ssl.data.cache import (
    IMAGES_FILE,
    INDEX_FILE,
    ArrayImages,
    build_disk_cache,
    cache_path,
    default_cache_dir,
    fingerprint,
    load_disk_cache,
)
from lowres_ssl.data.folders import FolderImages, decode_image, scan_folder, scan_labeled
from lowres_ssl.data.loader import open_images
from lowres_ssl.errors import UserError

GOOD = ["a.png", "b.jpg", "sub/c.png", "sub/deeper/D.PNG", "e.webp", "f.bmp"]


def make_folder(root: Path, good=GOOD, *, bad: bool = True) -> Path:
    """Small images of distinct colours, 20 x 24 pixels (a crop happens); two bad files."""
    for i, rel in enumerate(good):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(path)
    if bad:
        (root / "text.jpg").write_text("not an image")
        (root / "zero.png").write_bytes(b"")
    (root / ".hidden.png").write_bytes(b"ignored")
    (root / "notes.txt").write_text("ignored")
    return root


def folder_images(root: Path, load_size: int = 16, *, labeled: bool = False) -> FolderImages:
    return FolderImages(scan_labeled(root) if labeled else scan_folder(root), load_size)


def build(root: Path, cache_dir: Path, load_size: int = 16, **kw) -> ArrayImages:
    return build_disk_cache(folder_images(root, load_size, **kw), cache_dir, progress=False)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def bump_mtime(path: Path, seconds: int = 10) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "photos")


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


# ---------------------------------------------------------------------------------------------
# Fingerprint


def test_fingerprint_is_stable_for_an_unchanged_folder(folder, cache_dir):
    first = folder_images(folder)
    for rel in GOOD:  # reading the files (atime) is no change
        (folder / rel).read_bytes()
    (folder / "new.txt").write_text("not an image: ignored")
    (folder / ".new_hidden.jpg").write_bytes(b"hidden: ignored")
    again = folder_images(folder)
    assert fingerprint(first) == fingerprint(again)
    assert len(fingerprint(first)) == 64
    assert cache_path(first, cache_dir) == cache_path(again, cache_dir)


def _touch(root: Path) -> None:
    bump_mtime(root / "sub/c.png")


def _add(root: Path) -> None:
    Image.new("RGB", (20, 20), (1, 2, 3)).save(root / "sub/new.png")


def _remove(root: Path) -> None:
    (root / "b.jpg").unlink()


def _rename(root: Path) -> None:
    (root / "a.png").rename(root / "a2.png")


def _resize_keep_mtime(root: Path) -> None:
    path = root / "a.png"
    st = path.stat()
    with open(path, "ab") as f:
        f.write(b"\0")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _zero_byte_becomes_an_image(root: Path) -> None:
    Image.new("RGB", (20, 20)).save(root / "zero.png")


@pytest.mark.parametrize(
    "change", [_touch, _add, _remove, _rename, _resize_keep_mtime, _zero_byte_becomes_an_image]
)
def test_fingerprint_changes_with_the_folder(folder, cache_dir, change):
    before = folder_images(folder)
    change(folder)
    after = folder_images(folder)
    assert fingerprint(before) != fingerprint(after)
    assert cache_path(before, cache_dir) != cache_path(after, cache_dir)
    # Same folder, same size: the same name prefix, so the new cache replaces the old one.
    assert cache_path(before, cache_dir).name[:-16] == cache_path(after, cache_dir).name[:-16]


def test_fingerprint_changes_with_load_size_and_decode_settings(folder, cache_dir):
    files = scan_folder(folder)
    base = FolderImages(files, 16)
    for other in (
        FolderImages(files, 24),
        FolderImages(files, 16, min_size=8),
        FolderImages(files, 16, max_pixels=10**6),
    ):
        assert fingerprint(other) != fingerprint(base)
    assert fingerprint(FolderImages(files, 16)) == fingerprint(base)
    p16, p24 = cache_path(base, cache_dir), cache_path(FolderImages(files, 24), cache_dir)
    assert p16.parent == p24.parent == cache_dir
    assert "16px" in p16.name and "24px" in p24.name
    assert p16.name.startswith("photos-") and p16.name.endswith(fingerprint(base)[:16])


def test_labels_are_part_of_the_fingerprint(tmp_path, cache_dir):
    make_folder(tmp_path / "set" / "cat", ["1.png", "2.png"], bad=False)
    make_folder(tmp_path / "set" / "dog", ["3.png"], bad=False)
    labeled = folder_images(tmp_path / "set", labeled=True)
    unlabeled = folder_images(tmp_path / "set")
    assert labeled.files.paths == unlabeled.files.paths
    assert fingerprint(labeled) != fingerprint(unlabeled)
    assert cache_path(labeled, cache_dir).name[:-16] != cache_path(unlabeled, cache_dir).name[:-16]


# ---------------------------------------------------------------------------------------------
# Building and loading


def test_build_writes_every_good_image_once_at_load_size(folder, cache_dir):
    images = folder_images(folder)
    arr = build_disk_cache(images, cache_dir, progress=False)
    final = cache_path(images, cache_dir)
    assert listing(cache_dir) == [final.name]  # no temporary folder left behind
    assert listing(final) == sorted([IMAGES_FILE, INDEX_FILE])

    assert isinstance(arr, ArrayImages)
    assert arr.paths == sorted(GOOD) and len(arr) == len(GOOD)
    assert arr.images.dtype == torch.uint8 and arr.images.shape == (len(GOOD), 3, 16, 16)
    assert arr.load_size == 16 and arr.labels is None and arr.classes is None
    assert arr.name == str(folder.resolve())
    for row, rel in zip(arr.images, arr.paths, strict=True):
        assert torch.equal(row, decode_image(folder / rel, 16)), rel
    assert {(s.path, s.kind) for s in arr.skipped} == {
        ("text.jpg", "not-an-image"),
        ("zero.png", "empty"),
    }

    assert (final / IMAGES_FILE).stat().st_size == len(GOOD) * 3 * 16 * 16
    index = json.loads((final / INDEX_FILE).read_text(encoding="utf-8"))
    assert index["count"] == len(GOOD) and index["load_size"] == 16
    assert index["fingerprint"] == fingerprint(images)
    assert index["root"] == str(folder.resolve())

    again = load_disk_cache(final)
    assert torch.equal(again.images, arr.images) and again.paths == arr.paths
    assert again.skipped == arr.skipped


def test_build_with_a_worker_process_matches(folder, cache_dir):
    images = folder_images(folder)
    arr = build_disk_cache(images, cache_dir, num_workers=1, progress=False)
    expected = torch.stack([decode_image(folder / rel, 16) for rel in sorted(GOOD)])
    assert torch.equal(arr.images, expected)


def test_array_images_basics(folder, cache_dir):
    arr = build(folder, cache_dir)
    assert arr.device == torch.device("cpu")
    moved = arr.to("cpu")
    assert torch.equal(moved.images, arr.images)
    assert moved.paths == arr.paths and moved.name == arr.name and moved.skipped == arr.skipped


def test_a_folder_of_only_bad_files_builds_an_empty_cache(tmp_path, cache_dir):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.jpg").write_text("not an image")
    Image.new("RGB", (4, 4)).save(root / "tiny.png")
    arr = build(root, cache_dir)
    assert len(arr) == 0 and arr.images.shape == (0, 3, 16, 16)
    assert {s.kind for s in arr.skipped} == {"not-an-image", "too-small"}
    assert len(load_disk_cache(cache_path(folder_images(root), cache_dir))) == 0
    with pytest.raises(UserError) as info:
        open_images(root, load_size=16, cache="disk", cache_dir=cache_dir, progress=False)
    assert "\n" not in str(info.value) and str(root.resolve()) in str(info.value)


def test_labeled_cache_keeps_labels_and_classes(tmp_path, cache_dir):
    root = tmp_path / "set"
    make_folder(root / "cat", ["1.png", "2.png"], bad=False)
    make_folder(root / "dog", ["3.png", "x/4.png"], bad=True)
    arr = build(root, cache_dir, labeled=True)
    assert arr.classes == ["cat", "dog"]
    assert arr.paths == ["cat/1.png", "cat/2.png", "dog/3.png", "dog/x/4.png"]
    assert arr.labels.tolist() == [0, 0, 1, 1] and arr.labels.dtype == torch.int64
    assert {s.path for s in arr.skipped} == {"dog/text.jpg", "dog/zero.png"}
    # The unlabeled cache of the same folder lives beside it.
    plain = build(root, cache_dir)
    assert plain.labels is None and len(listing(cache_dir)) == 2


# ---------------------------------------------------------------------------------------------
# Reuse


def test_an_unchanged_folder_reuses_the_cache_without_decoding(folder, cache_dir, monkeypatch):
    first = build(folder, cache_dir)
    final = cache_path(folder_images(folder), cache_dir)
    stamps = {name: (final / name).stat().st_mtime_ns for name in (IMAGES_FILE, INDEX_FILE)}

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache is complete")

    monkeypatch.setattr(folders_mod, "decode_image", no_decoding)
    monkeypatch.setattr(cache_mod, "_write_cache", no_decoding)
    second = build(folder, cache_dir)
    via_open = open_images(folder, load_size=16, cache="disk", cache_dir=cache_dir, progress=False)
    for arr in (second, via_open):
        assert torch.equal(arr.images, first.images) and arr.paths == first.paths
        assert arr.skipped == first.skipped
    assert listing(cache_dir) == [final.name]
    assert {n: (final / n).stat().st_mtime_ns for n in stamps} == stamps


def test_a_changed_folder_is_rebuilt_and_replaces_the_old_cache(folder, cache_dir):
    old16 = cache_path(folder_images(folder, 16), cache_dir)
    build(folder, cache_dir, 16)
    old24 = cache_path(folder_images(folder, 24), cache_dir)
    build(folder, cache_dir, 24)
    assert listing(cache_dir) == sorted([old16.name, old24.name])  # two sizes side by side

    Image.new("RGB", (20, 20), (9, 99, 199)).save(folder / "sub/new.png")
    arr = build(folder, cache_dir, 16)
    new16 = cache_path(folder_images(folder, 16), cache_dir)
    assert new16 != old16
    # The stale 16 px cache is gone, the 24 px one (not rebuilt yet) is left alone.
    assert listing(cache_dir) == sorted([new16.name, old24.name])
    assert "sub/new.png" in arr.paths and len(arr) == len(GOOD) + 1
    row = arr.images[arr.paths.index("sub/new.png")]
    assert row[:, 0, 0].tolist() == [9, 99, 199]

    bump_mtime(folder / "a.png")
    build(folder, cache_dir, 24)
    new24 = cache_path(folder_images(folder, 24), cache_dir)
    assert new24 != old24
    assert listing(cache_dir) == sorted([new16.name, new24.name])


# ---------------------------------------------------------------------------------------------
# Atomic builds


def _no_cache_left(cache_dir: Path) -> None:
    left = listing(cache_dir)
    assert left == [], f"an interrupted build left {left}"


def test_build_interrupted_while_decoding_leaves_nothing(folder, cache_dir, monkeypatch):
    original = FolderImages.__getitem__
    calls = []

    def interrupted(self, i):
        calls.append(i)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, i)

    monkeypatch.setattr(FolderImages, "__getitem__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(folder, cache_dir)
    assert len(calls) == 3  # it really stopped midway
    _no_cache_left(cache_dir)

    monkeypatch.setattr(FolderImages, "__getitem__", original)
    arr = build(folder, cache_dir)
    assert arr.paths == sorted(GOOD)
    assert torch.equal(arr.images[0], decode_image(folder / arr.paths[0], 16))


def test_build_interrupted_after_writing_before_renaming_leaves_nothing(
    folder, cache_dir, monkeypatch
):
    original = cache_mod._write_cache

    def written_then_interrupted(images, tmp, *args):
        original(images, tmp, *args)
        assert (tmp / INDEX_FILE).exists()  # the temporary folder was complete
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod, "_write_cache", written_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(folder, cache_dir)
    _no_cache_left(cache_dir)

    monkeypatch.setattr(cache_mod, "_write_cache", original)
    assert len(build(folder, cache_dir)) == len(GOOD)


def test_an_error_while_building_leaves_nothing(folder, cache_dir, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_mod.json, "dump", full_disk)
    with pytest.raises(OSError, match="No space"):
        build(folder, cache_dir)
    _no_cache_left(cache_dir)


def test_temporary_folders_of_dead_builds_are_removed(folder, cache_dir):
    images = folder_images(folder)
    final = cache_path(images, cache_dir)
    cache_dir.mkdir()
    # A pid above the kernel's pid_max (at most 2**22) belongs to no live process.
    dead = cache_dir / f".{final.name}.tmp-{2**22 + 7}-123"
    alive = cache_dir / f".{final.name}.tmp-{os.getpid()}-456"  # a concurrent build: kept
    for tmp in (dead, alive):
        tmp.mkdir()
        (tmp / IMAGES_FILE).write_bytes(b"\0" * 100)
    build_disk_cache(images, cache_dir, progress=False)
    assert listing(cache_dir) == sorted([final.name, alive.name])


# ---------------------------------------------------------------------------------------------
# Where caches live


def test_default_cache_dir(monkeypatch, tmp_path, folder):
    monkeypatch.setenv("LOWRES_SSL_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    assert cache_path(folder_images(folder)).parent == tmp_path / "mine" / "decoded"
    monkeypatch.delenv("LOWRES_SSL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "lowres_ssl"


def test_a_cache_folder_without_its_index_is_rebuilt(folder, cache_dir):
    first = build(folder, cache_dir)
    final = cache_path(folder_images(folder), cache_dir)
    (final / "index.json").unlink()  # damaged by hand
    again = build(folder, cache_dir)
    assert torch.equal(again.images, first.images)
    assert (final / "index.json").exists()
