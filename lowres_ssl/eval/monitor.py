"""The online kNN monitor: kNN top-1 of the backbone being trained, every few epochs.

It must not change training: the backbone runs in eval mode under ``no_grad`` (BatchNorm's
running statistics untouched), nothing is drawn from the augmentation generator or the global
random state (the loaders are not shuffled and have generators of their own), and train mode
is restored. With several processes each computes the features of its share of both sets;
the train features are gathered (a sum of disjoint shares), each process classifies its share
of the test rows, and the counts are summed: the accuracy is the one-process value.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from lowres_ssl.config import Config
from lowres_ssl.data import dataset_spec
from lowres_ssl.eval.features import (
    LabeledSet,
    align_classes,
    extract_all,
    open_labeled,
    split_spec,
)
from lowres_ssl.eval.knn import knn_scores, topk_correct

log = logging.getLogger("lowres_ssl")


def default_sets(cfg: Config) -> tuple[str | None, str | None]:
    """(train, test) evaluation sets of a run: ``eval.train`` and ``eval.test``, else for a
    dataset name such as ``cifar10`` its train split (labeled for every named dataset; STL-10's
    unlabeled images are another split) and its test split; for a folder, the folder itself
    read as labeled (``root/<class>/…``), and no test set."""
    e, d = cfg.eval, cfg.data
    named = dataset_spec(d.path)
    train = e.train or (f"{named[0]}:train" if named else d.path)
    return train, e.test or (f"{named[0]}:test" if named else None)


def eval_sets(cfg: Config) -> tuple[str, str] | None:
    """(train, test) of the online monitor (see :func:`default_sets`), or None when it is off:
    ``eval.every_epochs`` 0, or no test set."""
    train, test = default_sets(cfg)
    every = cfg.eval.every_epochs if cfg.eval.every_epochs is not None else 1
    if every == 0 or test is None:
        return None
    return train, test


class KNNMonitor:
    """kNN top-1 (and top-5, and k = 20) of a backbone on fixed labeled train/test sets."""

    def __init__(
        self,
        train_set: LabeledSet,
        test_set: LabeledSet,
        *,
        every_epochs: int,
        k: int = 200,
        batch_size: int = 256,
        accelerator=None,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
    ):
        self.train_set, self.test_set = train_set, test_set
        self.test_labels = align_classes(
            train_set.classes, test_set.classes, test_set.labels, test_set.name
        )
        self.every_epochs, self.k, self.batch_size = every_epochs, k, batch_size
        self.accelerator = accelerator
        self.device = torch.device(device) if accelerator is None else accelerator.device
        self.channels_last = channels_last
        self.ks = tuple(sorted({20, k}))

    @classmethod
    def from_config(
        cls, cfg: Config, accelerator, *, channels_last: bool = False, progress: bool = True
    ) -> KNNMonitor | None:
        """The monitor ``cfg.eval`` asks for (None when off); opens (and caches) both sets."""
        sets = eval_sets(cfg)
        if sets is None:
            return None
        e, d = cfg.eval, cfg.data
        size = e.image_size or d.view_size
        wanted = ((sets[0], e.max_train_images, "train"), (sets[1], e.max_test_images, "test"))
        for spec, _, default_split in wanted:  # a bad test spec fails before train is decoded
            split_spec(spec, default_split)
        opened = []
        for spec, limit, default_split in wanted:
            with accelerator.main_process_first():
                opened.append(
                    open_labeled(
                        spec,
                        size=size,
                        default_split=default_split,
                        cache="none" if d.cache == "none" else "disk",
                        cache_dir=d.cache_dir,
                        device=accelerator.device,
                        num_workers=d.num_workers,
                        max_images=limit,
                        progress=progress and accelerator.is_main_process,
                    )
                )
        every = e.every_epochs if e.every_epochs is not None else 1
        return cls(
            opened[0],
            opened[1],
            every_epochs=every,
            k=e.k,
            batch_size=e.batch_size,
            accelerator=accelerator,
            channels_last=channels_last,
        )

    def due(self, epoch: int) -> bool:
        """Whether to evaluate after ``epoch`` epochs have completed."""
        return self.every_epochs > 0 and epoch % self.every_epochs == 0

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.accelerator is None or self.accelerator.num_processes == 1:
            return t
        return self.accelerator.reduce(t, reduction="sum")

    def _features(self, backbone: nn.Module, labeled: LabeledSet):
        return extract_all(
            backbone,
            labeled,
            device=self.device,
            accelerator=self.accelerator,
            batch_size=self.batch_size,
            channels_last=self.channels_last,
            num_workers=0,
        )

    def run(self, backbone: nn.Module) -> dict[str, Any]:
        """Evaluate now; returns the metrics record (``knn_top1``, ``knn_top5``, ``k``,
        ``knn20_top1``, ``n_train``, ``n_test``, ``eval_s``)."""
        start = time.perf_counter()
        train_f, train_found = self._features(backbone, self.train_set)
        test_f, test_found = self._features(backbone, self.test_set)
        train_labels = self.train_set.labels.to(self.device)[train_found]
        train_f = train_f[train_found]
        test_labels = self.test_labels.to(self.device)
        rows = torch.nonzero(test_found).flatten()
        acc = self.accelerator
        if acc is not None and acc.num_processes > 1:  # each process classifies its share
            rows = rows.tensor_split(acc.num_processes)[acc.process_index]
        counts = torch.zeros((len(self.ks), 2), dtype=torch.long, device=self.device)
        if len(rows):
            scores = knn_scores(
                train_f,
                train_labels,
                test_f[rows],
                ks=self.ks,
                num_classes=len(self.train_set.classes),
            )
            for i, k in enumerate(self.ks):
                hits = topk_correct(scores[k], test_labels[rows], ks=(1, 5))
                counts[i, 0], counts[i, 1] = hits[1], hits[5]
        counts = self._sum(counts).cpu()
        n_test = max(int(test_found.sum()), 1)
        top = {
            k: (c[0].item() / n_test, c[1].item() / n_test)
            for k, c in zip(self.ks, counts, strict=True)
        }
        record = {
            "knn_top1": top[self.k][0],
            "knn_top5": top[self.k][1],
            "k": self.k,
            "n_train": int(train_found.sum()),
            "n_test": n_test,
            "eval_s": time.perf_counter() - start,
        }
        if self.k != 20:
            record["knn20_top1"] = top[20][0]
        return record


__all__ = ["KNNMonitor", "eval_sets"]
