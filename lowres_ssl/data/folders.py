"""Folders of image files: scanning, decoding to uint8 squares, and the list of skipped files.

A user's folder is large, messy and unlabeled. Scanning finds the images (recursively, in a
stable sorted order, hidden files and folders ignored); decoding turns one file into a uint8
(3, load_size, load_size) tensor; a file that cannot become such a tensor is *skipped*: counted,
listed once in the run folder's ``skipped_files.txt`` with its reason, and never fatal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from lowres_ssl.errors import UserError
from lowres_ssl.files import write_text_atomic

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
"""Accepted file extensions, matched in any letter case."""

DEFAULT_MIN_SIZE = 16
"""Images whose shorter side is below this many pixels (icons, tracking pixels) are skipped."""

DEFAULT_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
"""Images with more pixels than this are skipped as decompression bombs (Pillow's own limit,
about 179 megapixels: larger than any phone photo, far smaller than a crafted bomb). A larger
value also needs Pillow's ``Image.MAX_IMAGE_PIXELS`` raised, since Pillow refuses first."""

# Transparent pixels are shown on white, as image viewers and browsers do.
_BACKGROUND = (255, 255, 255)

# Skip kinds, in the order the summary line lists them.
SKIP_KINDS = (
    "empty",
    "unreadable",
    "not-an-image",
    "corrupt",
    "too-small",
    "too-large",
    "unsupported-mode",
    "not-a-file",
    "no-class",
)


@dataclass(frozen=True)
class Skip:
    """A file that was not used, and why. ``kind`` is one of :data:`SKIP_KINDS`."""

    path: str
    kind: str
    detail: str

    def line(self) -> str:
        # A tab or line break inside a file name must not break the one-line-per-file format;
        # backslashes are doubled first so that the escapes stay unambiguous.
        path = self.path.replace("\\", "\\\\")
        for char, escape in (("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r")):
            path = path.replace(char, escape)
        return f"{path}\t{self.kind}: {self.detail}"


class BadImage(Exception):
    """Raised by :func:`decode_image` for a file that cannot be used; carries the skip kind."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


# ---------------------------------------------------------------------------------------------
# Scanning


@dataclass
class FileList:
    """The image files under a root folder, sorted, with what the cache fingerprint needs.

    ``paths`` are relative to ``root`` with ``/`` separators; ``labels[i]`` indexes ``classes``
    for a labeled (ImageFolder) scan and is ``None`` for an unlabeled one.
    """

    root: Path
    paths: list[str]
    sizes: list[int]
    mtimes_ns: list[int]
    skipped: list[Skip]
    labels: list[int] | None = None
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.paths)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _walk(folder: Path, rel: str, out: list[tuple[str, int, int]], skipped: list[Skip], seen):
    """Depth-first scan of ``folder``; ``seen`` holds (device, inode) of visited folders, so a
    symbolic link that points back up the tree is not followed forever."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as err:
        skipped.append(Skip(rel or ".", "unreadable", f"cannot list folder ({err.strerror})"))
        return
    for entry in entries:
        if _is_hidden(entry.name):
            continue
        path = f"{rel}/{entry.name}" if rel else entry.name
        try:
            st = entry.stat()  # follows symbolic links
        except FileNotFoundError:
            if entry.name.lower().endswith(IMAGE_EXTENSIONS):
                skipped.append(Skip(path, "unreadable", "broken symbolic link"))
            continue
        except OSError as err:
            skipped.append(Skip(path, "unreadable", f"cannot stat ({err.strerror})"))
            continue
        if stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                _walk(Path(entry.path), path, out, skipped, seen)
            continue
        if not entry.name.lower().endswith(IMAGE_EXTENSIONS):
            continue
        if not stat.S_ISREG(st.st_mode):
            skipped.append(
                Skip(path, "not-a-file", "not a regular file (a pipe, socket or device)")
            )
        elif st.st_size == 0:
            skipped.append(Skip(path, "empty", "zero bytes"))
        else:
            out.append((path, st.st_size, st.st_mtime_ns))


def _check_folder(root: Path) -> Path:
    root = Path(os.path.expanduser(root))
    if not root.exists():
        raise UserError(
            f"data folder {root} does not exist; pass a folder of images "
            f"({' '.join(IMAGE_EXTENSIONS)}) or a dataset name (digits, cifar10, cifar100, stl10)"
        )
    if not root.is_dir():
        raise UserError(f"--data {root} is a file, not a folder; pass the folder that holds it")
    return root.resolve()


def _no_images(root: Path, where: str = "") -> UserError:
    return UserError(
        f"no usable image in {root}{where}; accepted extensions (any case, searched "
        f"recursively): {' '.join(IMAGE_EXTENSIONS)}"
    )


