"""Folders of user images: scanning, decoding every mode to uint8 RGB squares, and bad files that
are skipped, counted and listed instead of stopping a run.

Every image here is tiny and written by the test itself (Pillow, or PNG chunks written by hand
for the decompression bomb and the 16-bit RGB file). The one real-data check uses the shared
CIFAR-10 JPEG files and skips where they are absent.
"""

from __future__ import annotations

import gc
import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowres_ssl.data.folders import (
    IMAGE_EXTENSIONS,
    SKIP_KINDS,
    BadImage,
    Decoded,
    FolderImages,
    Skip,
    SkipLog,
    collate_decoded,
    decode_image,
    scan_folder,
    scan_labeled,
)
from lowres_ssl.data.loader import make_loader, open_images
from lowres_ssl.errors import UserError

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)

# ---------------------------------------------------------------------------------------------
# Writing test files


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(
    width: int, height: int, *, bit_depth: int = 8, color_type: int = 2, idat=b""
) -> bytes:
    """A PNG written chunk by chunk: the header may claim any size, whatever IDAT holds."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(idat))
        + _chunk(b"IEND", b"")
    )


def write_bomb(path: Path, side: int = 100_000) -> Path:
    """A PNG of a few dozen bytes whose header claims side x side RGB pixels."""
    path.write_bytes(png_bytes(side, side, idat=b"\0" * 16))
    return path


def solid(size, color, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, color)


def save(path: Path, im: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def thirds(width: int, height: int) -> Image.Image:
    """Red, green and blue thirds along the longer side."""
    a = np.zeros((height, width, 3), np.uint8)
    if width >= height:
        t = width // 3
        a[:, :t], a[:, t : 2 * t], a[:, 2 * t :] = RED, GREEN, BLUE
    else:
        t = height // 3
        a[:t], a[t : 2 * t], a[2 * t :] = RED, GREEN, BLUE
    return Image.fromarray(a)


def quadrant_image(size: int = 32) -> Image.Image:
    """White, with a red block in the top-left quadrant (as stored, before any EXIF rotation)."""
    a = np.full((size, size, 3), 255, np.uint8)
    a[: size // 2, : size // 2] = RED
    return Image.fromarray(a)


def exif_jpeg(path: Path, im: Image.Image, orientation: int, **kw) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(path, im, format="JPEG", quality=95, exif=exif, **kw)


def damaged(data: bytes) -> bytes:
    """Flip the bits of the second half (compressed pixel data); headers stay intact."""
    half = len(data) // 2
    return data[:half] + bytes(b ^ 0x5A for b in data[half:])


def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(size=(32, 32), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def pillow_rgb(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def quadrant_means(t: torch.Tensor) -> dict[str, list[float]]:
    h = t.shape[-1] // 2
    parts = {"TL": (0, 0), "TR": (0, h), "BL": (h, 0), "BR": (h, h)}
    return {
        k: t[:, y : y + h, x : x + h].float().mean((1, 2)).tolist() for k, (y, x) in parts.items()
    }


def close_to(values, expected, tol: float) -> bool:
    return all(abs(v - e) <= tol for v, e in zip(values, expected, strict=True))


def can_read(path: Path) -> bool:
    """Whether this process can really open ``path`` (root ignores chmod 000)."""
    try:
        if path.is_dir():
            os.listdir(path)
        else:
            with open(path, "rb") as f:
                f.read(1)
    except PermissionError:
        return False
    return True


def assert_one_line_naming(err: UserError, folder: Path, *, extensions: bool = True) -> None:
    msg = str(err)
    assert "\n" not in msg and "\r" not in msg, msg
    assert str(folder) in msg, msg
    if extensions:
        for ext in IMAGE_EXTENSIONS:
            assert ext in msg, (ext, msg)


# ---------------------------------------------------------------------------------------------
# The folder of awkward files


@dataclass
class Awkward:
    root: Path
    good: set[str]  # relative paths that must be delivered, once each
    bad: dict[str, str]  # relative path -> expected skip kind
    ignored: list[str]  # relative paths that must appear nowhere
    max_pixels: int
    load_size: int = 16


MAX_PIXELS = 64 * 64  # every good image below has at most 48 * 32 pixels


def build_awkward(root: Path) -> Awkward:
    good: set[str] = set()
    bad: dict[str, str] = {}

    def g(rel: str, im: Image.Image, **kw) -> None:
        save(root / rel, im, **kw)
        good.add(rel)

    # Plain images: nested folders, extensions in any case, a folder whose name looks like a file.
    g("a.jpg", thirds(48, 32), quality=95)
    g("B.PNG", solid((32, 32), RED))
    g("c.JPEG", solid((16, 24), GREEN), format="JPEG")
    g("d.Jpg", solid((24, 16), BLUE), format="JPEG")
    g("nested/deeper/deepest/n.png", noise(seed=1))
    g("nested/m.TIF", noise(seed=2), format="TIFF")
    g("dir.png/inner.jpg", noise(seed=3))
    # Odd modes.
    g("modes/L.png", solid((20, 20), 77, "L"))
    g("modes/LA.png", solid((20, 20), (10, 0), "LA"))
    p = solid((20, 20), 0, "P")
    p.putpalette([*RED, *BLUE] + [0] * 762)
    g("modes/P_trans.png", p, transparency=0)
    g("modes/P_trans.gif", p, transparency=0)
    g("modes/RGBA.png", solid((20, 20), (0, 0, 255, 128), "RGBA"))
    g("modes/CMYK.jpg", solid((20, 20), (255, 0, 0, 0), "CMYK"), quality=95)
    g("modes/I16.png", Image.fromarray(np.full((20, 20), 65535, np.uint16)))
    g("modes/value16.tif", Image.fromarray(np.full((20, 20), 32896, np.uint16)))
    g("modes/bit1.png", solid((20, 20), 1, "1"))
    frames = [solid((20, 20), i, "P") for i in range(2)]
    for f in frames:
        f.putpalette([*RED, *GREEN] + [0] * 762)
    g("modes/anim.gif", frames[0], save_all=True, append_images=frames[1:])
    g("modes/pic.webp", noise(seed=4), lossless=True)
    g("modes/pic.bmp", noise(seed=5))
    g("modes/pic.tiff", noise(seed=6))
    row = b"\0" + np.array([[65535, 32896, 0]] * 16, dtype=">u2").tobytes()
    (root / "modes/rgb48.png").write_bytes(png_bytes(16, 16, bit_depth=16, idat=row * 16))
    good.add("modes/rgb48.png")
    # EXIF-rotated photos.
    for o in (6, 8):
        exif_jpeg(root / f"exif/rot{o}.jpg", quadrant_image(), o)
        good.add(f"exif/rot{o}.jpg")
    # A valid symbolic link to an image is an image (under its own name).
    os.symlink("nested/deeper/deepest/n.png", root / "alias.png")
    good.add("alias.png")
    # A link back up the tree must not be followed forever.
    os.symlink(".", root / "nested" / "loop")

    # Bad files, each with the kind it must be listed under.
    jpeg = encoded(noise(seed=7), "JPEG", quality=90)
    (root / "bad").mkdir()
    (root / "bad/truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    bad["bad/truncated.jpg"] = "corrupt"
    png = encoded(noise(seed=8), "PNG")
    (root / "bad/truncated.png").write_bytes(png[: len(png) - 40])
    bad["bad/truncated.png"] = "corrupt"
    (root / "bad/corrupt.png").write_bytes(damaged(png))
    bad["bad/corrupt.png"] = "corrupt"
    (root / "bad/garbage.png").write_bytes(bytes(range(256)) * 4)
    bad["bad/garbage.png"] = "not-an-image"
    (root / "bad/zero.jpg").write_bytes(b"")
    bad["bad/zero.jpg"] = "empty"
    (root / "bad/text.jpg").write_text("this is not a picture\n")
    bad["bad/text.jpg"] = "not-an-image"
    save(root / "bad/tiny.png", solid((8, 40), RED))
    bad["bad/tiny.png"] = "too-small"
    write_bomb(root / "bad/bomb.png")
    bad["bad/bomb.png"] = "too-large"
    save(root / "bad/over_max.png", solid((80, 80), RED))
    bad["bad/over_max.png"] = "too-large"
    os.symlink("no/such/target.jpg", root / "bad/broken.jpg")
    bad["bad/broken.jpg"] = "unreadable"
    os.mkfifo(root / "bad/pipe.png")
    bad["bad/pipe.png"] = "not-a-file"
    # Permissions: tests often run as root (here, and in CI containers), and root reads a
    # chmod-000 file or lists a chmod-000 folder anyway. Such a file then is a good image; for
    # anyone else it must be skipped as unreadable.
    locked_file = save(root / "bad/noperm.png", solid((20, 20), GREEN))
    locked_file.chmod(0)
    if can_read(locked_file):
        good.add("bad/noperm.png")
    else:
        bad["bad/noperm.png"] = "unreadable"
    save(root / "locked/in.png", solid((20, 20), BLUE))
    (root / "locked").chmod(0)
    if can_read(root / "locked"):
        good.add("locked/in.png")
    else:
        bad["locked"] = "unreadable"

    # Ignored: hidden files and folders, other extensions, a broken link that is no image.
    ignored = [
        ".hidden.png",
        ".hiddendir/h.png",
        "nested/.thumb.jpg",
        "notes.txt",
        "README",
        "data.npy",
        "photo.png.bak",
        "modes/Thumbs.db",
        "dangling.txt",
    ]
    save(root / ".hidden.png", solid((20, 20), RED))
    save(root / ".hiddendir/h.png", solid((20, 20), RED))
    save(root / "nested/.thumb.jpg", solid((20, 20), RED))
    (root / "notes.txt").write_text("notes\n")
    (root / "README").write_text("readme\n")
    np.save(root / "data.npy", np.zeros(3))
    (root / "photo.png.bak").write_bytes(encoded(solid((20, 20), RED), "PNG"))
    (root / "modes/Thumbs.db").write_bytes(b"\0" * 10)
    os.symlink("nowhere", root / "dangling.txt")
    return Awkward(root, good, bad, ignored, MAX_PIXELS)


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    root = tmp_path_factory.mktemp("awkward")
    data = build_awkward(root)
    yield data
    (root / "locked").chmod(0o755)
    (root / "bad/noperm.png").chmod(0o644)


def expected_pixels(aw: Awkward, rel: str) -> torch.Tensor:
    return decode_image(aw.root / rel, aw.load_size, max_pixels=aw.max_pixels)


def run_epoch(loader, paths, aw: Awkward) -> tuple[list[str], list[str]]:
    """The relative paths one epoch delivers, and those whose pixels differ from a decode."""
    delivered: list[str] = []
    wrong: list[str] = []
    for batch in loader:
        assert batch.images.dtype == torch.uint8
        assert batch.images.shape[1:] == (3, aw.load_size, aw.load_size)
        assert batch.indices.dtype == torch.int64
        for row, i in zip(batch.images, batch.indices.tolist(), strict=True):
            delivered.append(paths[i])
            if not torch.equal(row, expected_pixels(aw, paths[i])):
                wrong.append(paths[i])
    return delivered, wrong


def check_delivered(delivered: list[str], wrong: list[str], aw: Awkward) -> None:
    """Every good image exactly once, as the right uint8 pixels, and nothing else."""
    assert wrong == []
    assert sorted(delivered) == sorted(set(delivered)), "an image was delivered twice"
    assert set(delivered) == aw.good


def skip_kinds(log: SkipLog) -> dict[str, str]:
    return {s.path: s.kind for s in log}


def test_awkward_scan_lists_candidates_sorted_and_ignores_hidden_and_other_files(awkward):
    files = scan_folder(awkward.root)
    assert files.root == awkward.root.resolve()
    scan_time = {"empty", "unreadable", "not-a-file"}
    at_scan = {p for p, k in awkward.bad.items() if k in scan_time and p != "bad/noperm.png"}
    assert {s.path: s.kind for s in files.skipped} == {p: awkward.bad[p] for p in at_scan}
    assert files.paths == sorted(files.paths)
    assert set(files.paths) == (awkward.good | set(awkward.bad)) - at_scan
    listed = set(files.paths) | {s.path for s in files.skipped}
    for rel in awkward.ignored:
        assert rel not in listed
    assert not any("/." in "/" + p for p in listed), "a hidden file or folder was scanned"
    assert not any("loop" in p for p in listed), "a symbolic link to a parent was followed"
    assert len(files.sizes) == len(files.mtimes_ns) == len(files)
    assert files.labels is None and files.classes is None


def test_awkward_folder_without_cache_delivers_each_good_image_once(awkward, tmp_path):
    images = open_images(
        awkward.root, load_size=awkward.load_size, cache="none", max_pixels=awkward.max_pixels
    )
    assert isinstance(images, FolderImages)
    # One worker process: skips must travel back from the worker to the log.
    loader = make_loader(images, 4, shuffle=True, drop_last=False, seed=5, num_workers=1)
    try:
        delivered, wrong = run_epoch(loader, images.files.paths, awkward)
        log = loader.skip_log
    finally:
        del loader  # stop the persistent worker now, not at some later garbage collection
        gc.collect()
    check_delivered(delivered, wrong, awkward)
    assert skip_kinds(log) == awkward.bad
    check_skipped_file(log.write(tmp_path / "skipped_files.txt"), awkward)
    summary = log.summary(used=len(awkward.good))
    assert "\n" not in summary
    assert summary.startswith(f"skipped {len(awkward.bad)} files (")
    assert summary.endswith(f"; {len(awkward.good)} used")


def test_awkward_folder_with_disk_cache_delivers_each_good_image_once(awkward, tmp_path):
    arr = open_images(
        awkward.root,
        load_size=awkward.load_size,
        cache="disk",
        cache_dir=tmp_path / "cache",
        num_workers=0,
        max_pixels=awkward.max_pixels,
        progress=False,
    )
    assert arr.images.dtype == torch.uint8
    assert sorted(arr.paths) == arr.paths and set(arr.paths) == awkward.good
    loader = make_loader(arr, 4, shuffle=True, drop_last=False, seed=5)
    check_delivered(*run_epoch(loader, arr.paths, awkward), awkward)
    assert skip_kinds(loader.skip_log) == awkward.bad
    check_skipped_file(loader.skip_log.write(tmp_path / "skipped_files.txt"), awkward)


def check_skipped_file(path: Path, aw: Awkward) -> None:
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[0] == f"# skipped files under {aw.root.resolve()}"
    assert lines[-1] == ""
    body = lines[1:-1]
    rows = [line.split("\t") for line in body]
    assert all(len(r) == 2 for r in rows), body
    paths = [r[0] for r in rows]
    assert paths == sorted(paths) and len(set(paths)) == len(paths)
    assert {r[0]: r[1].split(":")[0] for r in rows} == aw.bad
    assert all(r[1].split(": ", 1)[1].strip() for r in rows), "a reason is missing"


# ---------------------------------------------------------------------------------------------
# Decoding: geometry


@pytest.mark.parametrize(
    ("size", "load_size", "edge_tol"),
    [
        ((48, 16), 16, 0),  # scale 1: the box is copied pixel for pixel
        ((16, 48), 16, 0),
        ((96, 32), 16, 32),  # downscaled: the bicubic kernel reaches just past the box
        ((32, 96), 16, 32),
        ((99, 33), 11, 32),
    ],
)
def test_resize_and_centre_crop_keep_only_the_centre(tmp_path, size, load_size, edge_tol):
    path = save(tmp_path / "thirds.png", thirds(*size))
    t = decode_image(path, load_size)
    assert t.shape == (3, load_size, load_size) and t.dtype == torch.uint8
    assert t.is_contiguous()
    err = (t.int() - torch.tensor(GREEN).view(3, 1, 1)).abs()
    along = err.amax(dim=(0, 1)) if size[0] > size[1] else err.amax(dim=(0, 2))
    # Only the first and last line across the long side may see the neighbouring thirds: with
    # bicubic weights the overshoot of a 255 step is about 7% (~18); 32 leaves margin. Every
    # other line is exactly the centre colour.
    assert along[1:-1].max() == 0, along
    assert along[[0, -1]].max() <= edge_tol, along


def test_upscaling_a_small_image_keeps_shape_and_colour(tmp_path):
    path = save(tmp_path / "small.png", solid((16, 20), (10, 200, 30)))
    t = decode_image(path, 40)
    assert t.shape == (3, 40, 40)
    assert (t.int() - torch.tensor([10, 200, 30]).view(3, 1, 1)).abs().max() <= 1


def test_large_jpeg_decoded_in_draft_mode_matches_a_full_decode(tmp_path):
    a = np.zeros((128, 256, 3), np.uint8)
    a[:, :96], a[:, 96:160], a[:, 160:] = (200, 30, 30), (30, 200, 30), (30, 30, 200)
    path = save(tmp_path / "big.jpg", Image.fromarray(a), quality=95)
    t = decode_image(path, 16)
    with Image.open(path) as im:
        ref = im.convert("RGB").resize((16, 16), Image.Resampling.BICUBIC, box=(64, 0, 192, 128))
    ref = torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1)
    # JPEG's 1/8 DCT scaling and a full decode plus resampling differ by a few levels.
    assert (t.int() - ref.int()).abs().float().mean() <= 4
    # The centre square spans x 64..192: a quarter red, half green, a quarter blue.
    dominant = t.float().mean(1).argmax(0).tolist()
    assert dominant == [0] * 4 + [1] * 8 + [2] * 4


# ---------------------------------------------------------------------------------------------
# Decoding: EXIF orientation


@pytest.mark.parametrize(
    ("orientation", "red_at"),
    [(1, "TL"), (3, "BR"), (6, "TR"), (8, "BL")],  # 6: turn 90° clockwise, 8: anticlockwise
)
def test_exif_orientation_is_applied(tmp_path, orientation, red_at):
    path = exif_jpeg(tmp_path / "photo.jpg", quadrant_image(32), orientation)
    means = quadrant_means(decode_image(path, 32))
    # JPEG at quality 95 keeps flat 16x16 blocks within a few levels; 12 is generous.
    for name, mean in means.items():
        assert close_to(mean, RED if name == red_at else WHITE, 12), (name, means)


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotation_of_a_large_jpeg_also_in_draft_mode(tmp_path, orientation):
    path = exif_jpeg(tmp_path / "photo.jpg", quadrant_image(256), orientation)
    means = quadrant_means(decode_image(path, 16))
    red_at = {6: "TR", 8: "BL"}[orientation]
    # Downscaling 16x blurs the block border into the neighbouring quadrant slightly.
    for name, mean in means.items():
        assert close_to(mean, RED if name == red_at else WHITE, 20), (name, means)


def test_exif_rotation_applies_before_the_centre_crop(tmp_path):
    # Stored 64 wide x 32 high; orientation 6 shows it 32 wide x 64 high: the crop then takes
    # the middle rows of the rotated picture, i.e. the stored middle columns.
    a = np.full((32, 64, 3), 255, np.uint8)
    a[:, 16:24] = RED  # stored columns 16..24 -> displayed rows 16..24 -> crop rows 0..8
    path = exif_jpeg(tmp_path / "wide.jpg", Image.fromarray(a), 6)
    t = decode_image(path, 32).float()
    assert close_to(t[:, 1:7].mean((1, 2)).tolist(), RED, 16)
    assert close_to(t[:, 10:].mean((1, 2)).tolist(), WHITE, 16)


def test_damaged_exif_block_does_not_cost_the_image(tmp_path):
    path = save(tmp_path / "x.jpg", solid((20, 20), RED), quality=95, exif=b"Exif\0\0garbage")
    t = decode_image(path, 20)
    assert close_to(t.float().mean((1, 2)).tolist(), RED, 8)


# ---------------------------------------------------------------------------------------------
# Decoding: modes and transparency

# Transparent pixels are composited on white (_BACKGROUND in folders.py, as viewers do).


def _mode_cases():
    p = solid((16, 16), 0, "P")
    p.putpalette([*RED, *BLUE] + [0] * 762)
    half = np.zeros((16, 16, 2), np.uint8)
    half[..., 1] = 255
    half[:, :8, 1] = 0  # left half transparent black, right half opaque black
    return [
        ("L.png", solid((16, 16), 77, "L"), {}, [(77, 77, 77)] * 2, 0),
        (
            "LA.png",
            Image.merge("LA", [Image.fromarray(half[..., 0]), Image.fromarray(half[..., 1])]),
            {},
            [WHITE, BLACK],
            0,
        ),
        ("RGBA.png", solid((16, 16), (0, 0, 255, 128), "RGBA"), {}, [(127, 127, 255)] * 2, 1),
        ("RGBA_clear.png", solid((16, 16), (255, 0, 0, 0), "RGBA"), {}, [WHITE] * 2, 0),
        ("P.png", p, {}, [RED] * 2, 0),
        ("P_trans.png", p, {"transparency": 0}, [WHITE] * 2, 0),
        ("P_trans.gif", p, {"transparency": 0}, [WHITE] * 2, 0),
        ("L_trns.png", solid((16, 16), 0, "L"), {"transparency": 0}, [WHITE] * 2, 0),
        ("one.png", solid((16, 16), 1, "1"), {}, [WHITE] * 2, 0),
        ("zero.bmp", solid((16, 16), 0, "1"), {}, [BLACK] * 2, 0),
        # Pillow writes CMYK JPEGs Adobe-style and reads them back; pure cyan -> (0, 255, 255).
        (
            "cmyk.jpg",
            solid((16, 16), (255, 0, 0, 0), "CMYK"),
            {"quality": 95},
            [(0, 255, 255)] * 2,
            8,
        ),
        ("cmyk.tif", solid((16, 16), (0, 0, 0, 0), "CMYK"), {}, [WHITE] * 2, 0),
        ("rgb.webp", solid((16, 16), (10, 120, 230)), {"lossless": True}, [(10, 120, 230)] * 2, 0),
        ("gray.jpg", solid((16, 16), 90, "L"), {"quality": 95}, [(90, 90, 90)] * 2, 2),
    ]


@pytest.mark.parametrize(
    ("name", "im", "kw", "corners", "tol"), _mode_cases(), ids=[c[0] for c in _mode_cases()]
)
def test_every_mode_becomes_rgb(tmp_path, name, im, kw, corners, tol):
    """``corners`` are the expected RGB of the top-left and bottom-right pixel."""
    path = save(tmp_path / name, im, **kw)
    t = decode_image(path, 16)
    assert t.shape == (3, 16, 16) and t.dtype == torch.uint8
    got = [t[:, 0, 0].tolist(), t[:, -1, -1].tolist()]
    for g, e in zip(got, corners, strict=True):
        assert close_to(g, e, tol), (got, corners)


def test_animated_gif_uses_its_first_frame(tmp_path):
    frames = [solid((16, 16), i, "P") for i in range(3)]
    for f in frames:
        f.putpalette([*RED, *GREEN, *BLUE] + [0] * 759)
    path = save(tmp_path / "anim.gif", frames[0], save_all=True, append_images=frames[1:])
    t = decode_image(path, 16)
    assert (t == torch.tensor(RED, dtype=torch.uint8).view(3, 1, 1)).all()


def test_rgb_png_with_a_transparent_colour_key_is_composited_on_white(tmp_path):
    # A PNG tRNS chunk on an RGB image makes one colour transparent, exactly as it does for the
    # L and P images above (which come out white). Left half black (the key), right half red.
    a = np.zeros((16, 16, 3), np.uint8)
    a[:, 8:] = RED
    with Image.open(save(tmp_path / "key.png", Image.fromarray(a), transparency=BLACK)) as im:
        assert im.mode == "RGB" and im.info["transparency"] == BLACK
    t = decode_image(tmp_path / "key.png", 16)
    assert t[:, 0, 0].tolist() == list(WHITE), "transparent pixels must be shown on white"
    assert t[:, 0, -1].tolist() == list(RED)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_is_scaled_not_clipped(tmp_path, fmt):
    values = np.array([0, 257, 1000, 32896, 65278, 65535], np.uint16)
    a = np.tile(values.repeat(3), (18, 1))  # 18 x 18 columns of each value
    path = save(tmp_path / f"deep.{fmt.lower()}", Image.fromarray(a), format=fmt)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    t = decode_image(path, 18)
    row = t[0, 9, 1::3].tolist()  # middle column of each triple; scale 1, so no blending
    assert row == [0, 1, 4, 128, 254, 255]  # v / 257 rounded: 65535 -> 255, 1000 -> 4 (not 255)
    assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])


def test_32_bit_integer_and_float_grey(tmp_path):
    ints = Image.fromarray(np.full((16, 16), 65535, np.int32))
    assert decode_image(save(tmp_path / "i32.tif", ints), 16).unique().tolist() == [255]
    floats = Image.fromarray(np.full((16, 16), 0.5, np.float32))  # floats in [0, 1]
    assert decode_image(save(tmp_path / "f.tif", floats), 16).unique().tolist() == [128]


def test_32_bit_integer_grey_holding_8_bit_values_is_kept(tmp_path):
    ints = Image.fromarray(np.full((16, 16), 200, np.int32))
    assert decode_image(save(tmp_path / "i8.tif", ints), 16).unique().tolist() == [200]


def test_lab_image_is_converted_to_srgb_colours(tmp_path):
    """L*a*b* (50, 0, 0) is a neutral mid grey (sRGB ≈ 119); a plain mode conversion would
    read the three numbers as R, G, B and give a colour."""
    lab = Image.new("LAB", (16, 16), (128, 128, 128))  # Pillow stores L*·255/100, a*+128, b*+128
    out = decode_image(save(tmp_path / "lab.tif", lab), 16)
    r, g, b = (int(c) for c in out[:, 0, 0])
    assert abs(r - g) <= 2 and abs(g - b) <= 2 and 110 <= r <= 130


def test_16_bit_rgb_png_keeps_its_colour(tmp_path):
    row = b"\0" + np.array([[65535, 32896, 0]] * 16, dtype=">u2").tobytes()
    path = tmp_path / "rgb48.png"
    path.write_bytes(png_bytes(16, 16, bit_depth=16, idat=row * 16))
    t = decode_image(path, 16)
    assert t[:, 3, 3].tolist() == [255, 128, 0]


# ---------------------------------------------------------------------------------------------
# Decoding: bad files


def _kind(path: Path, **kw) -> BadImage:
    with pytest.raises(BadImage) as info:
        decode_image(path, 16, **kw)
    assert info.value.kind in SKIP_KINDS
    assert info.value.detail
    return info.value


@pytest.mark.parametrize(("fmt", "ext"), [("PNG", "png"), ("JPEG", "jpg"), ("GIF", "gif")])
def test_damaged_pixel_data_is_corrupt_not_delivered(tmp_path, fmt, ext):
    path = tmp_path / f"damaged.{ext}"
    path.write_bytes(damaged(encoded(noise(), fmt)))
    with Image.open(path) as im, pytest.raises(OSError):
        im.load()  # Pillow itself cannot decode it
    assert _kind(path).kind == "corrupt"


@pytest.mark.parametrize(("fmt", "ext"), [("PNG", "png"), ("JPEG", "jpg"), ("GIF", "gif")])
def test_truncated_file_is_corrupt(tmp_path, fmt, ext):
    data = encoded(noise(), fmt)
    path = tmp_path / f"cut.{ext}"
    path.write_bytes(data[: len(data) * 2 // 3])
    assert _kind(path).kind == "corrupt"


def test_non_images_with_an_image_extension(tmp_path):
    (tmp_path / "a.jpg").write_text("hello")
    (tmp_path / "b.png").write_bytes(np.random.default_rng(1).bytes(500))
    (tmp_path / "c.webp").write_bytes(b"\0" * 64)
    for name in ("a.jpg", "b.png", "c.webp"):
        assert _kind(tmp_path / name).kind == "not-an-image"


def test_min_size_boundary(tmp_path):
    ok = save(tmp_path / "ok.png", solid((16, 40), RED))
    small = save(tmp_path / "small.png", solid((40, 15), RED))
    assert decode_image(ok, 16).shape == (3, 16, 16)
    bad = _kind(small)
    assert bad.kind == "too-small" and "40x15" in bad.detail
    assert decode_image(small, 16, min_size=15).shape == (3, 16, 16)


def test_max_pixels_boundary(tmp_path):
    path = save(tmp_path / "p.png", solid((40, 25), RED))  # 1000 pixels
    assert decode_image(path, 16, max_pixels=1000).shape == (3, 16, 16)
    assert _kind(path, max_pixels=999).kind == "too-large"


def test_decompression_bomb_is_too_large(tmp_path):
    path = write_bomb(tmp_path / "bomb.png")
    assert path.stat().st_size < 200
    bad = _kind(path)
    assert bad.kind == "too-large" and "10000000000" in bad.detail


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    # The header claims 5000 x 5000 but IDAT holds 16 bytes: decoding would find it truncated
    # ("corrupt"); the size check must refuse it first.
    path = tmp_path / "claims.png"
    path.write_bytes(png_bytes(5000, 5000, idat=b"\0" * 16))
    bad = _kind(path, max_pixels=10**6)
    assert bad.kind == "too-large" and "5000x5000" in bad.detail


def test_unreadable_or_vanished_file(tmp_path):
    path = save(tmp_path / "locked.png", solid((20, 20), RED))
    path.chmod(0)
    try:
        if can_read(path):  # root ignores permissions: then it is a good image
            assert decode_image(path, 16).shape == (3, 16, 16)
        else:
            assert _kind(path).kind == "unreadable"
    finally:
        path.chmod(0o644)
    assert _kind(tmp_path / "gone.png").kind == "unreadable"


def test_folder_images_returns_skips_never_raises(tmp_path):
    save(tmp_path / "a.png", solid((20, 20), RED))
    (tmp_path / "b.png").write_text("nope")
    images = FolderImages(scan_folder(tmp_path), 16)
    assert len(images) == 2 and images.labels is None and images.classes is None
    good, bad = images[0], images[1]
    assert good.skip is None and good.index == 0 and good.image.shape == (3, 16, 16)
    assert bad.image is None and bad.index == 1
    assert bad.skip.path == "b.png" and bad.skip.kind == "not-an-image"
    assert images.path(1) == tmp_path.resolve() / "b.png"
    with pytest.raises(UserError):
        FolderImages(scan_folder(tmp_path), 0)


def test_collate_keeps_uint8_and_drops_skips():
    img = torch.full((3, 4, 4), 7, dtype=torch.uint8)
    skip = Skip("x.png", "corrupt", "boom")
    batch = collate_decoded(
        [Decoded(0, img, None), Decoded(1, None, skip), Decoded(2, img + 1, None)], 4
    )
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (2, 3, 4, 4)
    assert batch.indices.tolist() == [0, 2] and batch.indices.dtype == torch.int64
    assert batch.skipped == [skip]
    assert batch.images[1].unique().tolist() == [8]
    empty = collate_decoded([Decoded(5, None, skip)], 4)
    assert empty.images.shape == (0, 3, 4, 4) and empty.images.dtype == torch.uint8
    assert empty.indices.tolist() == [] and empty.skipped == [skip]


# ---------------------------------------------------------------------------------------------
# Scanning


def test_every_extension_in_any_case_is_found(tmp_path):
    expected = []
    for i, ext in enumerate(IMAGE_EXTENSIONS):
        for variant in (ext, ext.upper(), ext[:2] + ext[2:].upper()):
            name = f"f{i}{variant}"
            (tmp_path / name).write_bytes(b"x")
            expected.append(name)
    for other in ("x.txt", "x.jpgx", "x.svg", "x.heic", "jpg", "x.json"):
        (tmp_path / other).write_bytes(b"x")
    files = scan_folder(tmp_path)
    assert files.paths == sorted(expected)
    assert files.sizes == [1] * len(expected)
    assert files.skipped == []


def test_scan_order_is_sorted_by_relative_path_and_stable(tmp_path):
    names = ["b.png", "a/z.png", "a.png", "a-b.png", "A/c.png", "a/b/c.png", "aa.png", "Z.png"]
    for name in reversed(names):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * len(name))
    first = scan_folder(tmp_path)
    assert first.paths == sorted(names)
    assert first.sizes == [len(p) for p in first.paths]
    again = scan_folder(str(tmp_path))
    assert again.paths == first.paths and again.mtimes_ns == first.mtimes_ns


def test_scan_records_sizes_and_mtimes(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"12345")
    os.utime(path, ns=(1_000_000_000, 1_234_567_891_000))
    files = scan_folder(tmp_path)
    assert files.sizes == [5] and files.mtimes_ns == [1_234_567_891_000]


def test_scan_skips_zero_byte_broken_link_and_pipe(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"x")
    (tmp_path / "zero.png").write_bytes(b"")
    os.symlink(tmp_path / "missing.png", tmp_path / "link.JPG")
    os.symlink(tmp_path / "missing.txt", tmp_path / "link.txt")
    os.mkfifo(tmp_path / "fifo.gif")
    files = scan_folder(tmp_path)
    assert files.paths == ["ok.png"]
    assert {s.path: s.kind for s in files.skipped} == {
        "zero.png": "empty",
        "link.JPG": "unreadable",
        "fifo.gif": "not-a-file",
    }


def test_labeled_scan(tmp_path):
    for rel in ("dog/b.png", "dog/a.jpg", "cat/x/deep.png", "cat/y.PNG", "ant/1.png"):
        save(tmp_path / rel, solid((20, 20), RED))
    save(tmp_path / ".hidden_class/h.png", solid((20, 20), RED))
    save(tmp_path / "cat/.hidden.png", solid((20, 20), RED))
    save(tmp_path / "loose.png", solid((20, 20), RED))
    save(tmp_path / "Loose2.JPG", solid((20, 20), RED))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty_class").mkdir()
    files = scan_labeled(tmp_path)
    assert files.classes == ["ant", "cat", "dog", "empty_class"]
    assert files.paths == ["ant/1.png", "cat/x/deep.png", "cat/y.PNG", "dog/a.jpg", "dog/b.png"]
    assert files.labels == [0, 1, 1, 2, 2]
    assert {s.path: s.kind for s in files.skipped} == {
        "loose.png": "no-class",
        "Loose2.JPG": "no-class",
    }
    images = FolderImages(files, 16)
    assert images.labels.tolist() == [0, 1, 1, 2, 2] and images.classes == files.classes


def test_labeled_loader_delivers_labels_matching_folders(tmp_path):
    colours = {"blue": BLUE, "green": GREEN, "red": RED}
    for name, colour in colours.items():
        for i in range(3):
            save(tmp_path / name / f"{i}.png", solid((16, 16), colour))
    images = open_images(tmp_path, load_size=16, labeled=True, cache="none")
    loader = make_loader(images, 2, shuffle=True, drop_last=False, num_workers=0)
    seen = 0
    for batch in loader:
        for img, label in zip(batch.images, batch.labels.tolist(), strict=True):
            expected = colours[images.classes[label]]
            assert img[:, 0, 0].tolist() == list(expected)
            seen += 1
    assert seen == 9


# ---------------------------------------------------------------------------------------------
# Errors for the user: one line, naming the folder and the accepted extensions


def test_missing_folder(tmp_path):
    missing = tmp_path / "no" / "such"
    for scan in (scan_folder, scan_labeled):
        with pytest.raises(UserError) as info:
            scan(missing)
        assert_one_line_naming(info.value, missing)


def test_empty_folder_and_folder_of_ignored_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as info:
        scan_folder(empty)
    assert_one_line_naming(info.value, empty.resolve())

    ignored = tmp_path / "ignored"
    save(ignored / ".hidden.png", solid((20, 20), RED))
    save(ignored / ".dir/a.png", solid((20, 20), RED))
    (ignored / "a.txt").write_text("x")
    with pytest.raises(UserError) as info:
        scan_folder(ignored)
    assert_one_line_naming(info.value, ignored.resolve())


def test_folder_of_only_bad_files(tmp_path):
    scan_bad = tmp_path / "scanbad"
    scan_bad.mkdir()
    (scan_bad / "zero.jpg").write_bytes(b"")
    os.symlink("missing.png", scan_bad / "link.png")
    with pytest.raises(UserError) as info:
        scan_folder(scan_bad)
    assert_one_line_naming(info.value, scan_bad.resolve())

    decode_bad = tmp_path / "decodebad"
    decode_bad.mkdir()
    (decode_bad / "text.jpg").write_text("x")
    save(decode_bad / "tiny.png", solid((4, 4), RED))
    write_bomb(decode_bad / "bomb.png")
    with pytest.raises(UserError) as info:
        open_images(
            decode_bad,
            load_size=16,
            cache="disk",
            cache_dir=tmp_path / "cache",
            num_workers=0,
            progress=False,
        )
    assert_one_line_naming(info.value, decode_bad.resolve())


def test_labeled_folder_errors(tmp_path):
    flat = tmp_path / "flat"
    save(flat / "a.png", solid((20, 20), RED))
    with pytest.raises(UserError) as info:
        scan_labeled(flat)
    assert_one_line_naming(info.value, flat.resolve(), extensions=False)

    hollow = tmp_path / "hollow"
    (hollow / "cat").mkdir(parents=True)
    (hollow / "dog").mkdir()
    save(hollow / "root.png", solid((20, 20), RED))
    with pytest.raises(UserError) as info:
        scan_labeled(hollow)
    assert_one_line_naming(info.value, hollow.resolve())


def test_a_file_instead_of_a_folder(tmp_path):
    path = save(tmp_path / "one.png", solid((20, 20), RED))
    with pytest.raises(UserError) as info:
        scan_folder(path)
    assert_one_line_naming(info.value, path, extensions=False)


# ---------------------------------------------------------------------------------------------
# The skip list


def test_summary_line():
    log = SkipLog()
    assert log.summary() == "no files skipped"
    assert log.summary(used=1234) == "all 1,234 files used"
    log.add([Skip("a.png", "corrupt", "x")])
    assert log.summary() == "skipped 1 file (1 corrupt)"
    log.add(
        [
            Skip("b.png", "empty", "zero bytes"),
            Skip("c.png", "corrupt", "y"),
            Skip("d.png", "weird", "z"),
            Skip("e.png", "too-large", "w"),
            Skip("f.png", "aardvark", "v"),
        ]
    )
    assert log.summary(used=49_997) == (
        "skipped 6 files (1 empty, 2 corrupt, 1 too-large, 1 aardvark, 1 weird); 49,997 used"
    )


def test_each_file_is_listed_once_first_reason_kept():
    log = SkipLog()
    log.add([Skip("b.png", "corrupt", "first"), Skip("a.png", "empty", "zero bytes")])
    log.add([Skip("b.png", "corrupt", "second"), Skip("b.png", "unreadable", "third")])
    assert len(log) == 2
    assert [(s.path, s.detail) for s in log] == [("a.png", "zero bytes"), ("b.png", "first")]
    assert log.counts() == {"corrupt": 1, "empty": 1}


def test_skipped_files_txt_format(tmp_path):
    log = SkipLog(tmp_path / "photos")
    log.add(
        [
            Skip("z/last.png", "too-small", "8x8: shorter side < min_size 16 px"),
            Skip("a b/first.jpg", "corrupt", "OSError: image file is truncated"),
            Skip("m.gif", "empty", "zero bytes"),
        ]
    )
    out = log.write(tmp_path / "skipped_files.txt")
    assert out == tmp_path / "skipped_files.txt"
    assert out.read_bytes().decode("utf-8") == (
        f"# skipped files under {tmp_path / 'photos'}\n"
        "a b/first.jpg\tcorrupt: OSError: image file is truncated\n"
        "m.gif\tempty: zero bytes\n"
        "z/last.png\ttoo-small: 8x8: shorter side < min_size 16 px\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["skipped_files.txt"]  # no .tmp left
    SkipLog().write(out)  # rewritten in place, no header without a root
    assert out.read_text(encoding="utf-8") == ""


@pytest.mark.parametrize("char", ["\t", "\n", "\r"], ids=["tab", "newline", "carriage-return"])
def test_line_breaks_and_tabs_in_names_are_escaped(tmp_path, char):
    # Linux file names may hold any byte but "/" and NUL; each must stay one line of two
    # tab-separated fields however the list is read (read_text uses universal newlines).
    name = f"odd{char}name.png"
    documented = {"\t": "\\t", "\n": "\\n"}  # the escapes Skip.line writes
    if char in documented:
        assert Skip(name, "corrupt", "x").line() == f"odd{documented[char]}name.png\tcorrupt: x"
    log = SkipLog()
    log.add([Skip(name, "corrupt", "x"), Skip("plain.png", "empty", "zero bytes")])
    path = log.write(tmp_path / "skipped_files.txt")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2, lines
    assert all(len(line.split("\t")) == 2 for line in lines), lines


def test_backslashes_are_doubled_so_escapes_stay_unambiguous():
    assert Skip("a\\tb.png", "corrupt", "x").line() == "a\\\\tb.png\tcorrupt: x"
    assert Skip("a\tb.png", "corrupt", "x").line() == "a\\tb.png\tcorrupt: x"


# ---------------------------------------------------------------------------------------------
# Real images


def test_cifar10_jpegs_decode_exactly_like_pillow():
    from tests.shared_data import cifar10_root

    root = cifar10_root()
    files = scan_labeled(root / "test")
    assert files.classes == sorted(
        ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    )
    assert len(files) == 10_000 and files.skipped == []
    assert np.bincount(files.labels).tolist() == [1000] * 10
    for i in range(0, 10_000, 1250):
        path = files.root / files.paths[i]
        t = decode_image(path, 32)
        assert t.shape == (3, 32, 32) and t.dtype == torch.uint8
        # 32x32 already: no crop, no resize, and draft mode at scale 1 changes nothing.
        assert torch.equal(t, pillow_rgb(path)), files.paths[i]
