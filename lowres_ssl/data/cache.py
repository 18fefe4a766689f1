"""Decoded images in one uint8 array: the disk cache and the on-device copy.

``cache: disk`` decodes every image once, at ``load_size``, into one memory-mapped uint8 file
plus an index, in a folder named by a fingerprint of (file list, sizes, modification times,
load_size, decode settings): a changed folder gets a new cache, an unchanged one is reused
across runs and later epochs read pixels with no decoding. ``cache: gpu`` puts the whole array
on the training device, where batches are indexed with no loader workers at all.

A cache folder is built under a temporary name and renamed when complete, so an interrupted
build never leaves a cache that looks usable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lowres_ssl.data.folders import FolderImages, Skip, collate_decoded

log = logging.getLogger("lowres_ssl")

CACHE_VERSION = 1
"""Bumped when decoding changes, so that old caches are not reused."""

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


def load_disk_cache(path: str | Path) -> ArrayImages:
    """Open a complete cache folder; the pixels stay on disk (memory-mapped) until read."""
    path = Path(path)
    index = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))
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
        return load_disk_cache(final)
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
    return load_disk_cache(final)


def _write_cache(
    images: FolderImages, folder: Path, num_workers: int, progress: bool, fingerprint_: str
) -> None:
    n, s = len(images), images.load_size
    per_image = 3 * s * s
    out = np.memmap(folder / IMAGES_FILE, dtype=np.uint8, mode="w+", shape=(n, 3, s, s))
    loader = DataLoader(
        images,
        batch_size=64,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=partial(collate_decoded, load_size=s),
        generator=torch.Generator().manual_seed(0),  # leave the global RNG alone
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
        f.truncate(len(good) * per_image)
        os.fsync(f.fileno())
    files = images.files
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
    }
    with open(folder / INDEX_FILE, "w", encoding="utf-8") as f:
        json.dump(index, f)
        f.flush()
        os.fsync(f.fileno())
