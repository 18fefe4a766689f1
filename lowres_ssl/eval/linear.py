"""Linear probe: multinomial logistic regression on frozen features.

Features are standardised with the train set's per-dimension statistics, x̂ = (x − μ) / σ
(σ := 1 where the dimension is constant up to rounding), then a linear classifier
(W ∈ R^{C×d}, b ∈ R^C) minimises over the n train rows

    L(W, b) = (1/n)·Σ_i −log softmax(W x̂_i + b)_{y_i} + (λ/2)·‖W‖²_F        (b not decayed)

full-batch with L-BFGS (strong-Wolfe line search) in float32. For λ > 0 the minimiser is
unique (b up to a common shift, which softmax ignores), so the fit does not depend on where it
starts; the first starts from zero, and the only randomness in the whole probe is the
validation split, drawn from a local generator.

λ is chosen on a stratified held-out fraction of train (by held-out top-1, ties → the larger
λ), fitting the grid from the largest λ down, each fit warm-started from the previous one; the
classifier is then refit on all of train with the chosen λ and scored on the test set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from ..losses.mmd import exact_fp32
from .knn import _check_num_classes, _check_split, _check_widths, topk_correct

#: One λ per decade. For standardised features the data term's curvature is at most ~1/2 per
#: direction, so λ = 1e-1 is strong shrinkage; λ = 1e-6 is below 1/n for any train set up to
#: ~10⁶ rows, i.e. next to unregularised. Between them lies the best λ of the usual SSL probes.
WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)

#: A dimension whose train std is at most this fraction of its |mean| (about 8 float32 ulps,
#: exactly 0 included) is constant up to rounding: it is centred but not scaled, so its
#: rounding noise is not blown up to unit variance, nor the test values of a dead unit to inf.
CONSTANT_STD = 1e-6


@dataclass
class LinearProbeResult:
    """Test accuracy of the linear probe and how its weight decay was chosen.

    ``top1``/``top5`` are fractions of the test rows; ``val_top1`` maps each weight decay
    tried to its held-out top-1 (empty when a single weight decay was given).
    """

    top1: float
    top5: float
    weight_decay: float
    val_top1: dict[float, float]
    n_train: int
    n_test: int


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int | None = None,
    weight_decays: Sequence[float] = WEIGHT_DECAYS,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_iter: int = 100,
    device: torch.device | str | None = None,
) -> LinearProbeResult:
    """Train a linear classifier on frozen train features; its top-1/top-5 on the test set.

    Args:
        train_features: (n_train, d) floating point; train_labels: (n_train,) integers.
        test_features: (n_test, d); test_labels: (n_test,) integers.
        num_classes: C; default the largest label of train and test, plus one.
        weight_decays: the λ to choose from (each ≥ 0); with one, no validation split is made.
        val_fraction: share of each class held out to choose λ (see :func:`stratified_split`).
        seed: seeds the validation split (the global torch generator is not touched).
        max_iter: L-BFGS iterations per fit.
        device: where to fit; default the train features' device.

    Returns:
        A :class:`LinearProbeResult`.
    """
    n_train, n_test = _row_counts(train_features, train_labels, test_features, test_labels)
    weight_decays = tuple(float(wd) for wd in weight_decays)
    if not weight_decays or not all(math.isfinite(wd) and wd >= 0 for wd in weight_decays):
        raise UserError(f"weight_decays must be numbers ≥ 0 (at least one), got {weight_decays}")
    if max_iter < 1:
        raise UserError(f"max_iter must be ≥ 1, got {max_iter}")
    device = torch.device(device) if device is not None else train_features.device

    # A caller in inference mode or under autocast (an eval inside the training loop) still
    # gets a float32 fit with gradients; inputs made in inference mode (extracted features)
    # are copied out of it, since autograd cannot save them for backward.
    with torch.inference_mode(False), torch.enable_grad(), exact_fp32(device):
        train_labels, test_labels = (
            _trainable(y.to(device=device, dtype=torch.long)) for y in (train_labels, test_labels)
        )
        num_classes = _check_num_classes(num_classes, train_labels, test_labels)
        train_x, test_x = _standardise(
            _trainable(train_features.to(device=device, dtype=torch.float32)),
            _trainable(test_features.to(device=device, dtype=torch.float32)),
        )
        choice = _choose_weight_decay(
            train_x,
            train_labels,
            num_classes,
            weight_decays,
            val_fraction=val_fraction,
            seed=seed,
            max_iter=max_iter,
        )
        weight, bias = fit_logistic_regression(
            train_x,
            train_labels,
            num_classes,
            choice.weight_decay,
            max_iter=max_iter,
            init=choice.init,
        )
        correct = topk_correct(_logits(test_x, weight, bias), test_labels, ks=(1, 5))
    return LinearProbeResult(
        top1=correct[1] / n_test,
        top5=correct[5] / n_test,
        weight_decay=choice.weight_decay,
        val_top1=choice.val_top1,
        n_train=n_train,
        n_test=n_test,
    )


def _row_counts(
    train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor
) -> tuple[int, int]:
    """(n_train, n_test), after the checks of each split and of their widths; neither may be
    empty."""
    _check_split("train", train_features, train_labels)
    _check_split("test", test_features, test_labels)
    _check_widths(train_features, test_features)
    n_train, n_test = train_features.shape[0], test_features.shape[0]
    if n_train == 0 or n_test == 0:
        raise UserError(
            f"the linear probe needs train and test rows, got {n_train} and {n_test}; "
            "extract features for both splits"
        )
    return n_train, n_test


def _trainable(t: Tensor) -> Tensor:
    """``t``, or where it was made in inference mode a copy made outside it (call it outside
    inference mode): autograd cannot save an inference tensor for backward."""
    return t.clone() if t.is_inference() else t


def _standardise(train_x: Tensor, test_x: Tensor) -> tuple[Tensor, Tensor]:
    """Both sets as (x − μ) / σ with the train set's per-dimension statistics, σ := 1 where
    the dimension is constant up to rounding (see :data:`CONSTANT_STD`)."""
    std, mean = torch.std_mean(train_x, dim=0, correction=0)
    std = torch.where(std <= CONSTANT_STD * mean.abs(), torch.ones_like(std), std)
    return (train_x - mean) / std, (test_x - mean) / std


@dataclass
class _WeightDecayChoice:
    """The λ chosen on the held-out split, and what the final fit starts from."""

    weight_decay: float
    val_top1: dict[float, float]  # held-out top-1 of each λ tried; empty when only one was given
    init: tuple[Tensor, Tensor] | None  # the fit at that λ on the fit split; None: from zero


def _choose_weight_decay(
    train_x: Tensor,
    train_labels: Tensor,
    num_classes: int,
    weight_decays: tuple[float, ...],
    *,
    val_fraction: float,
    seed: int,
    max_iter: int,
) -> _WeightDecayChoice:
    """The λ with the best top-1 on a stratified held-out split of train (ties → the larger);
    the only λ, untried, when a single one is given."""
    if len(weight_decays) == 1:
        return _WeightDecayChoice(weight_decays[0], {}, None)
    fit_idx, val_idx = stratified_split(train_labels, val_fraction=val_fraction, seed=seed)
    if val_idx.numel() == 0:
        raise UserError(
            "no class has 2 or more train images, so no weight decay can be chosen; "
            "pass a single value in weight_decays"
        )
    fit_idx, val_idx = fit_idx.to(train_x.device), val_idx.to(train_x.device)
    fit_x, fit_y = train_x[fit_idx], train_labels[fit_idx]
    val_x, val_y = train_x[val_idx], train_labels[val_idx]
    fitted = {}
    val_top1: dict[float, float] = {}
    params = None
    for wd in sorted(set(weight_decays), reverse=True):
        params = fit_logistic_regression(
            fit_x, fit_y, num_classes, wd, max_iter=max_iter, init=params
        )
        fitted[wd] = params
        hits = topk_correct(_logits(val_x, *params), val_y, ks=(1,))[1]
        val_top1[wd] = hits / len(val_y)
    # max keeps the first of equal values, and the λ are visited largest first.
    chosen = max(sorted(val_top1, reverse=True), key=lambda wd: val_top1[wd])
    return _WeightDecayChoice(chosen, val_top1, fitted[chosen])


def fit_logistic_regression(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    weight_decay: float,
    *,
    max_iter: int = 100,
    init: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Minimise mean cross-entropy + (λ/2)·‖W‖² over (W, b) with full-batch L-BFGS.

    Args:
        features: (n, d) float32, already standardised.
        labels: (n,) integer class indices in [0, num_classes), on the features' device.
        num_classes: C.
        weight_decay: λ ≥ 0 (the bias is not decayed).
        max_iter: L-BFGS iterations.
        init: (W (C, d), b (C,)) to start from; default zeros.

    Returns:
        (W (C, d), b (C,)), detached, on the features' device.
    """
    dim = features.shape[1]
    if init is None:
        weight = torch.zeros(num_classes, dim, dtype=features.dtype, device=features.device)
        bias = torch.zeros(num_classes, dtype=features.dtype, device=features.device)
    else:
        weight, bias = (p.detach().clone() for p in init)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad(set_to_none=False)
        loss = F.cross_entropy(_logits(features, weight, bias), labels)
        loss = loss + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def stratified_split(
    labels: Tensor, *, val_fraction: float = 0.1, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Split row indices into (fit, val), holding out ``val_fraction`` of each class.

    A class of m ≥ 2 rows puts round(val_fraction · m), at least 1 and at most m − 1, into
    val; a class with a single row stays in fit. Within a class the rows held out are drawn
    with a local generator seeded by ``seed``.

    Args:
        labels: (n,) integer class indices ≥ 0.
        val_fraction: in (0, 1).
        seed: the split's seed; the same seed and labels give the same split.

    Returns:
        (fit indices, val indices), 1-D int64 on the CPU, each sorted, disjoint, covering 0..n−1.
    """
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = labels.detach().to("cpu", torch.long)
    n = labels.shape[0]
    num_classes = _check_num_classes(None, labels)
    generator = torch.Generator().manual_seed(seed)
    # A random order, then a stable sort by class: each class's rows in random order.
    shuffled = torch.randperm(n, generator=generator)
    by_class = shuffled[torch.sort(labels[shuffled], stable=True).indices]
    sorted_labels = labels[by_class]
    counts = torch.bincount(labels, minlength=num_classes)
    n_val = (counts.double() * val_fraction).round().long().clamp(min=1)
    n_val = torch.minimum(n_val, counts - 1).clamp(min=0)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(n) - starts[sorted_labels]
    held_out = rank < n_val[sorted_labels]
    return by_class[~held_out].sort().values, by_class[held_out].sort().values


def _logits(features: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """(n, d) standardised features → (n, C) logits."""
    return torch.addmm(bias, features, weight.T)
