"""Rotation-invariant kernels: b_0 = E[ψ(⟨u, v⟩)] against closed forms, Gauss quadrature and
Monte Carlo written here; ψ' against autograd; positive definiteness; argument checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowres_ssl.losses import GaussianKernel, PolynomialKernel, SFRIKKernel


def sphere_gauss_rule(dim: int, nodes: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Gauss rule (t_k, w_k), Σw = 1, for the law of t = ⟨u, v⟩ on S^(dim−1) (Golub–Welsch).

    Monic recurrence for the weight (1 − t²)^(λ−1/2), λ = (dim−2)/2:
    β_k = k(k+2λ−1)/(4(k+λ)(k+λ−1)); dim = 2 is the Chebyshev weight (β_1 = 1/2, then 1/4).
    """
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


def sphere_expect(f, dim: int) -> float:
    t, w = sphere_gauss_rule(dim)
    return float(w @ f(t))


def unit_rows(n: int, dim: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, dim, generator=g, dtype=torch.float64)
    return torch.nn.functional.normalize(z, dim=1).to(dtype)


KERNELS = [
    pytest.param(SFRIKKernel(), id="sfrik-1-40-40"),
    pytest.param(SFRIKKernel((1.0,)), id="sfrik-1"),
    pytest.param(SFRIKKernel((0.5, 0.0, 2.0, 0.0, 1.0)), id="sfrik-deg5-zeros"),
    pytest.param(GaussianKernel(0.5), id="gauss-0.5"),
    pytest.param(GaussianKernel(2.0), id="gauss-2"),
    pytest.param(PolynomialKernel(2, 0.0), id="poly-2-0"),
    pytest.param(PolynomialKernel(1, 0.3), id="poly-1-0.3"),
    pytest.param(PolynomialKernel(3, 1.0), id="poly-3-1"),
    pytest.param(PolynomialKernel(5, 0.2), id="poly-5-0.2"),
]
DIMS = [2, 3, 16, 512]


# ---------------------------------------------------------------- Gaussian b_0


@pytest.mark.parametrize("tau", [0.01, 0.5, 2.0, 10.0, 200.0])
def test_gaussian_b0_q3_closed_form(tau):
    s = 2 * tau
    # q = 3: t is uniform on [−1, 1], E[e^{s t}] = sinh(s)/s; e^{−s}·sinh(s)/s = (1 − e^{−2s})/(2s)
    expected = -math.expm1(-2 * s) / (2 * s)
    # Both are float64 sums of positive terms: 1e-12 relative is ~5000 ulp.
    assert GaussianKernel(tau).b0(3) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("tau", [0.01, 0.5, 2.0, 10.0, 200.0])
def test_gaussian_b0_q2_bessel_series(tau):
    s = 2 * tau
    # q = 2: t = cos θ, θ uniform; E[e^{s cos θ}] = I_0(s) = Σ_k (s/2)^{2k}/(k!)², summed in logs.
    logs = [2 * k * math.log(s / 2) - 2 * math.lgamma(k + 1) - s for k in range(2000)]
    top = max(logs)
    expected = math.exp(top) * math.fsum(math.exp(v - top) for v in logs)
    # Positive float64 series; lgamma/log rounding on ~1e3-sized exponents costs ~1e-13 relative.
    assert GaussianKernel(tau).b0(2) == pytest.approx(expected, rel=1e-11)


@pytest.mark.parametrize("dim", [2, 3, 4, 5, 10, 64, 1000])
@pytest.mark.parametrize("tau", [0.25, 2.0, 5.0])
def test_gaussian_b0_quadrature(tau, dim):
    expected = sphere_expect(lambda t: np.exp(2 * tau * (t - 1)), dim)
    # 60-node Gauss rule on an entire function with s ≤ 10: error far below 1e-12 relative.
    assert GaussianKernel(tau).b0(dim) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("dim", [4096, 65536])
@pytest.mark.parametrize("tau", [2.0, 8.0])
def test_gaussian_b0_monte_carlo_large_dim(tau, dim):
    rng = np.random.default_rng(1234)
    # (t + 1)/2 ~ Beta((q−1)/2, (q−1)/2) is the law of ⟨u, v⟩ on S^(q−1).
    t = 2 * rng.beta((dim - 1) / 2, (dim - 1) / 2, size=1_000_000) - 1
    samples = np.exp(2 * tau * (t - 1))
    se = samples.std() / math.sqrt(samples.size)
    b0 = GaussianKernel(tau).b0(dim)
    # Deterministic seed; 5 empirical standard errors bound the Monte Carlo noise.
    assert abs(b0 - samples.mean()) < 5 * se
    if tau == 8.0:
        # Teeth: the q → ∞ value e^{−2τ} is off by ≈ e^{−2τ}·(2τ)²/(2q), many SEs at τ = 8, so
        # a b0 that ignored the dimension would fail the check above.
        assert abs(samples.mean() - math.exp(-2 * tau)) > 8 * se


# -------------------------------------------------------------- Polynomial b_0


@pytest.mark.parametrize("dim", [2, 3, 4, 7, 64, 65536])
@pytest.mark.parametrize("power, offset", [(1, 0.0), (2, 0.0), (2, 0.5), (3, 1.0), (6, 0.3)])
def test_polynomial_b0_quadrature(power, offset, dim):
    expected = sphere_expect(lambda t: (t + offset) ** power, dim)
    # Gauss rule exact for degree ≤ 119; the remaining difference is float64 rounding.
    assert PolynomialKernel(power, offset).b0(dim) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("dim", [2, 3, 50])