def scan_folder(root: str | Path) -> FileList:
    """All image files under ``root``, recursively, sorted by relative path; no labels."""
    root = _check_folder(Path(root))
    found: list[tuple[str, int, int]] = []
    skipped: list[Skip] = []
    _walk(root, "", found, skipped, {(root.stat().st_dev, root.stat().st_ino)})
    if not found:
        raise _no_images(root)
    found.sort()
    return FileList(
        root=root,
        paths=[p for p, _, _ in found],
        sizes=[s for _, s, _ in found],
        mtimes_ns=[m for _, _, m in found],
        skipped=skipped,
    )


def scan_labeled(root: str | Path) -> FileList:
    """An ImageFolder tree, ``root/<class>/…/<image>``: one (non-hidden) subfolder per class,
    classes in sorted order, each scanned recursively. Images directly in ``root`` belong to no
    class and are listed as skipped."""
    root = _check_folder(Path(root))
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not _is_hidden(e.name))
    if not classes:
        raise UserError(
            f"{root} has no class subfolders; a labeled dataset is laid out as "
            f"{root}/<class name>/<image>"
        )
    found: list[tuple[str, int, int, int]] = []
    skipped: list[Skip] = []
    for name in sorted(os.listdir(root)):
        p = root / name
        if not _is_hidden(name) and p.is_file() and name.lower().endswith(IMAGE_EXTENSIONS):
            skipped.append(Skip(name, "no-class", "image not inside a class subfolder"))
    for label, name in enumerate(classes):
        part: list[tuple[str, int, int]] = []
        folder = root / name
        _walk(folder, name, part, skipped, {(folder.stat().st_dev, folder.stat().st_ino)})
        found.extend((p, s, m, label) for p, s, m in part)
    if not found:
        raise _no_images(root, " (in its class subfolders)")
    found.sort()
    return FileList(
        root=root,
        paths=[f[0] for f in found],
        sizes=[f[1] for f in found],
        mtimes_ns=[f[2] for f in found],
        skipped=skipped,
        labels=[f[3] for f in found],
        classes=classes,
    )


# ---------------------------------------------------------------------------------------------
# Decoding


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: high-bit-depth grey scaled (not clipped) to 0–255,
    transparency composited on white, palettes and CMYK converted."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey (Pillow opens 16-bit PNGs as "I" or "I;16"): 65535 maps to 255. An "I"
        # image whose values all fit in 0–255 holds 8-bit data and is kept as it is.
        a = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16") or np.max(a, initial=0.0) > 255:
            a = a / 257.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if np.nanmax(a, initial=0.0) <= 1.0:  # floats in [0, 1]
            a = a * 255.0
        a = np.nan_to_num(a, nan=0.0)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "LAB":  # Pillow's plain convert would reinterpret L*a*b* numbers as RGB
        lab_to_srgb = ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
        )
        return ImageCms.applyTransform(im, lab_to_srgb)
    try:
        return im.convert("RGB")
    except ValueError as err:
        raise BadImage("unsupported-mode", f"cannot convert mode {mode} to RGB ({err})") from None


