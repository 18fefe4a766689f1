"""Decoded images in one uint8 array: the disk cache and the on-device copy.

``cache: disk`` decodes every image once, at ``load_size``, into one memory-mapped uint8 file
plus an index, in a folder named by a fingerprint of (file list, sizes, modification times,
load_size, decode settings): a changed folder gets a new cache, an unchanged one is reused
across runs and later epochs read pixels with no decoding. ``cache: gpu`` puts the whole array
on the training device, where batches are indexed with no loader workers at all.

A cache folder is built under a temporary name and renamed when complete, so an interrupted
build never leaves a cache that looks usable. Its index records the pixel file's size and a
CRC-32 of every :data:`CHUNK_BYTES` of it; a cache cut short, bit-flipped or with an unreadable
index is found when it is opened and decoded again, with one line (:class:`DamagedCache`).
The pixel file's space is reserved before the first byte is decoded: a disk too small is a
one-line error then, not a crash of the memory map later.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
import zlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lowres_ssl.data.folders import FolderImages, Skip, collate_decoded, ignore_stop_signals
from lowres_ssl.files import disk_full_is_a_user_error

log = logging.getLogger("lowres_ssl")

CACHE_VERSION = 2
"""Bumped when decoding or the index changes, so that old caches are not reused
(2: the index records the pixel file's size and checksums)."""

#: The pixel file's checksums: one CRC-32 per this many bytes (the last chunk may be shorter).
CHUNK_BYTES = 64 * 2**20

IMAGES_FILE = "images.u8"
INDEX_FILE = "index.json"


def default_cache_dir() -> Path:
    """``$LOWRES_SSL_CACHE``, else ``$XDG_CACHE_HOME/lowres_ssl``, else ``~/.cache/lowres_ssl``."""
    if os.environ.get("LOWRES_SSL_CACHE"):
        return Path(os.environ["LOWRES_SSL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lowres_ssl"


@dataclass
class ArrayImages:
    """Decoded images held in one uint8 tensor of shape (N, 3, S, S): in memory, memory-mapped
    from a disk cache, or on the training device.

    ``paths[i]`` names the source of row i where there is one (folders), ``labels`` are int64
    class indices into ``classes`` (or None), ``skipped`` lists the files left out when the
    array was built, ``fingerprint`` identifies the source files of a disk cache.
    """

    images: Tensor
    name: str
    labels: Tensor | None = None
    classes: list[str] | None = None
    paths: list[str] | None = None
    skipped: list[Skip] = field(default_factory=list)
    fingerprint: str | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def load_size(self) -> int:
        return self.images.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: str | torch.device) -> ArrayImages:
        """The same set with its pixels (and labels) on ``device``."""
        labels = None if self.labels is None else self.labels.to(device)
        return dataclasses.replace(self, images=self.images.to(device), labels=labels)


def fingerprint(images: FolderImages) -> str:
    """A hash of everything the decoded pixels depend on."""
    files = images.files
    h = hashlib.sha256()
    settings = {
        "version": CACHE_VERSION,
        "root": str(files.root),
        "load_size": images.load_size,
        "min_size": images.min_size,
        "max_pixels": images.max_pixels,
        "classes": files.classes,
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    for i, (p, s, m) in enumerate(zip(files.paths, files.sizes, files.mtimes_ns, strict=True)):
        label = "" if files.labels is None else files.labels[i]
        h.update(f"{p}\0{s}\0{m}\0{label}\n".encode())
    return h.hexdigest()


def _prefix(images: FolderImages) -> str:
    """Cache folders of one (folder, decode settings, labeled or not, load_size) share this
    prefix: a new build replaces the older ones."""
    root = images.files.root
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", root.name)[:40] or "root"
    settings = f"{root}\0{images.min_size}\0{images.max_pixels}"
    where = hashlib.sha256(settings.encode()).hexdigest()[:8]
    kind = "labeled" if images.files.labels is not None else "images"
    return f"{safe}-{where}-{kind}-{images.load_size}px-"


def decoded_dir(cache_dir: str | Path | None = None) -> Path:
    """The folder that holds the decoded caches: ``cache_dir``, else ``<default>/decoded``."""
    return Path(cache_dir) if cache_dir is not None else default_cache_dir() / "decoded"


def cache_path(
    images: FolderImages, cache_dir: str | Path | None = None, *, fingerprint_: str | None = None
) -> Path:
    """Where the disk cache of ``images`` lives (whether or not it exists yet); pass
    ``fingerprint_`` when it is already computed (it hashes every file's metadata)."""
    fp = fingerprint_ or fingerprint(images)
    return decoded_dir(cache_dir) / (_prefix(images) + fp[:16])


class DamagedCache(Exception):
    """A cache folder that cannot be trusted; the message says why (the caller rebuilds it)."""


def checksums(path: Path, size: int) -> list[int]:
    """A CRC-32 of every :data:`CHUNK_BYTES` of the first ``size`` bytes of ``path``."""
    out = []
    with open(path, "rb") as f:
        for _ in range(0, size, CHUNK_BYTES):
            out.append(zlib.crc32(f.read(CHUNK_BYTES)))
    return out


def _read_index(path: Path) -> dict:
    try:
        index = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedCache(f"its {INDEX_FILE} cannot be read ({type(e).__name__})") from None
    keys = ("version", "root", "load_size", "count", "paths", "skipped", "bytes", "crc32")
    if not isinstance(index, dict) or any(k not in index for k in keys):
        raise DamagedCache(f"its {INDEX_FILE} lacks entries (an older version or damaged)")
    if index["version"] != CACHE_VERSION:
        raise DamagedCache(f"it was made by cache version {index['version']}")
    return index


def verify(path: str | Path) -> dict:
    """The index of the cache folder ``path`` once its pixel file has the size and the
    checksums the index records; :class:`DamagedCache` saying what differs otherwise."""
    path = Path(path)
    index = _read_index(path)
    n, s = index["count"], index["load_size"]
    expected = n * 3 * s * s
    pixels = path / IMAGES_FILE
    try:
        actual = pixels.stat().st_size
    except OSError:
        raise DamagedCache(f"its {IMAGES_FILE} is missing") from None
    if actual != expected or index["bytes"] != expected or len(index["paths"]) != n:
        raise DamagedCache(
            f"its {IMAGES_FILE} holds {actual:,} bytes where {n:,} images take {expected:,}"
        )
    if expected > 4 * 2**30:
        log.info("checking the decoded cache %s (%.1f GB)", path, expected / 1e9)
    found = checksums(pixels, expected)
    bad = [i for i, (a, b) in enumerate(zip(found, index["crc32"], strict=False)) if a != b]
    if bad or len(found) != len(index["crc32"]):
        where = f"from byte {bad[0] * CHUNK_BYTES:,}" if bad else "its checksum list"
        raise DamagedCache(f"its pixels differ from their checksums ({where})")
    return index


def load_disk_cache(path: str | Path, *, check: bool = True) -> ArrayImages:
    """Open a complete cache folder (checked by :func:`verify`, unless ``check`` is off: it was
    just built); the pixels stay on disk (memory-mapped) until read."""
    path = Path(path)
    index = verify(path) if check else _read_index(path)
    n, s = index["count"], index["load_size"]
    if n:
        pixels = torch.from_file(
            str(path / IMAGES_FILE), shared=False, size=n * 3 * s * s, dtype=torch.uint8
        ).view(n, 3, s, s)
    else:
        pixels = torch.empty((0, 3, s, s), dtype=torch.uint8)
    labels = index.get("labels")
    return ArrayImages(
        images=pixels,
        name=index["root"],
        labels=None if labels is None else torch.tensor(labels, dtype=torch.long),
        classes=index.get("classes"),
        paths=index["paths"],
        skipped=[Skip(*s) for s in index["skipped"]],
        fingerprint=index.get("fingerprint"),
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours, or no kill() on this platform
        return True
    return True


def _remove_stale(final: Path) -> None:
    """Remove unfinished builds of dead processes, and older caches of the same folder."""
    prefix = final.name[:-16]
    for p in final.parent.glob(f".{prefix}*.tmp-*"):
        try:
            pid = int(p.name.rsplit("-", 2)[-2])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
    for p in final.parent.glob(f"{prefix}*"):
        # Another run still reading an old cache keeps its open mapping (POSIX unlink).
        if p != final and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def build_disk_cache(
    images: FolderImages,
    cache_dir: str | Path | None = None,
    *,
    num_workers: int = 0,
    progress: bool = True,
) -> ArrayImages:
    """Decode every file of ``images`` once into a disk cache (or reuse the existing one).

    Good images are stored contiguously in file order; bad files are left out and recorded in
    the index, so a run that reuses the cache still lists them. Safe against interruption and
    against several processes building at once (the first complete folder wins).
    """
    fp = fingerprint(images)
    final = cache_path(images, cache_dir, fingerprint_=fp)
    if (final / INDEX_FILE).exists():
        try:
            return load_disk_cache(final)
        except DamagedCache as e:
            log.warning("the decoded cache %s is damaged (%s): decoding the images again", final, e)
            shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # no index: damaged by hand, never by an interrupted build
        shutil.rmtree(final, ignore_errors=True)
    _remove_stale(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{time.time_ns() % 10**9}")
    tmp.mkdir()
    try:
        _write_cache(images, tmp, num_workers, progress, fp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / INDEX_FILE).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_disk_cache(final, check=False)


def _reserve(path: Path, size: int) -> None:
    """Create ``path`` with ``size`` bytes of disk space really allocated (a memory map over a
    sparse file would crash, SIGBUS, where the disk fills): a full disk is a one-line error."""
    fix = (
        "free some space, point data.cache_dir (or $LOWRES_SSL_CACHE) at a larger disk, or "
        "use data.cache=none (decode every epoch)"
    )
    where = path.parent.parent
    with (
        disk_full_is_a_user_error(where, "the decoded images", needed=size, fix=fix),
        open(path, "wb") as f,
    ):
        try:
            if size:
                os.posix_fallocate(f.fileno(), 0, size)
        except (AttributeError, OSError) as e:  # no fallocate here, or not on this file system
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            f.truncate(size)


def _write_cache(
    images: FolderImages, folder: Path, num_workers: int, progress: bool, fingerprint_: str
) -> None:
    n, s = len(images), images.load_size
    per_image = 3 * s * s
    _reserve(folder / IMAGES_FILE, n * per_image)
    out = np.memmap(folder / IMAGES_FILE, dtype=np.uint8, mode="r+", shape=(n, 3, s, s))
    loader = DataLoader(
        images,
        batch_size=64,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=partial(collate_decoded, load_size=s),
        generator=torch.Generator().manual_seed(0),  # leave the global RNG alone
        worker_init_fn=ignore_stop_signals,
    )
    good: list[int] = []
    skipped: list[Skip] = list(images.files.skipped)
    bar = tqdm(
        total=n, desc=f"decoding {images.files.root.name} once", unit="img", disable=not progress
    )
    for batch in loader:
        k = len(good)
        out[k : k + len(batch.indices)] = batch.images.numpy()
        good.extend(batch.indices.tolist())
        skipped.extend(batch.skipped)
        bar.update(len(batch.indices) + len(batch.skipped))
    bar.close()
    out.flush()
    del out
    with open(folder / IMAGES_FILE, "r+b") as f:
        f.truncate(len(good) * per_image)  # bad files were left out
        os.fsync(f.fileno())
    files = images.files
    size = len(good) * per_image
    index = {
        "version": CACHE_VERSION,
        "root": str(files.root),
        "load_size": s,
        "count": len(good),
        "paths": [files.paths[i] for i in good],
        "labels": None if files.labels is None else [files.labels[i] for i in good],
        "classes": files.classes,
        "skipped": [[k.path, k.kind, k.detail] for k in skipped],
        "fingerprint": fingerprint_,
        "bytes": size,
        "crc32": checksums(folder / IMAGES_FILE, size),
    }
    with open(folder / INDEX_FILE, "w", encoding="utf-8") as f:
        json.dump(index, f)
        f.flush()
        os.fsync(f.fileno())
