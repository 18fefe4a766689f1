"""MMD² to the uniform law on the sphere: every path (dense, blocked, moments) against an
independent float64 reference written here (explicit Gram matrix, explicit ψ from closed forms,
b_0 by Gauss quadrature, gradient by autograd)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from lowres_ssl.losses import (
    GaussianKernel,
    PolynomialKernel,
    SFRIKKernel,
    choose_path,
    expected_mmd_uniform,
    mmd_to_uniform,
)

# ------------------------------------------------------------------ references


def sphere_gauss_rule(dim: int, nodes: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Gauss rule (t_k, w_k), Σw = 1, for t = ⟨u, v⟩, u, v uniform on S^(dim−1) (Golub–Welsch;
    monic recurrence of the weight (1 − t²)^(λ−1/2), λ = (dim−2)/2, Chebyshev for dim = 2)."""
    lam = (dim - 2) / 2
    k = np.arange(1, nodes, dtype=np.float64)
    if dim == 2:
        beta = np.full(nodes - 1, 0.25)
        beta[0] = 0.5
    else:
        beta = k * (k + 2 * lam - 1) / (4 * (k + lam) * (k + lam - 1))
    off = np.sqrt(beta)
    t, vecs = np.linalg.eigh(np.diag(off, 1) + np.diag(off, -1))
    return t, vecs[0] ** 2


def sfrik_psi(weights):
    """ψ = Σ b_ℓ P_ℓ from closed forms P_1 = t, P_2 = (qt²−1)/(q−1), P_3 = ((q+2)t³−3t)/(q−1)."""

    def psi(t, q):
        p = [t, (q * t**2 - 1) / (q - 1), ((q + 2) * t**3 - 3 * t) / (q - 1)]
        return sum(b * p[i] for i, b in enumerate(weights))

    return psi


@dataclass(frozen=True)
class Spec:
    name: str
    make: Callable[[], object]
    psi: Callable  # reference ψ(t, q) on float64 tensors
    degree: int | None  # polynomial degree of ψ, None for the Gaussian

    def b0(self, q: int) -> float:
        return _reference_b0(self, q)

    def psi1(self, q: int) -> float:
        return float(self.psi(torch.ones((), dtype=torch.float64), q))


@functools.cache
def _reference_b0(spec: Spec, q: int) -> float:
    """E[ψ(t)] by the Gauss rule (60 nodes: exact for the polynomials, ≪1e-14 for the Gaussian)."""
    t, w = sphere_gauss_rule(q)
    return float(w @ spec.psi(torch.from_numpy(t), q).numpy())


SPECS = [
    Spec("sfrik-1-40-40", SFRIKKernel, sfrik_psi((1.0, 40.0, 40.0)), 3),
    Spec("sfrik-1-40", lambda: SFRIKKernel((1.0, 40.0)), sfrik_psi((1.0, 40.0)), 2),
    Spec("gauss-2", lambda: GaussianKernel(2.0), lambda t, q: torch.exp(-2.0 * (2 - 2 * t)), None),
    Spec("poly-2-0.5", lambda: PolynomialKernel(2, 0.5), lambda t, q: (t + 0.5) ** 2, 2),
    Spec("poly-3-1", lambda: PolynomialKernel(3, 1.0), lambda t, q: (t + 1.0) ** 3, 3),
    Spec("poly-1-0", lambda: PolynomialKernel(1, 0.0), lambda t, q: t, 1),
]
SPEC_PARAMS = [pytest.param(s, id=s.name) for s in SPECS]


def reference(z: torch.Tensor, spec: Spec) -> tuple[float, torch.Tensor]:
    """MMD² and its gradient in float64: explicit Gram, explicit ψ, autograd."""
    x = z.detach().double().requires_grad_()
    n, q = x.shape
    val = spec.psi(x @ x.T, q).sum() / n**2 - spec.b0(q)
    (grad,) = torch.autograd.grad(val, x)
    return val.item(), grad


def run(z, kernel, path, block_size=None):
    """Value and gradient of the library's MMD² for input z (a leaf is made from z)."""
    x = z.detach().clone().requires_grad_()
    val = mmd_to_uniform(x, kernel, path=path, block_size=block_size)
    (grad,) = torch.autograd.grad(val, x)
    return val, grad


