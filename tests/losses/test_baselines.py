"""The baseline objectives (VICReg, Barlow Twins, alignment + uniformity, SimCLR) against naive
float64 references, their invariances, known values, dtypes, errors, and the distributed
convention of :mod:`lowres_ssl.losses.distributed`."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from lowres_ssl.losses import (
    OBJECTIVES,
    BarlowTwinsLoss,
    SimCLRLoss,
    UniformityLoss,
    VICRegLoss,
)
from tests.distributed_harness import run_distributed

F64 = torch.float64

# ---------------------------------------------------------------------------------------------
# Naive references: explicit loops over samples and dimensions, float64, differentiable.
# Each returns (loss, terms) with the same term names as the module.
# ---------------------------------------------------------------------------------------------


def vicreg_reference(z1, z2, inv_coeff=25.0, var_coeff=25.0, cov_coeff=1.0, eps=1e-4):
    n, q = z1.shape
    invariance = sum((z1[i, j] - z2[i, j]) ** 2 for i in range(n) for j in range(q)) / (n * q)

    def variance_covariance(z):
        mean = sum(z[k] for k in range(n)) / n
        cov = sum(torch.outer(z[k] - mean, z[k] - mean) for k in range(n)) / (n - 1)
        v = sum(torch.relu(1 - torch.sqrt(cov[j, j] + eps)) for j in range(q)) / q
        c = sum(cov[i, j] ** 2 for i in range(q) for j in range(q) if i != j) / q
        return v, c

    (v1, c1), (v2, c2) = variance_covariance(z1), variance_covariance(z2)
    terms = {"invariance": invariance, "variance": (v1 + v2) / 2, "covariance": c1 + c2}
    loss = (
        inv_coeff * terms["invariance"]
        + var_coeff * terms["variance"]
        + cov_coeff * terms["covariance"]
    )
    return loss, terms


def barlow_twins_reference(z1, z2, lambda_offdiag=0.0051, eps=1e-5):
    n, q = z1.shape

    def standardise(z):
        columns = []
        for j in range(q):
            mean = sum(z[k, j] for k in range(n)) / n
            var = sum((z[k, j] - mean) ** 2 for k in range(n)) / n  # biased, as BatchNorm
            columns.append(
                torch.stack([(z[k, j] - mean) / torch.sqrt(var + eps) for k in range(n)])
            )
        return columns  # columns[j][k]

    a, b = standardise(z1), standardise(z2)
    c = [[sum(a[i][k] * b[j][k] for k in range(n)) / n for j in range(q)] for i in range(q)]
    on = sum((1 - c[i][i]) ** 2 for i in range(q))
    off = sum(c[i][j] ** 2 for i in range(q) for j in range(q) if i != j)
    return on + lambda_offdiag * off, {"on_diagonal": on, "off_diagonal": off}


def _unit(z):
    return torch.stack([row / torch.sqrt((row * row).sum()) for row in z])


def uniformity_reference(z1, z2, align_weight=1.0, unif_weight=1.0, alpha=2.0, t=2.0):
    u1, u2 = _unit(z1), _unit(z2)
    n = len(u1)
    alignment = sum(torch.sqrt(((u1[i] - u2[i]) ** 2).sum()) ** alpha for i in range(n)) / n

    def uniform(u):
        pairs = [
            torch.exp(-t * ((u[i] - u[j]) ** 2).sum()) for i in range(n) for j in range(n) if i != j
        ]
        return torch.log(sum(pairs) / len(pairs))

    uniformity = (uniform(u1) + uniform(u2)) / 2
    loss = align_weight * alignment + unif_weight * uniformity
    return loss, {"alignment": alignment, "uniformity": uniformity}


def simclr_reference(z1, z2, temperature=0.2):
    n = len(z1)
    e = [*z1, *z2]  # raw rows; cosine similarity computed pairwise below

    def cosine(x, y):
        return (x * y).sum() / torch.sqrt((x * x).sum() * (y * y).sum())

    losses = []
    for a in range(2 * n):
        positive = (a + n) % (2 * n)
        others = [b for b in range(2 * n) if b != a]
        logits = torch.stack([cosine(e[a], e[b]) / temperature for b in others])
        softmax = torch.softmax(logits, dim=0)  # this anchor's softmax alone
        losses.append(-torch.log(softmax[others.index(positive)]))
    loss = sum(losses) / (2 * n)
    positive_similarity = sum(cosine(z1[i], z2[i]) for i in range(n)) / n
    return loss, {"nt_xent": loss, "positive_similarity": positive_similarity}


# Parameter sets: the paper defaults and one non-default set (to check every argument is used).
CASES: dict[str, tuple[Callable[..., nn.Module], Callable, dict]] = {
    "vicreg": (VICRegLoss, vicreg_reference, {}),
    "vicreg-custom": (
        VICRegLoss,
        vicreg_reference,
        {"inv_coeff": 3.0, "var_coeff": 5.0, "cov_coeff": 2.0, "eps": 1e-2},
    ),
    "barlow_twins": (BarlowTwinsLoss, barlow_twins_reference, {}),
    "barlow_twins-custom": (
        BarlowTwinsLoss,
        barlow_twins_reference,
        {"lambda_offdiag": 0.3, "eps": 1e-2},
    ),
    "uniformity": (UniformityLoss, uniformity_reference, {}),
    "uniformity-custom": (
        UniformityLoss,
        uniformity_reference,
        {"align_weight": 0.7, "unif_weight": 1.9, "alpha": 1.5, "t": 3.0},
    ),
    "simclr": (SimCLRLoss, simclr_reference, {}),
    "simclr-custom": (SimCLRLoss, simclr_reference, {"temperature": 0.7}),
}
DEFAULTS = ["vicreg", "barlow_twins", "uniformity", "simclr"]


def make_loss(case: str) -> nn.Module:
    cls, _, kwargs = CASES[case]
    return cls(**kwargs)


def views(n: int = 6, q: int = 4, seed: int = 0, dtype=F64) -> tuple[Tensor, Tensor]:
    """Two correlated views. Columns have different scales, so VICReg's hinge max(0, 1 − S_j)
    is active on some dimensions (std < 1) and inactive on others (std > 1)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.3, 2.5, q, dtype=F64)
    base = torch.randn(n, q, generator=g, dtype=F64)
    z1 = (base + 0.5 * torch.randn(n, q, generator=g, dtype=F64)) * scale
    z2 = (base + 0.5 * torch.randn(n, q, generator=g, dtype=F64)) * scale
    return z1.to(dtype), z2.to(dtype)


