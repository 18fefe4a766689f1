"""Rotation-invariant (dot-product) kernels on the sphere: K(u, v) = ψ(⟨u, v⟩).

A kernel ψ = Σ_ℓ b_ℓ·P_ℓ with every b_ℓ ≥ 0 (P_ℓ the normalised Gegenbauer polynomials of
the dimension at hand) is positive definite on the sphere (Schoenberg). Against the uniform law
U on S^{q−1} only b_0 = E_U[ψ(⟨u, v⟩)] matters:

    MMD²(z, U) = (1/n²)·Σ_ij ψ(⟨z_i, z_j⟩) − b_0.

Each kernel gives ψ, ψ' and b_0 for the dimension q at hand; polynomial kernels also give their
monomial coefficients, which the moments path of :func:`mmd_to_uniform` uses.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

from torch import Tensor

from .gegenbauer import derivative_coeffs, gegenbauer_series, gegenbauer_to_monomial


def sphere_moment(k: int, dim: int) -> float:
    """E[t^k] for t = ⟨u, v⟩ with u, v uniform on S^{dim−1}.

    0 for odd k, Π_{j<k/2} (2j + 1)/(dim + 2j) for even k.
    """
    if k % 2:
        return 0.0
    out = 1.0
    for j in range(k // 2):
        out *= (2 * j + 1) / (dim + 2 * j)
    return out


class RotationInvariantKernel(ABC):
    """K(u, v) = ψ(⟨u, v⟩) on S^{q−1}; ψ may depend on q (Gegenbauer expansions do)."""

    #: Degree of ψ as a polynomial in t, or None when ψ is not a polynomial.
    degree: int | None = None

    @abstractmethod
    def value(self, t: Tensor, dim: int) -> Tensor:
        """ψ(t), elementwise."""

    @abstractmethod
    def derivative(self, t: Tensor, dim: int) -> Tensor:
        """ψ'(t), elementwise."""

    @abstractmethod
    def b0(self, dim: int) -> float:
        """E[ψ(⟨u, v⟩)] for u, v uniform on S^{dim−1} (the MMD's constant term)."""

    def monomial_coefficients(self, dim: int) -> list[float] | None:
        """a with ψ(t) = Σ_k a[k]·t^k, or None when ψ is not a polynomial."""
        return None


class SFRIKKernel(RotationInvariantKernel):
    """ψ = Σ_{ℓ=1..L} b_ℓ·P_ℓ, the truncated kernel of Zheng et al. (ICLR 2023).

    Args:
        weights: b_1, …, b_L, each ≥ 0 (default (1, 40, 40): L = 3, the paper's choice).

    b_0 = 0, so MMD² = mean of ψ over the Gram matrix.

    >>> k = SFRIKKernel((1.0, 40.0, 40.0))
    >>> float(k.value(torch.tensor(1.0), 128))
    81.0
    """

    def __init__(self, weights: Sequence[float] = (1.0, 40.0, 40.0)):
        weights = [float(w) for w in weights]
        if not weights:
            raise ValueError("SFRIKKernel needs at least one weight (b_1, …, b_L)")
        bad = [w for w in weights if not math.isfinite(w) or w < 0]
        if bad:
            raise ValueError(
                f"SFRIKKernel weights must be finite and >= 0, got {weights}: a negative b_ℓ "
                "makes the kernel not positive definite, so the MMD could go negative; "
                "use weights such as (1, 40, 40)"
            )
        if not any(weights):
            raise ValueError("SFRIKKernel weights are all zero: the regulariser would vanish")
        self.weights = tuple(weights)
        self._coeffs = [0.0, *weights]
        self.degree = len(weights)

    def value(self, t: Tensor, dim: int) -> Tensor:
        return gegenbauer_series(t, self._coeffs, dim)

    def derivative(self, t: Tensor, dim: int) -> Tensor:
        coeffs, dim2 = derivative_coeffs(self._coeffs, dim)
        return gegenbauer_series(t, coeffs, dim2)

    def b0(self, dim: int) -> float:
        return 0.0

    def monomial_coefficients(self, dim: int) -> list[float]:
        return gegenbauer_to_monomial(self._coeffs, dim)

    def __repr__(self) -> str:
        return f"SFRIKKernel(weights={self.weights})"


