"""uint8 batches on the training device, in an order that a resumed run can replay exactly.

:func:`open_images` turns ``--data`` (a folder or a dataset name) plus the cache choice into a
set of images; :func:`make_loader` turns that set into batches on the device:

========  ==========================================================================
cache     what each epoch does
========  ==========================================================================
none      DataLoader workers decode every file (EXIF, RGB, resize); bad files skipped
disk      rows read from the memory-mapped decoded cache, by a background thread
gpu       rows indexed on the device itself: no workers, no copies
========  ==========================================================================

The order of epoch ``e`` depends only on (seed, e), and ``loader.iterate(e, start=k)`` starts
at batch k, so a run resumed mid-epoch sees the same remaining batches.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lowres_ssl.data.builtin import dataset_spec, load_builtin
from lowres_ssl.data.cache import ArrayImages, build_disk_cache, decoded_dir
from lowres_ssl.data.folders import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIZE,
    FolderImages,
    SkipLog,
    _no_images,
    collate_decoded,
    ignore_stop_signals,
    scan_folder,
    scan_labeled,
)
from lowres_ssl.device import same_device
from lowres_ssl.errors import UserError

log = logging.getLogger("lowres_ssl")

CACHE_CHOICES = ("auto", "none", "disk", "gpu")

GPU_CACHE_FRACTION = 0.25
"""``cache: gpu`` (and ``auto``) keeps the decoded set on the device only up to this fraction
of its memory; the rest belongs to training."""


@dataclass
class Batch:
    """A batch on the training device. ``indices`` are rows of the image set (CPU, int64)."""

    images: Tensor  # uint8 (B, 3, S, S)
    indices: Tensor
    labels: Tensor | None = None
    position: int = 0  # the batch's number in its epoch (where a resume continues after it)


MIN_TRAIN_BATCH = 2
"""Fewest images a training step takes: BatchNorm and the losses need two. A batch that bad
files left smaller than this is skipped (its files are listed) rather than trained on."""


def default_num_workers() -> int:
    """One decoding worker per spare CPU core (up to 8), shared between local processes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, ((cores or 2) - 1) // max(local, 1)))


class EpochOrder:
    """The batches of each epoch for one process of ``world_size``.

    Epoch e is a permutation drawn from a generator seeded by (seed, e) and cut into global
    batches of ``batch_size * world_size``; process ``rank`` takes its slice of each. With
    ``drop_last`` an incomplete global batch is dropped; otherwise it is shared as evenly as
    possible (some processes may get one row fewer).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        global_batch = batch_size * world_size
        if drop_last and n < global_batch:
            raise UserError(
                f"{n} images are fewer than one global batch of {global_batch} "
                f"({batch_size} x {world_size} processes); lower the batch size"
            )
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def __len__(self) -> int:
        g = self.batch_size * self.world_size
        return self.n // g if self.drop_last else -(-self.n // g)

    def permutation(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
        return torch.randperm(self.n, generator=gen)

    def batches(self, epoch: int, start: int = 0) -> list[Tensor]:
        """This process's index tensors for ``epoch``, from batch ``start`` on."""
        perm = self.permutation(epoch)
        g = self.batch_size * self.world_size
        out = []
        for b in range(start, len(self)):
            chunk = perm[b * g : (b + 1) * g]
            if len(chunk) == g:
                r = self.batch_size * self.rank
                out.append(chunk[r : r + self.batch_size])
            else:
                out.append(chunk.tensor_split(self.world_size)[self.rank])
        return out


class _EpochBatches:
    """A batch sampler that a persistent DataLoader re-reads each epoch."""

    def __init__(self, order: EpochOrder):
        self.order = order
        self.epoch, self.start = 0, 0

    def __iter__(self):
        return (b.tolist() for b in self.order.batches(self.epoch, self.start))

    def __len__(self) -> int:
        return len(self.order) - self.start


