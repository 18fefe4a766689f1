"""Normalised Gegenbauer polynomials P_ℓ (P_ℓ(1) = 1) in dimension q, checked against
references written here: closed forms, Chebyshev/Legendre, and Gauss quadrature for the law of
t = ⟨u, v⟩ (density ∝ (1 − t²)^((q−3)/2)) built by Golub–Welsch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numpy.polynomial import legendre

from lowres_ssl.losses import gegenbauer, gegenbauer_series

DEGREES = range(11)


def sphere_gauss_rule(dim: int, nodes: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Gauss rule (t_k, w_k), Σw = 1, for E[f(t)] with t = ⟨u, v⟩, u, v uniform on S^(dim−1).

    Golub–Welsch on the Jacobi matrix of the monic polynomials orthogonal for (1 − t²)^(λ−1/2),
    λ = (dim − 2)/2: p_{k+1} = t·p_k − β_k·p_{k−1}, β_k = k(k+2λ−1)/(4(k+λ)(k+λ−1)); for dim = 2
    (Chebyshev weight) β_1 = 1/2. Exact for polynomials of degree ≤ 2·nodes − 1.
    """
    lam = (dim - 2) / 2
    k = np.arange(1, nodes, dtype=np.float64)
    if dim == 2:
        beta = np.full(nodes - 1, 0.25)
        beta[0] = 0.5
    else:
        beta = k * (k + 2 * lam - 1) / (4 * (k + lam) * (k + lam - 1))
    off = np.sqrt(beta)
    jacobi = np.diag(off, 1) + np.diag(off, -1)
    t, vecs = np.linalg.eigh(jacobi)
    return t, vecs[0] ** 2


def harmonic_dim(dim: int, ell: int) -> int:
    """N(q, ℓ): dimension of the degree-ℓ spherical harmonics on S^(q−1), ℓ ≥ 1."""
    return (2 * ell + dim - 2) * math.comb(ell + dim - 3, ell - 1) // ell


@pytest.mark.parametrize("dim", [2, 3, 4, 10, 1000])
def test_reference_quadrature_moments(dim):
    # The reference rule must itself be right: E[t²] = 1/q (Σ_i u_i² = 1), E[t⁴] = 3/(q(q+2)),
    # odd moments vanish, weights sum to 1. Float64 eigen-decomposition: 1e-13 is ~500 ulp.
    t, w = sphere_gauss_rule(dim)
    assert abs(w.sum() - 1) < 1e-13
    assert abs(w @ t) < 1e-13
    assert abs(w @ t**2 - 1 / dim) < 1e-13
    assert abs(w @ t**4 - 3 / (dim * (dim + 2))) < 1e-13