def test_sfrik_b0_is_zero_by_quadrature(dim):
    kernel = SFRIKKernel((1.0, 40.0, 40.0))
    t, w = sphere_gauss_rule(dim)
    mean = float(w @ kernel.value(torch.from_numpy(t), dim).numpy())
    # E[P_ℓ] = 0 for ℓ ≥ 1; weights up to 40 times float64 rounding, 1e-12 absolute.
    assert abs(mean) < 1e-12
    assert kernel.b0(dim) == 0.0


# ------------------------------------------------------------------ ψ and ψ'


def sfrik_reference(t: np.ndarray, weights, dim: int) -> np.ndarray:
    """Σ b_ℓ P_ℓ from the closed forms P_1 = t, P_2, P_3 (ℓ ≤ 3)."""
    q = dim
    p = [t, (q * t**2 - 1) / (q - 1), ((q + 2) * t**3 - 3 * t) / (q - 1)]
    return sum(b * p[i] for i, b in enumerate(weights))


@pytest.mark.parametrize("dim", DIMS)
def test_values_against_explicit_formulas(dim):
    t = np.linspace(-1, 1, 301)
    tt = torch.from_numpy(t)
    # float64 evaluations of the same polynomials / exponentials: 1e-12 relative to ψ(1) ≤ 81.
    for weights in [(1.0, 40.0, 40.0), (2.0,), (0.0, 3.0), (0.5, 0.0, 7.0)]:
        got = SFRIKKernel(weights).value(tt, dim).numpy()
        np.testing.assert_allclose(got, sfrik_reference(t, weights, dim), rtol=0, atol=1e-12)
    got = GaussianKernel(1.5).value(tt, dim).numpy()
    np.testing.assert_allclose(got, np.exp(-1.5 * (2 - 2 * t)), rtol=1e-13, atol=0)
    got = PolynomialKernel(3, 0.5).value(tt, dim).numpy()
    np.testing.assert_allclose(got, (t + 0.5) ** 3, rtol=0, atol=1e-13)
    assert float(SFRIKKernel().value(torch.tensor(1.0), dim)) == pytest.approx(81.0, rel=1e-6)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_derivative_matches_autograd(kernel, dim):
    t = torch.linspace(-1, 1, 201, dtype=torch.float64).requires_grad_()
    (grad,) = torch.autograd.grad(kernel.value(t, dim).sum(), t)
    deriv = kernel.derivative(t.detach(), dim)
    assert deriv.dtype == torch.float64 and deriv.shape == t.shape
    # Two float64 evaluations of the same polynomial/exponential: 1e-10 relative to max|ψ'|.
    scale = grad.abs().max().item()
    torch.testing.assert_close(deriv, grad, rtol=0, atol=1e-10 * max(scale, 1.0))
    assert scale > 0  # ψ' is not identically zero, so the comparison has teeth


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_monomial_coefficients_reproduce_value(kernel, dim):
    coeffs = kernel.monomial_coefficients(dim)
    if isinstance(kernel, GaussianKernel):
        assert coeffs is None and kernel.degree is None
        return
    assert len(coeffs) == kernel.degree + 1
    t = np.linspace(-1, 1, 301)
    poly = np.polynomial.polynomial.polyval(t, np.asarray(coeffs, dtype=np.float64))
    value = kernel.value(torch.from_numpy(t), dim).numpy()
    # float64 Horner vs recurrence; coefficients up to ~C(q)·40, so 1e-10 absolute.
    np.testing.assert_allclose(poly, value, rtol=0, atol=1e-10)


# ------------------------------------------------------------ positive definite


@pytest.mark.parametrize("dim", [2, 3, 8, 64])
@pytest.mark.parametrize("kernel", KERNELS)
def test_gram_positive_semidefinite(kernel, dim):
    z = unit_rows(80, dim, seed=dim)
    gram = kernel.value(z @ z.T, dim)
    eig = torch.linalg.eigvalsh(gram)
    # Schoenberg: b_ℓ ≥ 0 ⇒ PSD; float64 eigensolver error is ~n·eps·‖K‖ ≈ 1e-14·max.
    assert eig.min() >= -1e-10 * eig.max()


def test_psd_check_has_teeth():
    # A non-PSD dot-product function (ψ = −t, b_1 < 0) must fail the same criterion.
    z = unit_rows(80, 8, seed=0)
    eig = torch.linalg.eigvalsh(-(z @ z.T))
    assert eig.min() < -1e-10 * eig.max().abs()


# ------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "weights", [(-1.0, 40.0, 40.0), (1.0, -1e-3), (1.0, 40.0, -40.0), (), (0.0, 0.0), (math.nan,)]
)
def test_sfrik_bad_weights(weights):
    with pytest.raises(ValueError):
        SFRIKKernel(weights)


@pytest.mark.parametrize("tau", [0.0, -1.0, math.nan, math.inf])
def test_gaussian_bad_tau(tau):
    with pytest.raises(ValueError):
        GaussianKernel(tau)


@pytest.mark.parametrize(
    "power, offset", [(0, 0.0), (-2, 0.0), (1.5, 0.0), (2, -0.5), (2, math.nan), (2, math.inf)]
)
def test_polynomial_bad_arguments(power, offset):
    with pytest.raises(ValueError):
        PolynomialKernel(power, offset)


def test_degrees():
    assert SFRIKKernel().degree == 3
    assert SFRIKKernel((1.0, 2.0)).degree == 2
    assert PolynomialKernel(4, 1.0).degree == 4
    assert GaussianKernel(1.0).degree is None
