"""Linear probe: the L-BFGS fit against an independent float64 Newton solve written here, the
probe's accuracy where the answer is known (separable clusters; labels independent of the
features), the stratified split, reproducibility and the input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowres_ssl.errors import UserError
from lowres_ssl.eval.linear import (
    WEIGHT_DECAYS,
    fit_logistic_regression,
    linear_probe,
    stratified_split,
)

# ------------------------------------------------------------------ reference


def newton_logistic_regression(
    x: np.ndarray, y: np.ndarray, c: int, wd: float, steps: int = 30
) -> tuple[np.ndarray, np.ndarray]:
    """argmin (1/n)·Σ −log softmax(W x_i + b)_{y_i} + (wd/2)·‖W‖², by Newton in float64.

    Θ = [W, b] acts on x̃ = [x, 1]. The loss is flat along b → b + t·1 (softmax ignores a
    common shift) and b is not decayed, so the Hessian is singular there: the minimum-norm
    Newton step never moves along that line, and b stays at mean 0 from b = 0.
    """
    n, d = x.shape
    xt = np.hstack([x, np.ones((n, 1))])
    onehot = np.eye(c)[y]
    decay = np.tile(np.r_[np.full(d, wd), 0.0], c)
    theta = np.zeros(c * (d + 1))
    for _ in range(steps):
        logits = xt @ theta.reshape(c, d + 1).T
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        grad = ((p - onehot).T @ xt / n).ravel() + decay * theta
        curvature = np.einsum("ic,cd->icd", p, np.eye(c)) - np.einsum("ic,id->icd", p, p)
        hessian = np.einsum("icd,ij,ik->cjdk", curvature, xt, xt).reshape(theta.size, -1) / n
        hessian += np.diag(decay)
        theta -= np.linalg.lstsq(hessian, grad, rcond=None)[0]
    theta = theta.reshape(c, d + 1)
    return theta[:, :d], theta[:, d]


def clusters(seed: int, n: int, c: int = 10, dim: int = 64, spread: float = 10.0):
    """n rows around c random centres (spread × N(0, I) apart), unit noise; balanced labels."""
    g = torch.Generator().manual_seed(seed)
    centres = spread * torch.randn(c, dim, generator=g)
    labels = torch.arange(n) % c
    return centres[labels] + torch.randn(n, dim, generator=g), labels


# ------------------------------------------------------------------ the fit


def test_fit_matches_newton_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5))
    y = (x[:, 0] + 0.5 * rng.standard_normal(200) > 0).astype(int) + (x[:, 1] > 0.5)
    for wd in (1e-1, 1e-2):
        want_w, want_b = newton_logistic_regression(x, y, 3, wd)
        w, b = fit_logistic_regression(
            torch.from_numpy(x).float(), torch.from_numpy(y), 3, wd, max_iter=200
        )
        # float32 loss values resolve changes of ~1e-7, so the line search stops once a step
        # gains less: at a gradient of ~1e-5, W within ~1e-4·max|W| of the optimum (measured).
        scale = 1e-3 * np.abs(want_w).max()
        np.testing.assert_allclose(w.double().numpy(), want_w, rtol=0, atol=scale)
        b = b.double().numpy()
        np.testing.assert_allclose(b - b.mean(), want_b - want_b.mean(), rtol=0, atol=scale)


def test_warm_start_reaches_the_same_minimum():
    x, y = clusters(1, 300, c=4, dim=8, spread=1.0)
    x = (x - x.mean(0)) / x.std(0)
    cold = fit_logistic_regression(x, y, 4, 1e-2)
    warm = fit_logistic_regression(x, y, 4, 1e-2, init=fit_logistic_regression(x, y, 4, 1.0))
    # Both stop where float32 loss values stop resolving progress (see the Newton test).
    for a, b in zip(cold, warm, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3 * float(cold[0].abs().max()))


# ------------------------------------------------------------------ the probe


def test_separable_clusters_are_classified_and_ties_pick_the_largest_decay():
    x, y = clusters(2, 1500)
    result = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:])
    assert result.top1 >= 0.99
    assert result.top5 >= result.top1
    assert (result.n_train, result.n_test) == (1000, 500)
    # Clusters ~140 apart with unit noise: every decay is perfect on held-out data, a tie.
    assert result.val_top1 == dict.fromkeys(WEIGHT_DECAYS, 1.0)
    assert result.weight_decay == max(WEIGHT_DECAYS)


def test_labels_independent_of_features_give_chance_accuracy():
    c, n_test = 10, 2000
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2000 + n_test, 64, generator=g)
    y = torch.randint(0, c, (2000 + n_test,), generator=g)
    result = linear_probe(x[:2000], y[:2000], x[2000:], y[2000:], num_classes=c)
    # Test labels are uniform and independent of everything the classifier saw, so the
    # number correct is exactly Binomial(n_test, 1/c): 4 standard deviations ≈ 0.027.
    sd = math.sqrt((1 / c) * (1 - 1 / c) / n_test)
    assert abs(result.top1 - 1 / c) < 4 * sd
    assert abs(result.top5 - 5 / c) < 4 * math.sqrt(0.25 / n_test)
    assert set(result.val_top1) == set(WEIGHT_DECAYS)


def test_probe_is_invariant_to_per_dimension_scale_and_shift():
    x, y = clusters(4, 900, c=5, dim=16, spread=0.5)
    g = torch.Generator().manual_seed(5)
    scale = 10 ** (4 * torch.rand(16, generator=g) - 2)
    shift = 10 * torch.randn(16, generator=g)
    # A constant dimension (std 0) must not make NaN or inf.
    constant = torch.full((900, 1), 7.0)
    plain = linear_probe(x[:600], y[:600], x[600:], y[600:])
    moved = torch.cat([x * scale + shift, constant], dim=1)
    changed = linear_probe(moved[:600], y[:600], moved[600:], y[600:])
    assert 0.5 < plain.top1 < 1
    # Standardisation undoes the affine map up to float32 rounding: at most a row or two flips.
    assert abs(changed.top1 - plain.top1) <= 2 / 300
    assert changed.weight_decay == plain.weight_decay


def test_same_seed_same_result_and_global_rng_untouched():
    x, y = clusters(6, 700, c=5, dim=16, spread=0.3)
    state = torch.get_rng_state()
    first = linear_probe(x[:500], y[:500], x[500:], y[500:], seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert linear_probe(x[:500], y[:500], x[500:], y[500:], seed=7) == first


def test_runs_inside_inference_mode():
    x, y = clusters(8, 300, c=3, dim=8)
    with torch.inference_mode():
        result = linear_probe(x[:200], y[:200], x[200:], y[200:], weight_decays=(1e-3,))
    assert result.top1 >= 0.99
    assert result.val_top1 == {}
    assert result.weight_decay == 1e-3


def test_features_and_labels_made_in_inference_mode_are_probed():
    """Features and labels made under ``torch.inference_mode()`` (as an extraction makes
    them), on the device of the fit: autograd cannot save such tensors for backward."""
    with torch.inference_mode():
        x, y = clusters(9, 300, c=3, dim=8)
    assert x.is_inference() and y.is_inference()
    for decays in ((1e-3,), WEIGHT_DECAYS):
        result = linear_probe(x[:200], y[:200], x[200:], y[200:], weight_decays=decays)
        assert result.top1 >= 0.99
        with torch.inference_mode():
            inside = linear_probe(x[:200], y[:200], x[200:], y[200:], weight_decays=decays)
        assert inside == result


# ------------------------------------------------------------------ the split


def test_stratified_split_holds_out_each_class():
    counts = [1, 2, 3, 10, 25, 100]
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    fit, val = stratified_split(labels, val_fraction=0.2, seed=1)
    assert torch.equal(torch.cat([fit, val]).sort().values, torch.arange(len(labels)))
    held_out = torch.bincount(labels[val], minlength=len(counts)).tolist()
    # round(0.2 m), at least 1 and at most m − 1; the single image stays in fit.
    assert held_out == [0, 1, 1, 2, 5, 20]
    assert set(labels[fit].tolist()) == set(range(len(counts)))
    again = stratified_split(labels, val_fraction=0.2, seed=1)
    assert torch.equal(again[0], fit) and torch.equal(again[1], val)
    other = stratified_split(labels, val_fraction=0.2, seed=2)
    assert not torch.equal(other[1], val)


# ------------------------------------------------------------------ input checks


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"test_features": torch.randn(4, 5)}, "dims"),
        ({"train_labels": torch.zeros(9, dtype=torch.long)}, "entries for 10 rows"),
        ({"test_labels": torch.zeros(5, dtype=torch.long)}, "entries for 4 rows"),
        ({"test_features": torch.randn(4)}, "2-D"),
        ({"test_features": torch.randn(0, 6), "test_labels": torch.zeros(0, dtype=int)}, "needs"),
        ({"weight_decays": (1e-3, -1.0)}, "weight_decays"),
        ({"weight_decays": ()}, "weight_decays"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"train_labels": torch.arange(10)}, "no class has 2"),
        ({"num_classes": 2}, "out of range"),
    ],
)
def test_bad_input_is_a_user_error(change, message):
    args = {
        "train_features": torch.randn(10, 6),
        "train_labels": torch.arange(10) % 3,
        "test_features": torch.randn(4, 6),
        "test_labels": torch.arange(4) % 3,
    }
    args.update(change)
    with pytest.raises(UserError, match=message):
        linear_probe(**args)