def orthogonal_centred_columns(n: int, q: int, seed: int = 0) -> Tensor:
    """n × q, columns centred and orthonormal (so any standardisation is exact up to scale)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, q, generator=g, dtype=F64)
    x = x - x.mean(dim=0)
    basis, _ = torch.linalg.qr(torch.cat([torch.ones(n, 1, dtype=F64), x], dim=1))
    return basis[:, 1:]  # orthogonal to the constant vector, hence centred


# ---------------------------------------------------------------------------------------------
# Against the references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_matches_naive_reference(case):
    _, reference, kwargs = CASES[case]
    loss_fn = make_loss(case)
    z1, z2 = (z.requires_grad_() for z in views())
    loss = loss_fn(z1, z2)
    grads = torch.autograd.grad(loss, (z1, z2))
    expected, expected_terms = reference(z1, z2, **kwargs)
    expected_grads = torch.autograd.grad(expected, (z1, z2))
    # float64, the same mathematical function evaluated in a different order: agreement to
    # ~1e-14 relative is expected, 1e-10 leaves a wide margin and still catches any formula slip.
    assert loss.dtype == F64
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-10, atol=0)
    assert set(loss_fn.terms) == set(expected_terms)
    for name, value in loss_fn.terms.items():
        assert not value.requires_grad
        torch.testing.assert_close(value, expected_terms[name].detach(), rtol=1e-10, atol=1e-14)
    # Gradients (entries O(1e-2..1)): 1e-8 relative, atol for entries that are nearly 0.
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck(case):
    loss_fn = make_loss(case)
    z1, z2 = (z.requires_grad_() for z in views(n=5, q=3, seed=1))
    assert torch.autograd.gradcheck(loss_fn, (z1, z2))


# ---------------------------------------------------------------------------------------------
# Invariances
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_symmetric_in_the_views(case):
    loss_fn = make_loss(case)
    z1, z2 = views(n=10, q=5, seed=2)
    # Swapping the views transposes Barlow Twins' C and permutes the other sums: equal up to
    # float64 rounding of the reordered sums.
    torch.testing.assert_close(loss_fn(z1, z2), loss_fn(z2, z1), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", list(CASES))
def test_invariant_to_permuting_the_batch(case):
    loss_fn = make_loss(case)
    z1, z2 = views(n=10, q=5, seed=3)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(perm, torch.arange(10))
    torch.testing.assert_close(loss_fn(z1, z2), loss_fn(z1[perm], z2[perm]), rtol=1e-12, atol=0)


def test_permuting_one_view_only_changes_the_loss():
    """Guards the previous test: the pairing matters, so a permutation is not a no-op."""
    z1, z2 = views(n=10, q=5, seed=3)
    perm = torch.roll(torch.arange(10), 1)
    for case in DEFAULTS:
        loss_fn = make_loss(case)
        assert not torch.isclose(loss_fn(z1, z2), loss_fn(z1, z2[perm]), rtol=1e-6), case


@pytest.mark.parametrize("case", ["uniformity", "uniformity-custom", "simclr", "simclr-custom"])
def test_invariant_to_scaling_the_rows(case):
    loss_fn = make_loss(case)
    z1, z2 = views(n=8, q=4, seed=4)
    g = torch.Generator().manual_seed(1)
    s1 = torch.rand(8, 1, generator=g, dtype=F64) * 10 + 0.1
    s2 = torch.rand(8, 1, generator=g, dtype=F64) * 10 + 0.1
    # Normalising z·s and z differ by rounding only (1e-16 relative).
    torch.testing.assert_close(loss_fn(z1, z2), loss_fn(z1 * s1, z2 * s2), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", ["vicreg", "barlow_twins"])
def test_raw_losses_depend_on_the_scale(case):
    """VICReg and Barlow Twins see the raw embeddings; VICReg depends on a global scale and
    Barlow Twins (which standardises each dimension) only through ε: use a tiny scale."""
    loss_fn = make_loss(case)
    z1, z2 = views(n=8, q=4, seed=4)
    assert not torch.isclose(loss_fn(z1, z2), loss_fn(z1 * 1e-3, z2 * 1e-3), rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# Known values
# ---------------------------------------------------------------------------------------------


def test_vicreg_known_values():
    n, q, eps = 16, 4, 1e-4
    base = orthogonal_centred_columns(n, q) * math.sqrt(n - 1)  # unbiased covariance = I
    loss_fn = VICRegLoss(eps=eps)
    loss = loss_fn(base, base.clone())
    assert loss_fn.terms["invariance"] == 0  # z¹ = z²: exactly 0
    # Std √(1 + ε) > 1: no variance penalty; covariance = I up to QR rounding (~1e-16)², and
    # the loss is then 1 · c (about 1e-31).
    assert loss_fn.terms["variance"] == 0
    assert loss < 1e-24
    # Half the scale: std √(1/4 + ε) < 1 on every dimension, still uncorrelated.
    half = base / 2
    loss = loss_fn(half, half.clone())
    torch.testing.assert_close(loss, 25 * (1 - torch.tensor(0.25 + eps, dtype=F64).sqrt()))
    # Duplicating a dimension: the (0, 1) and (1, 0) covariances are both 1, c = 2/q per view.
    dup = base.clone()
    dup[:, 1] = dup[:, 0]
    loss_fn(dup, dup.clone())
    torch.testing.assert_close(loss_fn.terms["covariance"], torch.tensor(2 * 2 / q, dtype=F64))


def test_barlow_twins_known_values():
    n, q, eps = 16, 5, 1e-5
    z = orthogonal_centred_columns(n, q) * math.sqrt(n)  # biased variance 1, uncorrelated
    loss_fn = BarlowTwinsLoss(eps=eps)
    loss_fn(z, z.clone())
    # C = I/(1 + ε): the on-diagonal term is q·(ε/(1 + ε))² ≈ 5e-10, not exactly 0.
    on = q * (eps / (1 + eps)) ** 2
    torch.testing.assert_close(loss_fn.terms["on_diagonal"], torch.tensor(on, dtype=F64))
    assert loss_fn.terms["off_diagonal"] < 1e-28
    # Opposite views: C = −I/(1 + ε), on-diagonal q·(1 + 1/(1 + ε))² ≈ 4q.
    loss_fn(z, -z)
    expected = torch.tensor(q * (1 + 1 / (1 + eps)) ** 2, dtype=F64)
    torch.testing.assert_close(loss_fn.terms["on_diagonal"], expected)
    # Off-diagonal only: the second view's columns are the first's, rotated.
    loss_fn = BarlowTwinsLoss(lambda_offdiag=0.5, eps=eps)
    loss = loss_fn(z, z[:, torch.roll(torch.arange(q), 1)])
    # C is a permutation matrix with no fixed point, / (1 + ε): on = q, off = q/(1 + ε)².
    torch.testing.assert_close(loss, torch.tensor(q + 0.5 * q / (1 + eps) ** 2, dtype=F64))


def test_uniformity_known_values():
    t = 2.0
    loss_fn = UniformityLoss(t=t)
    antipodal = torch.tensor([[3.0, 0.0], [-0.5, 0.0]], dtype=F64)
    loss = loss_fn(antipodal, antipodal.clone())
    # ẑ = ±e₁: the alignment is 0 and the only pair is at squared distance 4.
    assert loss_fn.terms["alignment"] == 0
    torch.testing.assert_close(loss, torch.tensor(-4 * t, dtype=F64), rtol=1e-14, atol=0)
    # Orthogonal views: ‖ẑ¹ − ẑ²‖ = √2, alignment 2^(α/2).
    for alpha in (2.0, 1.0, 3.0):
        loss_fn = UniformityLoss(alpha=alpha)
        loss_fn(torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 5.0]]))
        torch.testing.assert_close(loss_fn.terms["alignment"], torch.tensor(2 ** (alpha / 2)))


def test_uniformity_gradient_finite_at_equal_views():
    z = views(n=5, q=3, seed=5)[0].requires_grad_()
    for alpha in (0.5, 1.0, 2.0, 3.0):
        (grad,) = torch.autograd.grad(UniformityLoss(alpha=alpha)(z, z), z)
        assert torch.isfinite(grad).all(), alpha


def test_uniformity_stable_for_large_t():
    """exp(−t·4) underflows for t = 500; the logsumexp keeps the value exact: for ±e₁ the
    uniformity is −4t, and for n points it is finite."""
    antipodal = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    loss_fn = UniformityLoss(t=500.0)
    loss_fn(antipodal, antipodal)
    torch.testing.assert_close(loss_fn.terms["uniformity"], torch.tensor(-2000.0))
    z1, z2 = views(n=32, q=8, seed=6, dtype=torch.float32)
    assert torch.isfinite(loss_fn(z1, z2))


def test_simclr_known_values():
    tau = 0.2
    e = torch.eye(2, dtype=F64)
    loss_fn = SimCLRLoss(temperature=tau)
    loss = loss_fn(e * 3, e.clone())
    # Each anchor: positive at cosine 1, the two others at cosine 0.
    expected = math.log(1 + 2 * math.exp(-1 / tau))
    # The cross-entropy is logsumexp − 1/τ = 5.0134 − 5: rounding of O(5) values, ~1e-15.
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=F64), rtol=0, atol=1e-14)
    assert loss_fn.terms["positive_similarity"] == 1


def test_simclr_masks_self_similarity():
    """Without the mask every anchor's own similarity 1/τ would dominate: with the mask, n = 2
    identical pairs of orthogonal vectors give a loss far below log(2)."""
    loss = SimCLRLoss(temperature=0.05)(torch.eye(2), torch.eye(2))
    assert loss < 1e-7


# ---------------------------------------------------------------------------------------------
# Dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", DEFAULTS)
def test_low_precision_input_computed_in_float32(case, dtype):
    loss_fn = make_loss(case)
    z1, z2 = views(n=16, q=8, seed=7, dtype=dtype)
    z1.requires_grad_()
    loss = loss_fn(z1, z2)
    assert loss.dtype == torch.float32
    # Same float32 computation on the same (already rounded) values: equal up to float32
    # rounding of identical operations (in practice bitwise).
    torch.testing.assert_close(loss, loss_fn(z1.float(), z2.float()), rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, z1)
    assert grad.dtype == dtype and torch.isfinite(grad.float()).all()


@pytest.mark.parametrize("case", DEFAULTS)
def test_autocast_is_disabled_inside(case):
    loss_fn = make_loss(case)
    z1, z2 = views(n=32, q=16, seed=8, dtype=torch.float32)
    expected = loss_fn(z1, z2)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = loss_fn(z1, z2)
    # bf16 matmuls would err by ~1e-2 relative; float32 ones agree to float32 rounding.
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", DEFAULTS)
def test_float32_close_to_float64(case):
    loss_fn = make_loss(case)
    z1, z2 = views(n=64, q=32, seed=9)
    # Sums of ≤ 64·32 float32 terms: relative error well below 1e-4.
    torch.testing.assert_close(
        loss_fn(z1.float(), z2.float()).double(), loss_fn(z1, z2), rtol=1e-4, atol=1e-5
    )


# ---------------------------------------------------------------------------------------------
# Errors and registration
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", DEFAULTS)
def test_bad_inputs(case):
    loss_fn = make_loss(case)
    with pytest.raises(ValueError, match="same shape"):
        loss_fn(torch.randn(8, 4), torch.randn(8, 5))
    with pytest.raises(ValueError, match="same shape"):
        loss_fn(torch.randn(8), torch.randn(8))
    with pytest.raises(ValueError, match="at least 2"):
        loss_fn(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(TypeError):
        loss_fn(torch.ones(8, 4, dtype=torch.long), torch.ones(8, 4, dtype=torch.long))


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (VICRegLoss, {"inv_coeff": -1.0}, "inv_coeff"),
        (VICRegLoss, {"var_coeff": float("nan")}, "var_coeff"),
        (VICRegLoss, {"cov_coeff": float("inf")}, "cov_coeff"),
        (VICRegLoss, {"eps": 0.0}, "eps"),
        (BarlowTwinsLoss, {"lambda_offdiag": -0.1}, "lambda_offdiag"),
        (BarlowTwinsLoss, {"eps": -1e-5}, "eps"),
        (UniformityLoss, {"align_weight": -1.0}, "align_weight"),
        (UniformityLoss, {"unif_weight": -1.0}, "unif_weight"),
        (UniformityLoss, {"alpha": 0.0}, "alpha"),
        (UniformityLoss, {"t": -2.0}, "t"),
        (SimCLRLoss, {"temperature": 0.0}, "temperature"),
        (SimCLRLoss, {"temperature": float("nan")}, "temperature"),
    ],
)
def test_bad_constructor_arguments(cls, kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        cls(**kwargs)


def test_zero_weights_allowed():
    assert VICRegLoss(inv_coeff=0.0, var_coeff=0.0, cov_coeff=0.0)(*views()) == 0


def test_registered_names():
    assert OBJECTIVES["vicreg"] is VICRegLoss
    assert OBJECTIVES["barlow_twins"] is BarlowTwinsLoss
    assert OBJECTIVES["uniformity"] is UniformityLoss
    assert OBJECTIVES["simclr"] is SimCLRLoss


# ---------------------------------------------------------------------------------------------
# Distributed: 2 gloo processes, each with part of a fixed batch
# ---------------------------------------------------------------------------------------------

LAYOUTS = {"equal": (8, 8), "unequal": (5, 3)}


def _global_batch(layout: str) -> tuple[Tensor, Tensor]:
    return views(n=sum(LAYOUTS[layout]), q=4, seed=10)


def _distributed_worker(rank: int, world: int) -> dict:
    """For each layout and loss: this rank's loss, the gradient of that loss w.r.t. its own
    rows, and the gradient when every rank backpropagates (n_r / N)·L_r instead."""
    results = {}
    for layout, sizes in LAYOUTS.items():
        start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        weight = sizes[rank] / sum(sizes)
        z1_all, z2_all = _global_batch(layout)
        for case in DEFAULTS:
            loss_fn = make_loss(case)
            out = {}
            for key, scale in (("plain", 1.0), ("weighted", weight)):
                z1 = z1_all[start:stop].clone().requires_grad_()
                z2 = z2_all[start:stop].clone().requires_grad_()
                loss = loss_fn(z1, z2)
                out[f"grads_{key}"] = torch.autograd.grad(scale * loss, (z1, z2))
                out["loss"] = loss.detach()
            results[layout, case] = out
    return results


@pytest.fixture(scope="module")
def distributed_results() -> list[dict]:
    return run_distributed(_distributed_worker, 2)


def _single_process(layout: str, case: str) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    z1, z2 = (z.requires_grad_() for z in _global_batch(layout))
    loss = make_loss(case)(z1, z2)
    return loss.detach(), torch.autograd.grad(loss, (z1, z2))


# float64 throughout; the gathered batch is the concatenated one, so the only differences are
# the order of a few sums of O(1) terms: 1e-12 relative (values), 1e-10 (gradients).


@pytest.mark.parametrize("case", DEFAULTS)
def test_distributed_equal_batches(distributed_results, case):
    """Each rank's loss is (local mean) + (global term): the mean over ranks is the one-process
    loss, and rank r's gradient is ∂(Σ_r' L_r')/∂x_r = W·∂L/∂x_r, so DDP's average of the
    parameter gradients is the one-process gradient."""
    world, sizes = 2, LAYOUTS["equal"]
    loss, grads = _single_process("equal", case)
    rank_losses = torch.stack([res["equal", case]["loss"] for res in distributed_results])
    torch.testing.assert_close(rank_losses.mean(), loss, rtol=1e-12, atol=1e-14)
    for rank, res in enumerate(distributed_results):
        start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        for got, full in zip(res["equal", case]["grads_plain"], grads, strict=True):
            torch.testing.assert_close(got, world * full[start:stop], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("case", DEFAULTS)
def test_distributed_unequal_batches(distributed_results, case):
    """Local batches of 5 and 3 rows: weighting rank r's loss by n_r/N gives the one-process
    loss as the sum, and exactly its gradient on each rank's rows (the weights of the global
    term sum to 1 through the gather's all-reduce). For SimCLR this checks that the anchors
    find their own and their positive's columns in the gathered batch at offset 5 on rank 1."""
    sizes = LAYOUTS["unequal"]
    loss, grads = _single_process("unequal", case)
    weights = torch.tensor(sizes, dtype=F64) / sum(sizes)
    rank_losses = torch.stack([res["unequal", case]["loss"] for res in distributed_results])
    torch.testing.assert_close((weights * rank_losses).sum(), loss, rtol=1e-12, atol=1e-14)
    for rank, res in enumerate(distributed_results):
        start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        for got, full in zip(res["unequal", case]["grads_weighted"], grads, strict=True):
            torch.testing.assert_close(got, full[start:stop], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("case", DEFAULTS)
def test_distributed_uses_the_gathered_batch(distributed_results, case):
    """Guards the tests above: each rank's loss differs from the loss of its half batch alone
    (so they could not pass without gathering); Barlow Twins, purely global, gives every rank
    the one-process loss."""
    z1, z2 = _global_batch("equal")
    loss_fn = make_loss(case)
    for rank, res in enumerate(distributed_results):
        rows = slice(8 * rank, 8 * (rank + 1))
        alone = loss_fn(z1[rows], z2[rows])
        assert not torch.isclose(res["equal", case]["loss"], alone, rtol=1e-6)
        if case == "barlow_twins":
            torch.testing.assert_close(
                res["equal", case]["loss"], loss_fn(z1, z2), rtol=1e-12, atol=0
            )
