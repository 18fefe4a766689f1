"""Weighted k-nearest-neighbour classifier on frozen features (Wu et al., CVPR 2018).

The protocol Lightly and solo-learn report as "kNN accuracy". Train rows x_j with labels y_j,
a test row x; both are ℓ2-normalised, so the cosine similarity is a dot product:

    s_j = ⟨x/‖x‖, x_j/‖x_j‖⟩ ∈ [−1, 1].

With N_k(x) the k train rows of largest s_j (k capped at the number of train rows), each
neighbour votes for its class with weight exp(s_j / T), and the score of class c is

    score_c(x) = Σ_{j ∈ N_k(x), y_j = c} exp(s_j / T).

The prediction is argmax_c score_c(x); top-5 accuracy asks whether y is among the five best.

The search is exact (no approximate index): test rows go in chunks small enough that the
chunk × n_train similarity block stays under ``max_chunk_bytes``, one top-k with the largest k
per chunk serves every k asked for (top-k values come sorted, so smaller k are prefixes).
Arithmetic is in float64 for float64 features and in float32 otherwise: in float16 exp(1/T)
already overflows at T = 0.07, and in bfloat16 similarities are too coarse to rank neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..device import same_device
from ..errors import UserError
from ..losses.mmd import exact_fp32


@dataclass
class KNNResult:
    """Accuracy of the weighted kNN classifier for one k.

    ``k`` is the number of neighbours that voted: the k asked for, capped at ``n_train``.
    ``top1`` and ``top5`` are fractions of the test rows (top-5 is 1.0 with ≤ 5 classes).
    """

    k: int
    top1: float
    top5: float
    n_train: int
    n_test: int


def knn_scores(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    *,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    max_chunk_bytes: int = 256 * 2**20,
    leave_one_out: bool = False,
) -> dict[int, Tensor]:
    """Class scores of the weighted kNN classifier, for each k in ``ks``.

    Args:
        train_features: (n_train, d) floating point; need not be normalised.
        train_labels: (n_train,) integer class indices in [0, num_classes).
        test_features: (n_test, d), same width as ``train_features``.
        ks: numbers of neighbours (each ≥ 1; a k above n_train uses all train rows).
        temperature: T in the vote weight exp(s / T).
        num_classes: C; default max(train_labels) + 1.
        max_chunk_bytes: bound on the chunk × n_train similarity block.
        leave_one_out: the test rows are the train rows (one labeled set, no split): each
            row is classified by the others, never by itself (k capped at n_train − 1).

    Returns:
        {k: (n_test, C) scores} on the features' device, float64 for float64 features and
        float32 otherwise; score[i, c] = Σ exp(s / T) over the neighbours of test row i in
        class c (0 for a class with no neighbour).

    >>> train = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> scores = knn_scores(train, torch.tensor([0, 1]), torch.tensor([[2.0, 0.1]]), ks=(1,))
    >>> scores[1].argmax(dim=1).tolist()
    [0]
    """
    _check_split("train", train_features, train_labels)
    if train_features.shape[0] == 0:
        raise UserError("the kNN train set is empty; pass at least one train feature row")
    _check_features("test", test_features)
    _check_widths(train_features, test_features)
    if not same_device(train_features.device, test_features.device):
        raise UserError(
            f"train features are on {train_features.device} and test features on "
            f"{test_features.device}; move both to one device"
        )
    ks = _check_ks(ks)
    if leave_one_out and test_features is not train_features:
        raise UserError("leave_one_out classifies the train rows: pass them as the test rows")
    if leave_one_out and train_features.shape[0] < 2:
        raise UserError("leave-one-out kNN needs at least two rows")
    if not (math.isfinite(temperature) and temperature > 0):
        raise UserError(f"temperature must be a positive number, got {temperature}")
    if max_chunk_bytes < 1:
        raise UserError(f"max_chunk_bytes must be positive, got {max_chunk_bytes}")
    device = train_features.device
    train_labels = train_labels.to(device=device, dtype=torch.long)
    num_classes = _check_num_classes(num_classes, train_labels)

    dtype = torch.promote_types(train_features.dtype, test_features.dtype)
    dtype = torch.float64 if dtype == torch.float64 else torch.float32
    n_train, n_test = train_features.shape[0], test_features.shape[0]
    candidates = n_train - 1 if leave_one_out else n_train
    k_max = min(max(ks), candidates)
    # Scores are the sums the protocol defines, so they must not overflow: k·exp(1/T) < max.
    max_exponent = math.log(torch.finfo(dtype).max) - math.log(k_max) - 1.0
    if 1.0 / temperature > max_exponent:
        raise UserError(
            f"temperature={temperature} overflows exp(1/T) in {dtype}; use temperature ≥ "
            f"{1.0 / max_exponent:.3g} or float64 features"
        )

    scores = {k: torch.zeros(n_test, num_classes, dtype=dtype, device=device) for k in ks}
    chunk = max(1, max_chunk_bytes // (n_train * torch.finfo(dtype).bits // 8))
    with exact_fp32(device):
        train_unit = F.normalize(train_features.to(dtype), dim=1)
        for start in range(0, n_test, chunk):
            rows = slice(start, start + chunk)
            test_unit = F.normalize(test_features[rows].to(dtype), dim=1)
            block = test_unit @ train_unit.T
            if leave_one_out:  # a row is not its own neighbour
                own = torch.arange(start, start + block.shape[0], device=device)
                block[own - start, own] = -math.inf
            similarity, neighbour = block.topk(k_max, dim=1)
            weight = torch.exp(similarity / temperature)
            votes = train_labels[neighbour]
            for k in ks:
                used = min(k, candidates)
                scores[k][rows].scatter_add_(1, votes[:, :used], weight[:, :used])
    return scores


def knn_evaluate(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    max_chunk_bytes: int = 256 * 2**20,
    leave_one_out: bool = False,
) -> dict[int, KNNResult]:
    """Top-1 and top-5 accuracy of the weighted kNN classifier, for each k in ``ks``.

    Args:
        train_features: (n_train, d); train_labels: (n_train,) integers.
        test_features: (n_test, d); test_labels: (n_test,) integers; n_test ≥ 1.
        ks, temperature, max_chunk_bytes, leave_one_out: as in :func:`knn_scores`.
        num_classes: C; default the largest label of train and test, plus one.

    Returns:
        {k: KNNResult} for each k asked for (keyed by that k, even when capped at n_train).
    """
    _check_split("test", test_features, test_labels)
    if test_features.shape[0] == 0:
        raise UserError("the kNN test set is empty; pass at least one test feature row")
    test_labels = test_labels.to(device=test_features.device, dtype=torch.long)
    if num_classes is None:
        num_classes = _check_num_classes(None, train_labels, test_labels)
    else:
        _check_num_classes(num_classes, test_labels)
    scores = knn_scores(
        train_features,
        train_labels,
        test_features,
        ks=ks,
        temperature=temperature,
        num_classes=num_classes,
        max_chunk_bytes=max_chunk_bytes,
        leave_one_out=leave_one_out,
    )
    n_train, n_test = train_features.shape[0], test_features.shape[0]
    results = {}
    for k, score in scores.items():
        correct = topk_correct(score, test_labels, ks=(1, 5))
        results[k] = KNNResult(
            k=min(k, n_train - 1 if leave_one_out else n_train),
            top1=correct[1] / n_test,
            top5=correct[5] / n_test,
            n_train=n_train,
            n_test=n_test,
        )
    return results


def topk_correct(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """How many rows have their label among the k best-scored classes, for each k in ``ks``.

    A row counts at k when fewer than k other classes score at least as high as its label
    (k capped at C). Ties thus count against the label, which keeps the count independent of
    how a top-k routine orders equal scores: a label that got no kNN vote (score 0, tied with
    the other unvoted classes) is a miss unless there are at most k classes.

    Args:
        scores: (n, C) class scores or logits.
        labels: (n,) integer class indices in [0, C).
        ks: the k to count at (each ≥ 1).

    Returns:
        {k: number of rows correct at k}.
    """
    if scores.ndim != 2:
        raise UserError(f"scores must be 2-D (rows, classes), got shape {tuple(scores.shape)}")
    _check_labels("", labels, scores.shape[0])
    ks = _check_ks(ks)
    labels = labels.to(device=scores.device, dtype=torch.long)
    _check_num_classes(scores.shape[1], labels)
    label_score = scores.gather(1, labels[:, None])
    # The label's own class is among those ≥ its score, hence the − 1.
    rank = (scores >= label_score).sum(dim=1) - 1
    return {k: int((rank < min(k, scores.shape[1])).sum()) for k in ks}


def _check_features(name: str, features: Tensor) -> None:
    if features.ndim != 2:
        raise UserError(
            f"{name} features must be 2-D (rows, dims), got shape {tuple(features.shape)}"
        )
    if not features.is_floating_point():
        raise UserError(f"{name} features must be floating point, got {features.dtype}")
    if not bool(torch.isfinite(features).all()):
        raise UserError(f"{name} features contain NaN or inf; check the model that made them")


def _check_labels(name: str, labels: Tensor, n_rows: int) -> None:
    prefix = f"{name} " if name else ""
    if labels.ndim != 1:
        raise UserError(f"{prefix}labels must be 1-D, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise UserError(f"{prefix}labels must be integer class indices, got {labels.dtype}")
    if labels.shape[0] != n_rows:
        raise UserError(
            f"{prefix}labels have {labels.shape[0]} entries for {n_rows} rows; pass one per row"
        )


def _check_split(name: str, features: Tensor, labels: Tensor) -> None:
    """Features (n, d), floating and finite, with (n,) integer labels: else a UserError."""
    _check_features(name, features)
    _check_labels(name, labels, features.shape[0])


def _check_widths(train_features: Tensor, test_features: Tensor) -> None:
    if train_features.shape[1] != test_features.shape[1]:
        raise UserError(
            f"train features have {train_features.shape[1]} dims and test features "
            f"{test_features.shape[1]}; extract both with the same model"
        )


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise UserError(f"ks must be positive integers, got {ks}")
    return ks


def _check_num_classes(num_classes: int | None, *labels: Tensor) -> int:
    """``num_classes``, or max label + 1 when None, after checking every label is in range."""
    present = [int(t.min()) for t in labels if t.numel()]
    if present and min(present) < 0:
        raise UserError(f"labels must be ≥ 0, got {min(present)}")
    largest = max((int(t.max()) for t in labels if t.numel()), default=-1)
    if num_classes is None:
        return max(largest + 1, 1)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    if largest >= num_classes:
        raise UserError(
            f"label {largest} is out of range for num_classes={num_classes}; "
            f"pass num_classes ≥ {largest + 1}"
        )
    return num_classes