def paths_for(spec: Spec, n: int) -> list[tuple[str, int | None]]:
    out = [("dense", None), ("auto", None)]
    out += [("blocked", b) for b in sorted({1, 7, 64, n, n + 5})]
    if spec.degree is not None and spec.degree <= 2:
        out.append(("moments", None))
    return out


def unit_rows(n, q, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, q, generator=g, dtype=torch.float64)
    return torch.nn.functional.normalize(z, dim=1).to(dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# --------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_gradcheck_every_path(spec):
    g = torch.Generator().manual_seed(3)
    # Rows deliberately not unit: every path evaluates the same formula for any z.
    z = (0.6 * torch.randn(7, 5, generator=g, dtype=torch.float64)).requires_grad_()
    kernel = spec.make()
    for path, block in [("dense", None), ("blocked", 3), ("blocked", 1), ("auto", None)]:
        assert torch.autograd.gradcheck(
            lambda x, p=path, b=block: mmd_to_uniform(x, kernel, p, b), (z,)
        )
    if spec.degree is not None and spec.degree <= 2:
        assert torch.autograd.gradcheck(lambda x: mmd_to_uniform(x, kernel, "moments"), (z,))


# --------------------------------------------------------------------- identities


@pytest.mark.parametrize("n, q", [(37, 9), (5, 40), (64, 3)])
def test_p1_p2_identities(n, q):
    z = unit_rows(n, q, seed=n + q, dtype=torch.float64)
    mean = z.mean(dim=0)
    mean_sq = float(mean @ mean)
    c = torch.zeros(q, q, dtype=torch.float64)
    for i in range(n):  # C = (1/n) Σ z_i z_iᵀ, built explicitly
        c += torch.outer(z[i], z[i]) / n
    p2_target = q / (q - 1) * float(((c - torch.eye(q, dtype=torch.float64) / q) ** 2).sum())
    gram = z @ z.T
    # Direct Gram averages of the reference closed forms P_1 = t, P_2 = (qt²−1)/(q−1).
    # All float64 sums of O(1) terms: 1e-12 relative.
    assert float(gram.mean()) == pytest.approx(mean_sq, rel=1e-12, abs=1e-15)
    assert float(((q * gram**2 - 1) / (q - 1)).mean()) == pytest.approx(p2_target, rel=1e-12)
    for path, block in [("dense", None), ("blocked", 4), ("moments", None)]:
        got1 = float(mmd_to_uniform(z, SFRIKKernel((1.0,)), path, block))
        got2 = float(mmd_to_uniform(z, SFRIKKernel((0.0, 1.0)), path, block))
        # b_0 = 0, so MMD² is the Gram average of P_1 (resp. P_2); float64 through a different
        # but exact formula (moments path), so 1e-10 relative is still ~1e6 ulp of slack only.
        assert got1 == pytest.approx(mean_sq, rel=1e-10, abs=1e-15), path
        assert got2 == pytest.approx(p2_target, rel=1e-10, abs=1e-15), path


# ------------------------------------------------------------------ MMD² ≥ 0


def adversarial_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    q = 8
    u = torch.nn.functional.normalize(torch.randn(1, q, generator=g, dtype=torch.float64), dim=1)
    few = torch.nn.functional.normalize(torch.randn(3, q, generator=g, dtype=torch.float64), dim=1)
    rot, _ = torch.linalg.qr(torch.randn(q, q, generator=g, dtype=torch.float64))
    frame, _ = torch.linalg.qr(torch.randn(32, 24, generator=g, dtype=torch.float64))
    near = frame.T + 1e-3 * torch.randn(24, 32, generator=g, dtype=torch.float64)
    return {
        "random": unit_rows(50, q, seed=5, dtype=torch.float64),
        "all-equal": u.repeat(20, 1),
        "antipodal-clusters": torch.cat([u.repeat(10, 1), -u.repeat(10, 1)]),
        "few-repeated": few.repeat(10, 1),
        "orthonormal": frame.T.contiguous(),  # 24 orthonormal rows in R^32
        "near-orthonormal": torch.nn.functional.normalize(near, dim=1),
        "cross-polytope": torch.cat([rot, -rot]),  # ±(rotated basis): a spherical 3-design
    }


ADVERSARIAL = adversarial_inputs()


@pytest.mark.parametrize("case", list(ADVERSARIAL))
@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_mmd_nonnegative(spec, case):
    z64 = ADVERSARIAL[case]
    n, q = z64.shape
    kernel = spec.make()
    ref, _ = reference(z64, spec)
    assert ref >= -1e-12 * spec.psi1(q)  # the reference itself (sanity of the input)
    scale = spec.psi1(q) + abs(spec.b0(q))
    for dtype in (torch.float64, torch.float32):
        z = z64.to(dtype)
        for path, block in paths_for(spec, n):
            val = float(mmd_to_uniform(z, kernel, path, block))
            # float64: 1e-12·ψ(1) is ~5000 ulp of the O(ψ(1)) terms being summed. float32: Gram
            # entries carry ~√q·eps32 ≈ 2e-7 error, times |ψ'| ≤ ~3·ψ(1) for these kernels,
            # so −2e-6·(ψ(1)+|b_0|) bounds rounding below zero.
            tol = 1e-12 * scale if dtype == torch.float64 else 2e-6 * scale
            assert val >= -tol, (path, block, dtype, val)
            # And the value itself: same rounding allowance plus 1e-5 relative (see below).
            assert abs(val - ref) <= tol + 1e-5 * abs(ref), (path, block, dtype, val, ref)
            if case == "cross-polytope" and spec.degree is not None and spec.degree <= 3:
                # A 3-design: E over the design of every P_ℓ, 1 ≤ ℓ ≤ 3, is 0, so MMD² = 0.
                assert abs(val) <= tol, (path, block, dtype, val)


def test_cross_polytope_is_exactly_a_design():
    # The reference agrees that the rotated cross-polytope has MMD² = 0 for degree ≤ 3 kernels,
    # but not for the Gaussian (infinite degree): so the zero checks above have teeth.
    z = ADVERSARIAL["cross-polytope"]
    for spec in SPECS:
        ref, _ = reference(z, spec)
        if spec.degree is not None:
            assert abs(ref) < 1e-12 * spec.psi1(8)
        else:
            assert ref > 1e-4


# ---------------------------------------------------- E[MMD²] for uniform points


@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_expected_mmd_for_uniform_points(spec):
    n, q, draws = 32, 16, 400
    g = torch.Generator().manual_seed(2024)
    z = torch.nn.functional.normalize(torch.randn(draws, n, q, generator=g), dim=2)
    kernel = spec.make()
    vals = np.array([float(mmd_to_uniform(z[i], kernel)) for i in range(draws)])
    expected = (spec.psi1(q) - spec.b0(q)) / n  # diagonal terms only survive in expectation
    se = vals.std(ddof=1) / math.sqrt(draws)
    # Deterministic seed; 4 empirical standard errors bound the sampling noise of the mean.
    assert abs(vals.mean() - expected) < 4 * se, (vals.mean(), expected, se)
    # Library helper against the same independent reference: float64 arithmetic, 1e-12.
    assert expected_mmd_uniform(kernel, n, q) == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------- paths agree (fp32)


@pytest.mark.parametrize("q", [3, 64, 512])
@pytest.mark.parametrize("n", [1, 2, 100, 300])
@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_paths_agree_float32(spec, n, q):
    z = unit_rows(n, q, seed=7 * n + q)
    kernel = spec.make()
    ref_val, ref_grad = reference(z, spec)
    dense_val, dense_grad = run(z, kernel, "dense")
    for path, block in paths_for(spec, n):
        val, grad = run(z, kernel, path, block)
        assert val.dtype == torch.float32 and val.shape == ()
        assert grad.dtype == torch.float32 and grad.shape == z.shape
        with torch.no_grad():  # the no-grad forward (no ψ' buffer kept) gives the same value
            val_ng = mmd_to_uniform(z, kernel, path, block)
        # float32 Gram entries (relative error ~√q·eps32) averaged into a float64 sum, then one
        # float32 rounding: 1e-5 relative leaves a >10x margin over what rounding can produce.
        where = (path, block, val.item(), ref_val)
        assert abs(val.item() - ref_val) <= 1e-5 * abs(ref_val), where
        assert abs(val.item() - dense_val.item()) <= 1e-5 * abs(dense_val.item()), where
        assert abs(val_ng.item() - val.item()) <= 1e-5 * abs(val.item()), where
        assert rel_err(grad, ref_grad) <= 1e-5, (*where, rel_err(grad, ref_grad))
        assert rel_err(grad, dense_grad) <= 1e-5, (*where, rel_err(grad, dense_grad))


def test_float64_paths_match_reference_tightly():
    z = unit_rows(53, 11, seed=1, dtype=torch.float64)
    for spec in SPECS:
        kernel = spec.make()
        ref_val, ref_grad = reference(z, spec)
        for path, block in paths_for(spec, 53):
            val, grad = run(z, kernel, path, block)
            assert val.dtype == torch.float64
            # float64 end to end: 1e-10 relative is far above rounding, far below any real error.
            assert val.item() == pytest.approx(ref_val, rel=1e-10), (spec.name, path, block)
            assert rel_err(grad, ref_grad) <= 1e-10, (spec.name, path, block)


@pytest.mark.parametrize("path, block", [("dense", None), ("blocked", 5), ("moments", None)])
def test_non_contiguous_input(path, block):
    # Rows stored column-major (a transposed view): the blocked backward writes into row slices.
    zt = unit_rows(40, 16, seed=9).T.contiguous().T
    assert not zt.is_contiguous()
    kernel = SFRIKKernel((1.0, 40.0))
    ref_val, ref_grad = reference(zt, Spec("s", SFRIKKernel, sfrik_psi((1.0, 40.0)), 2))
    val, grad = run(zt, kernel, path, block)
    # Same float32 tolerance argument as test_paths_agree_float32.
    assert abs(val.item() - ref_val) <= 1e-5 * abs(ref_val)
    assert rel_err(grad, ref_grad) <= 1e-5


# ------------------------------------------------------------ low precision input


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_low_precision_input_computed_in_float32(spec, low):
    z_low = unit_rows(50, 16, seed=4).to(low)
    kernel = spec.make()
    for path, block in paths_for(spec, 50):
        val, grad = run(z_low, kernel, path, block)
        val32, grad32 = run(z_low.float(), kernel, path, block)
        assert val.dtype == torch.float32 and grad.dtype == low
        # The library upcasts to float32 first, so the computation is identical: exact equality.
        assert torch.equal(val, val32), (path, block)
        assert torch.equal(grad, grad32.to(low)), (path, block)


@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_autocast_forward_stays_float32(spec):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(60, 24, generator=g)
    lin = torch.nn.Linear(24, 16)
    kernel = spec.make()
    for path, block in paths_for(spec, 60):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z_net = torch.nn.functional.normalize(lin(x), dim=1)  # a bf16 network output
            z32 = unit_rows(60, 16, seed=6)
            val_net = mmd_to_uniform(z_net, kernel, path, block)
            val32 = mmd_to_uniform(z32, kernel, path, block)
        assert z_net.dtype == torch.bfloat16  # autocast really was active
        assert val_net.dtype == torch.float32 and val32.dtype == torch.float32
        # Autocast is disabled inside: results equal the plain float32 computation exactly.
        assert torch.equal(val_net, mmd_to_uniform(z_net.detach().float(), kernel, path, block))
        assert torch.equal(val32, mmd_to_uniform(z32, kernel, path, block))
        # Gradient with backward outside autocast (the recommended use) matches float32.
        x32 = z32.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v = mmd_to_uniform(x32, kernel, path, block)
        v.backward()
        _, grad32 = run(z32, kernel, path, block)
        assert torch.equal(x32.grad, grad32)


@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_backward_inside_autocast_stays_float32(spec):
    # The module promises float32 "whatever the network's precision", and the Gram paths disable
    # autocast in their backward; a backward() called inside the autocast region must therefore
    # still give the float32 gradient (bf16 rounding would show as ~1e-3 relative error).
    z32 = unit_rows(100, 16, seed=12)
    kernel = spec.make()
    for path, block in paths_for(spec, 100):
        _, grad32 = run(z32, kernel, path, block)
        x = z32.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mmd_to_uniform(x, kernel, path, block).backward()
        assert x.grad.dtype == torch.float32
        # Same float32 computation expected; 1e-5 relative is 100x below bf16's 8-bit mantissa.
        assert rel_err(x.grad, grad32) <= 1e-5, (path, block, rel_err(x.grad, grad32))


# ---------------------------------------------------------------- auto & errors


@pytest.mark.parametrize("n, q", [(1, 3), (10, 3), (10, 64), (300, 64), (64, 300)])
@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_auto_equals_chosen_path(spec, n, q):
    kernel = spec.make()
    chosen = choose_path(n, q, kernel)
    # The documented rule: moments for degree ≤ 1, or degree 2 with q < n; dense otherwise here.
    if spec.degree is not None and (spec.degree <= 1 or (spec.degree == 2 and q < n)):
        assert chosen == "moments"
    else:
        assert chosen == "dense"
    z = unit_rows(n, q, seed=n * q)
    val_auto, grad_auto = run(z, kernel, "auto")
    val, grad = run(z, kernel, chosen)
    assert torch.equal(val_auto, val) and torch.equal(grad_auto, grad)  # same code path: exact


def test_choose_path_large_n_is_blocked():
    assert choose_path(5000, 64, GaussianKernel(2.0)) == "blocked"
    assert choose_path(5000, 64, SFRIKKernel()) == "blocked"
    assert choose_path(4096, 64, SFRIKKernel()) == "dense"
    assert choose_path(5000, 64, SFRIKKernel((1.0, 40.0))) == "moments"
    assert choose_path(5000, 8192, SFRIKKernel((1.0, 40.0))) == "blocked"
    # q < n, but a q × q second moment of 8192² floats is too big: blocked, not moments.
    assert choose_path(20000, 8192, SFRIKKernel((1.0, 40.0))) == "blocked"
    assert choose_path(20000, 8192, SFRIKKernel((1.0,))) == "moments"  # degree 1: O(n·q)


@pytest.mark.parametrize(
    "kernel",
    [SFRIKKernel(), PolynomialKernel(3, 1.0), PolynomialKernel(4, 0.0), GaussianKernel(1.0)],
    ids=["sfrik-deg3", "poly-deg3", "poly-deg4", "gauss"],
)
def test_moments_rejects_high_degree(kernel):
    with pytest.raises(ValueError):
        mmd_to_uniform(unit_rows(10, 4, seed=0), kernel, path="moments")


@pytest.mark.parametrize(
    "shape", [(8,), (2, 3, 4), (0, 4), (5, 1), (5, 0), ()], ids=lambda s: "x".join(map(str, s))
)
def test_bad_shapes(shape):
    with pytest.raises(ValueError):
        mmd_to_uniform(torch.ones(shape), SFRIKKernel())


@pytest.mark.parametrize("path", ["sparse", "Dense", "", None])
def test_unknown_path(path):
    with pytest.raises(ValueError):
        mmd_to_uniform(unit_rows(6, 4, seed=0), SFRIKKernel(), path=path)


@pytest.mark.parametrize("block", [0, -3, 2.5])
@pytest.mark.parametrize("path", ["blocked", "auto", "dense"])
def test_bad_block_size(path, block):
    with pytest.raises(ValueError):
        mmd_to_uniform(unit_rows(6, 4, seed=0), SFRIKKernel(), path=path, block_size=block)


@pytest.mark.parametrize(("n", "q"), [(5000, 3), (8192, 64)])
def test_moments_path_stays_accurate_for_large_batches(n, q):
    # Moments are picked when n ≫ q; C's diagonal (≈ n/q) is where fp32 sums lose precision.
    z = unit_rows(n, q, seed=n + q)
    z64 = z.double()
    kernel = SFRIKKernel((1.0, 40.0))
    gram = z64 @ z64.T
    p2 = (q * gram**2 - 1) / (q - 1)
    want = (gram + 40.0 * p2).mean().item()
    got = mmd_to_uniform(z, kernel, "moments").item()
    # The float64 reference on the same fp32 inputs; fp32 rounding gives ~1e-7, the bound 1e-5.
    assert abs(got - want) <= 1e-5 * abs(want)