@pytest.mark.parametrize("dim", [2, 3, 128, 65536])
@pytest.mark.parametrize("degree", DEGREES)
def test_gradcheck(degree, dim):
    t = torch.linspace(-0.97, 0.99, 9, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: gegenbauer(x, degree, dim), (t,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [2, 3, 4, 5, 7, 16, 128, 1000, 4096, 65536])
def test_value_at_one(dim, dtype):
    one = torch.ones(3, dtype=dtype)
    for degree in DEGREES:
        out = gegenbauer(one, degree, dim)
        assert out.dtype == dtype and out.shape == one.shape
        # P_ℓ(1) = 1 is a fixed point of the recurrence up to rounding: 10 steps of a few ulp.
        tol = 1e-5 if dtype == torch.float32 else 1e-13
        assert torch.all((out - 1).abs() <= tol), (degree, dim, out)


@pytest.mark.parametrize("dim", [3, 4, 5, 10, 50])
def test_orthogonality_and_norms(dim):
    t, w = sphere_gauss_rule(dim, nodes=20)  # exact up to degree 39 ≥ 10 + 10
    tt = torch.from_numpy(t)
    values = np.stack([gegenbauer(tt, ell, dim).numpy() for ell in DEGREES])
    gram = (values * w) @ values.T  # E[P_k P_ℓ]
    expected = np.diag([1.0] + [1.0 / harmonic_dim(dim, ell) for ell in DEGREES if ell >= 1])
    # Entries are ≤ 1 and computed in float64 from O(1) values: 1e-12 absolute leaves ~1e4 ulp.
    np.testing.assert_allclose(gram, expected, rtol=0, atol=1e-12)
    # Relative check on the (small, for q = 50) norms, so a wrong norm cannot hide under atol.
    np.testing.assert_allclose(np.diag(gram), np.diag(expected), rtol=1e-10)


@pytest.mark.parametrize("dim", [2, 3, 4, 17, 128, 65536])
def test_closed_forms(dim):
    t = torch.linspace(-1, 1, 401, dtype=torch.float64)
    p2 = (dim * t**2 - 1) / (dim - 1)
    p3 = ((dim + 2) * t**3 - 3 * t) / (dim - 1)
    # Same float64 polynomial, different evaluation order: 1e-13 is ≪ any coefficient error.
    torch.testing.assert_close(gegenbauer(t, 0, dim), torch.ones_like(t), rtol=0, atol=1e-13)
    torch.testing.assert_close(gegenbauer(t, 1, dim), t, rtol=0, atol=1e-13)
    torch.testing.assert_close(gegenbauer(t, 2, dim), p2, rtol=0, atol=1e-13)
    torch.testing.assert_close(gegenbauer(t, 3, dim), p3, rtol=0, atol=1e-13)


@pytest.mark.parametrize("degree", DEGREES)
def test_chebyshev_and_legendre(degree):
    t = np.linspace(-1, 1, 1001)
    tt = torch.from_numpy(t)
    cheb = np.cos(degree * np.arccos(t))
    leg = legendre.legval(t, np.eye(degree + 1)[degree])
    # Values are in [−1, 1]; arccos near ±1 loses a few digits (∂/∂t ~ 1/√(1−t²)), hence 1e-9.
    np.testing.assert_allclose(gegenbauer(tt, degree, 2).numpy(), cheb, rtol=0, atol=1e-9)
    # Legendre by numpy's own (Clenshaw) evaluation: both float64 with |P| ≤ 1, 1e-13.
    np.testing.assert_allclose(gegenbauer(tt, degree, 3).numpy(), leg, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dim", [2, 3, 4, 10, 128, 1000, 65536])
def test_float32_stability(dim):
    t32 = torch.linspace(-1, 1, 4001, dtype=torch.float32)
    t64 = t32.double()  # same points, so only the recurrence's rounding is compared
    for degree in DEGREES:
        err = (gegenbauer(t32, degree, dim).double() - gegenbauer(t64, degree, dim)).abs().max()
        # |P_ℓ| ≤ 1 on [−1, 1] and the three-term recurrence is forward stable there: the error
        # grows at most ~ℓ²·eps32 ≈ 100·6e-8 = 6e-6 (worst for q = 2, Chebyshev), below 1e-5.
        assert err < 1e-5, (degree, dim, float(err))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [2, 3, 64, 65536])
def test_series_is_weighted_sum(dim, dtype):
    t = torch.linspace(-1, 1, 257, dtype=dtype).reshape(1, 257)
    coeffs = [0.5, 0.0, 2.0, 1.5, 0.0, 0.0, 3.0, 0.25]  # zeros: skipped terms must not shift ℓ
    explicit = sum(c * gegenbauer(t, ell, dim) for ell, c in enumerate(coeffs))
    out = gegenbauer_series(t, coeffs, dim)
    assert out.shape == t.shape and out.dtype == dtype
    # Same recurrence values summed in a different order; Σ|c| = 7.25 times a few ulp.
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, explicit, rtol=0, atol=tol)
    torch.testing.assert_close(
        gegenbauer_series(t, [2.5], dim), torch.full_like(t, 2.5), rtol=0, atol=0
    )  # constant series: exact


def test_series_gradient():
    t = torch.linspace(-0.95, 0.95, 7, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: gegenbauer_series(x, [1.0, 2.0, 0.0, 3.0], 5), (t,))


@pytest.mark.parametrize("degree, dim", [(-1, 3), (1.5, 3), (2, 1), (2, 0), (2, 2.5)])
def test_bad_arguments(degree, dim):
    with pytest.raises(ValueError):
        gegenbauer(torch.zeros(2), degree, dim)


def test_series_bad_arguments():
    with pytest.raises(ValueError):
        gegenbauer_series(torch.zeros(2), [], 3)
    with pytest.raises(ValueError):
        gegenbauer_series(torch.zeros(2), [1.0, 2.0], 1)