class GaussianKernel(RotationInvariantKernel):
    """K(u, v) = exp(−τ‖u − v‖²) = exp(2τ(t − 1)) on the sphere.

    Args:
        tau: τ > 0 (Wang & Isola use τ = 2).

    b_0 = e^{−2τ}·E[e^{2τt}] = e^{−2τ}·Σ_k (2τ)^{2k}/(2k)!·E[t^{2k}], summed to float64
    precision for the dimension at hand, so MMD² is exact (not the large-q approximation).
    """

    def __init__(self, tau: float = 2.0):
        tau = float(tau)
        if not math.isfinite(tau) or tau <= 0:
            raise ValueError(f"GaussianKernel needs tau > 0, got {tau}")
        self.tau = tau
        self._b0_cache: dict[int, float] = {}

    def value(self, t: Tensor, dim: int) -> Tensor:
        return ((2 * self.tau) * (t - 1)).exp()

    def derivative(self, t: Tensor, dim: int) -> Tensor:
        return (2 * self.tau) * ((2 * self.tau) * (t - 1)).exp()

    def b0(self, dim: int) -> float:
        if dim not in self._b0_cache:
            self._b0_cache[dim] = _gaussian_b0(2 * self.tau, dim)
        return self._b0_cache[dim]

    def __repr__(self) -> str:
        return f"GaussianKernel(tau={self.tau})"


def _gaussian_b0(s: float, dim: int) -> float:
    """e^{−s}·E[e^{s t}] by its even power series, summed in log space (no overflow for big s)."""
    logs = [-s]  # log of term k: s^{2k}/(2k)!·E[t^{2k}]·e^{−s}
    k = 0
    while True:
        log_ratio = 2 * math.log(s) - math.log((2 * k + 2) * (dim + 2 * k))
        logs.append(logs[-1] + log_ratio)
        k += 1
        if log_ratio < 0 and logs[-1] < max(logs) - 40:  # terms now shrink, and by e^-40
            break
    top = max(logs)
    return math.exp(top) * math.fsum(math.exp(v - top) for v in logs)


class PolynomialKernel(RotationInvariantKernel):
    """ψ(t) = (t + c)^p: the polynomial kernel; p = 2, c = 0 is the quadratic kernel.

    Args:
        power: p ≥ 1 (integer).
        offset: c ≥ 0 (then every Gegenbauer coefficient is ≥ 0: positive definite).
    """

    def __init__(self, power: int = 2, offset: float = 0.0):
        if int(power) != power or power < 1:
            raise ValueError(f"PolynomialKernel needs an integer power >= 1, got {power}")
        offset = float(offset)
        if not math.isfinite(offset) or offset < 0:
            raise ValueError(
                f"PolynomialKernel needs offset >= 0, got {offset}: a negative offset "
                "makes the kernel not positive definite"
            )
        self.power = int(power)
        self.offset = offset
        self.degree = self.power

    def value(self, t: Tensor, dim: int) -> Tensor:
        return (t + self.offset).pow(self.power)

    def derivative(self, t: Tensor, dim: int) -> Tensor:
        return self.power * (t + self.offset).pow(self.power - 1)

    def monomial_coefficients(self, dim: int) -> list[float]:
        p, c = self.power, self.offset
        return [math.comb(p, k) * c ** (p - k) for k in range(p + 1)]

    def b0(self, dim: int) -> float:
        coeffs = self.monomial_coefficients(dim)
        return math.fsum(a * sphere_moment(k, dim) for k, a in enumerate(coeffs))

    def __repr__(self) -> str:
        return f"PolynomialKernel(power={self.power}, offset={self.offset})"