class ImageLoader:
    """Base of the loaders: ``iterate(epoch, start)`` yields :class:`Batch` on the device."""

    def __init__(self, order: EpochOrder, device: torch.device, skip_log: SkipLog):
        self.order, self.device, self.skip_log = order, device, skip_log
        self._epoch = 0

    def __len__(self) -> int:
        return len(self.order)

    def iterate(self, epoch: int, start: int = 0, keep_empty: bool = False) -> Iterator[Batch]:
        """The batches of ``epoch`` from number ``start`` on. A batch whose files were all bad
        is left out, unless ``keep_empty`` (training: every process sees every number)."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Batch]:
        epoch, self._epoch = self._epoch, self._epoch + 1
        return self.iterate(epoch)


def folder_gone(files, probes: int = 8) -> bool:
    """Whether the folder the images come from has gone: its root is no folder any more, or
    none of ``probes`` files spread over the set still exists (an emptied mount point)."""
    root = Path(files.root)
    if not root.is_dir():
        return True
    paths = files.paths
    if not paths:
        return False
    picks = {paths[i * (len(paths) - 1) // max(probes - 1, 1)] for i in range(probes)}
    return not any((root / p).exists() for p in picks)


class FolderLoader(ImageLoader):
    """Decodes every file each epoch in DataLoader workers. Bad files are dropped from their
    batch (which is then smaller) and recorded in the skip log."""

    def __init__(self, images: FolderImages, order, device, skip_log, num_workers: int):
        super().__init__(order, device, skip_log)
        self.images = images
        self._labels = images.labels
        self._batches = _EpochBatches(order)
        self._loader = DataLoader(
            images,
            batch_sampler=self._batches,
            num_workers=num_workers,
            collate_fn=partial(collate_decoded, load_size=images.load_size),
            pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
            # Its own generator: creating an iterator must not draw from the global torch RNG,
            # or a resumed run's augmentation would drift from the uninterrupted one's.
            generator=torch.Generator().manual_seed(0),
            worker_init_fn=ignore_stop_signals,
        )

    def iterate(self, epoch: int, start: int = 0, keep_empty: bool = False) -> Iterator[Batch]:
        self._batches.epoch, self._batches.start = epoch, start
        delivered = 0
        for position, decoded in enumerate(self._loader, start):
            self.skip_log.add(decoded.skipped)
            if decoded.skipped and folder_gone(self.images.files):
                raise UserError(
                    f"the data folder {self.images.files.root} is gone (unmounted, moved or "
                    "deleted mid-run): bring it back, then continue with --resume; the last "
                    "checkpoint is kept"
                )
            if len(decoded.indices) == 0 and not keep_empty:
                continue
            delivered += len(decoded.indices)
            labels = None if self._labels is None else self._labels[decoded.indices]
            yield Batch(
                decoded.images.to(self.device, non_blocking=True),
                decoded.indices,
                None if labels is None else labels.to(self.device, non_blocking=True),
                position,
            )
        if delivered == 0 and start == 0 and len(self.order) > 0:
            files = self.images.files
            raise _no_images(files.root, f" ({len(files)} files, all unusable)")


class ArrayLoader(ImageLoader):
    """Rows of a decoded array. On the device: plain indexing. In memory or memory-mapped on
    disk: a background thread gathers (and pins) the next batches while the GPU works."""

    def __init__(self, images: ArrayImages, order, device, skip_log, prefetch: int = 3):
        super().__init__(order, device, skip_log)
        self.images = images
        self.prefetch = prefetch
        skip_log.add(images.skipped)

    def _gather(self, idx: Tensor, position: int) -> Batch:
        a = self.images
        on_device = same_device(a.images.device, self.device)
        rows = a.images[idx.to(a.images.device)] if on_device else a.images[idx]
        labels = None if a.labels is None else a.labels[idx.to(a.labels.device)]
        if not on_device and self.device.type == "cuda":
            rows = rows.pin_memory()
        return Batch(rows, idx, labels, position)

    def _to_device(self, b: Batch) -> Batch:
        return Batch(
            b.images.to(self.device, non_blocking=True),
            b.indices,
            None if b.labels is None else b.labels.to(self.device, non_blocking=True),
            b.position,
        )

    def iterate(self, epoch: int, start: int = 0, keep_empty: bool = False) -> Iterator[Batch]:
        batches = list(enumerate(self.order.batches(epoch, start), start))
        if same_device(self.images.images.device, self.device) or self.prefetch == 0:
            for position, idx in batches:
                yield self._to_device(self._gather(idx, position))
            return
        yield from self._threaded(batches)

    def _threaded(self, batches: list[tuple[int, Tensor]]) -> Iterator[Batch]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def work():
            try:
                for position, idx in batches:
                    item = self._gather(idx, position)
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(None)
            except BaseException as err:  # re-raised in the consumer
                q.put(err)

        thread = threading.Thread(target=work, daemon=True, name="lowres_ssl-array-loader")
        thread.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield self._to_device(item)
        finally:
            stop.set()
            thread.join()


def fits_gpu_cache(nbytes: float, card_bytes: float) -> bool:
    """The rule of ``cache: gpu`` and ``auto``: a decoded set of ``nbytes`` stays on a card of
    ``card_bytes`` when it takes at most :data:`GPU_CACHE_FRACTION` of it."""
    return nbytes <= GPU_CACHE_FRACTION * card_bytes


def _fits_on_device(nbytes: int, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    from lowres_ssl.device import card_memory_gib  # the emulated card's, where one is set

    return fits_gpu_cache(nbytes, card_memory_gib(device) * 2**30)


def open_images(
    data: str | Path,
    *,
    load_size: int,
    labeled: bool = False,
    split: str = "train",
    cache: str = "auto",
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    num_workers: int | None = None,
    min_size: int = DEFAULT_MIN_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    download: bool = True,
    progress: bool = True,
) -> FolderImages | ArrayImages:
    """The image set named by ``data``, decoded or cached as ``cache`` says.

    ``data`` is a folder (scanned recursively; with ``labeled`` an ImageFolder tree of class
    subfolders) or a dataset name (digits, cifar10, cifar100, stl10; ``split`` picks
    train/test/…, unless the name carries one: ``cifar10:test``).
    ``cache``: ``none`` decodes each epoch (a :class:`FolderImages`); ``disk`` decodes once
    into a reusable memory-mapped cache; ``gpu`` also moves the decoded set onto ``device``
    when it fits; ``auto`` is ``gpu`` where it fits, else ``disk``, else ``none`` (a cache
    larger than half of the free disk space is not written).
    """
    if cache not in CACHE_CHOICES:
        raise UserError(f"unknown data.cache {cache!r}; choose one of {', '.join(CACHE_CHOICES)}")
    if load_size < 1:
        raise UserError(f"data.load_size must be a positive number of pixels, got {load_size}")
    device = torch.device(device)
    spec = str(data)
    if (named := dataset_spec(spec)) is not None:
        arr = load_builtin(
            named[0],
            split=named[1] or split,
            load_size=load_size,
            root=_datasets_dir(cache_dir),
            download=download,
        )
        if cache in ("gpu", "auto") and _fits_on_device(arr.images.nbytes, device):
            arr = arr.to(device)
        return arr

    files = scan_labeled(spec) if labeled else scan_folder(spec)
    images = FolderImages(files, load_size, min_size=min_size, max_pixels=max_pixels)
    nbytes = len(files) * 3 * load_size * load_size
    if cache == "auto":
        cache = "gpu" if device.type == "cuda" and _fits_on_device(nbytes, device) else "disk"
        if cache == "disk" and not room_on_disk(nbytes, cache_dir):
            log.info("data: decoded cache would not fit on disk; decoding every epoch instead")
            cache = "none"
    if cache == "none":
        return images
    workers = default_num_workers() if num_workers is None else num_workers
    arr = build_disk_cache(images, cache_dir, num_workers=workers, progress=progress)
    if len(arr) == 0:
        raise _no_images(files.root, f" ({len(arr.skipped)} files, all unusable)")
    if cache == "gpu":
        if _fits_on_device(arr.images.nbytes, device):
            arr = arr.to(device)
        else:
            log.info(
                "data: the decoded set (%.1f GiB) is over %d%% of the device memory; "
                "reading it from the disk cache instead",
                arr.images.nbytes / 2**30,
                int(GPU_CACHE_FRACTION * 100),
            )
    return arr


def _datasets_dir(cache_dir: str | Path | None) -> Path | None:
    return None if cache_dir is None else Path(cache_dir) / "datasets"


def room_on_disk(nbytes: int, cache_dir: str | Path | None) -> bool:
    probe = decoded_dir(cache_dir)
    while not probe.exists():
        probe = probe.parent
    return nbytes <= 0.5 * shutil.disk_usage(probe).free


def make_loader(
    images: FolderImages | ArrayImages,
    batch_size: int,
    *,
    device: str | torch.device = "cpu",
    shuffle: bool = True,
    drop_last: bool = True,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int | None = None,
    skip_log: SkipLog | None = None,
) -> ImageLoader:
    """Batches of ``batch_size`` uint8 images per process on ``device`` (see module doc)."""
    device = torch.device(device)
    order = EpochOrder(
        len(images),
        batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        seed=seed,
        rank=rank,
        world_size=world_size,
    )
    if skip_log is None:
        root = images.files.root if isinstance(images, FolderImages) else images.name
        skip_log = SkipLog(root)
    if isinstance(images, FolderImages):
        skip_log.add(images.files.skipped)
        workers = default_num_workers() if num_workers is None else num_workers
        return FolderLoader(images, order, device, skip_log, workers)
    return ArrayLoader(images, order, device, skip_log)