def decode_image(
    path: str | Path,
    load_size: int,
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Tensor:
    """Decode one image file to a uint8 tensor of shape (3, load_size, load_size).

    Steps: read the header and check the size (too small, or a decompression bomb, before any
    pixel is decoded); let the JPEG decoder shrink by 1/2, 1/4 or 1/8 while decoding when the
    image is much larger than needed; apply the EXIF orientation; convert to RGB; take the
    centred square and resize it to ``load_size`` (bicubic, antialiased). Raises
    :class:`BadImage` with the skip kind for any file that cannot be used.
    """
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            # We check the pixel count ourselves, with the user's limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                im = Image.open(f)
            except UnidentifiedImageError:
                raise BadImage("not-an-image", "not a readable image format") from None
            except Image.DecompressionBombError as err:
                raise BadImage("too-large", str(err).split(" could be")[0].rstrip(",")) from None
            w, h = im.size
            if w * h > max_pixels:
                raise BadImage(
                    "too-large", f"{w}x{h} pixels > max_pixels {max_pixels} (decompression bomb?)"
                )
            if min(w, h) < min_size:
                raise BadImage("too-small", f"{w}x{h}: shorter side < min_size {min_size} px")
            if im.format == "JPEG":
                s = min(w, h)
                im.draft(None, (load_size * w // s, load_size * h // s))
            # Decode the pixels first: exif_transpose would load them itself and a damaged
            # stream's error would be lost with the EXIF errors suppressed below.
            im.load()
            with contextlib.suppress(Exception):  # a damaged EXIF block must not cost a good image
                im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
    except BadImage:
        raise
    except PermissionError as err:
        raise BadImage("unreadable", f"permission denied ({err.strerror})") from None
    except FileNotFoundError:
        raise BadImage("unreadable", "file disappeared after the scan") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as err:
        # Pillow reports truncated and damaged files as OSError, some decoders as
        # SyntaxError/ValueError/EOFError.
        raise BadImage("corrupt", f"{type(err).__name__}: {err}") from None

    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    if (w, h) != (load_size, load_size):
        im = im.resize(
            (load_size, load_size),
            Image.Resampling.BICUBIC,
            box=(left, top, left + s, top + s),
            reducing_gap=3.0,
        )
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


@dataclass
class Decoded:
    """One decoded item: ``image`` is None and ``skip`` says why when the file was unusable."""

    index: int
    image: Tensor | None
    skip: Skip | None


class FolderImages(Dataset):
    """Image files decoded on demand (in DataLoader workers) to uint8 squares.

    ``dataset[i]`` returns a :class:`Decoded`; bad files come back as skips, never as errors.
    """

    def __init__(
        self,
        files: FileList,
        load_size: int,
        *,
        min_size: int = DEFAULT_MIN_SIZE,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        if load_size < 1:
            raise UserError(f"data.load_size must be a positive number of pixels, got {load_size}")
        self.files = files
        self.load_size = load_size
        self.min_size = min_size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.files)

    @property
    def labels(self) -> Tensor | None:
        return None if self.files.labels is None else torch.tensor(self.files.labels)

    @property
    def classes(self) -> list[str] | None:
        return self.files.classes

    def path(self, i: int) -> Path:
        return self.files.root / self.files.paths[i]

    def __getitem__(self, i: int) -> Decoded:
        try:
            image = decode_image(
                self.path(i), self.load_size, min_size=self.min_size, max_pixels=self.max_pixels
            )
        except BadImage as bad:
            return Decoded(i, None, Skip(self.files.paths[i], bad.kind, bad.detail))
        return Decoded(i, image, None)


@dataclass
class DecodedBatch:
    """Collated output of a DataLoader over :class:`FolderImages`: the good images only."""

    images: Tensor  # uint8 (k, 3, S, S)
    indices: Tensor  # int64 (k,)
    skipped: list[Skip]

    def pin_memory(self) -> DecodedBatch:
        return DecodedBatch(self.images.pin_memory(), self.indices, self.skipped)


def ignore_stop_signals(worker_id: int) -> None:
    """A decoding worker leaves Ctrl-C and SIGTERM to the main process, which stops after the
    step with a checkpoint and then ends the workers (a worker killed by the signal sent to
    the whole process group would fail the next batch instead)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def collate_decoded(items: Sequence[Decoded], load_size: int) -> DecodedBatch:
    """Stack the good images of a batch (uint8: 4× fewer bytes to move than float)."""
    good = [d for d in items if d.image is not None]
    if good:
        images = torch.stack([d.image for d in good])
    else:
        images = torch.empty((0, 3, load_size, load_size), dtype=torch.uint8)
    return DecodedBatch(
        images=images,
        indices=torch.tensor([d.index for d in good], dtype=torch.long),
        skipped=[d.skip for d in items if d.skip is not None],
    )


# ---------------------------------------------------------------------------------------------
# The skip list


class SkipLog:
    """Every skipped file once, with its reason; written to the run folder as
    ``skipped_files.txt`` (tab-separated ``path<TAB>kind: detail``, sorted by path)."""

    def __init__(self, root: str | Path | None = None):
        self.root = None if root is None else str(root)
        self._skips: dict[str, Skip] = {}

    def add(self, skips: Sequence[Skip]) -> None:
        for s in skips:
            self._skips.setdefault(s.path, s)

    def __len__(self) -> int:
        return len(self._skips)

    def __iter__(self):
        return iter(sorted(self._skips.values(), key=lambda s: s.path))

    def counts(self) -> Counter:
        return Counter(s.kind for s in self._skips.values())

    def summary(self, used: int | None = None) -> str:
        """One log line, e.g. ``skipped 3 files (2 corrupt, 1 empty); 49,997 used``."""
        if not self._skips:
            return "no files skipped" if used is None else f"all {used:,} files used"
        counts = self.counts()
        order = [k for k in SKIP_KINDS if k in counts] + sorted(set(counts) - set(SKIP_KINDS))
        parts = ", ".join(f"{counts[k]} {k}" for k in order)
        n = len(self._skips)
        line = f"skipped {n:,} file{'s' if n != 1 else ''} ({parts})"
        return line if used is None else f"{line}; {used:,} used"

    def write(self, path: str | Path) -> Path:
        """Write the list atomically (temporary file, then rename)."""
        header = f"# skipped files under {self.root}\n" if self.root else ""
        return write_text_atomic(path, header + "".join(s.line() + "\n" for s in self))
