"""Normalised Legendre (Gegenbauer) polynomials on the sphere S^{dim-1}.

In dimension q (points on S^{q-1} ⊂ R^q) the polynomials, normalised so that P_ℓ(1) = 1, are

    P_0 = 1,  P_1 = t,  P_{ℓ+1}(t) = [(2ℓ + q − 2)·t·P_ℓ(t) − ℓ·P_{ℓ−1}(t)] / (ℓ + q − 2).

They are orthogonal under the law of t = ⟨u, v⟩ for u, v uniform on S^{q−1}, whose density on
[−1, 1] is proportional to (1 − t²)^((q−3)/2). Their derivatives are polynomials of the same
family one dimension pair up:

    P'_ℓ{q}(t) = ℓ(ℓ + q − 2)/(q − 1) · P_{ℓ−1}{q+2}(t),

which is how kernels get ψ' without differentiating the recurrence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _check_dim(dim: int) -> None:
    if int(dim) != dim or dim < 2:
        raise ValueError(f"dim must be an integer >= 2 (the sphere S^(dim-1)), got {dim}")


def gegenbauer(t: Tensor, degree: int, dim: int) -> Tensor:
    """P_degree in dimension ``dim``, elementwise on ``t`` (normalised: P(1) = 1).

    Args:
        t: tensor of any shape, values usually in [−1, 1] (cosines between unit vectors).
        degree: ℓ ≥ 0.
        dim: q ≥ 2, the ambient dimension of the sphere S^{q−1}.

    Returns:
        Tensor shaped like ``t``. Differentiable by autograd.

    >>> gegenbauer(torch.tensor([1.0, 0.0]), 2, 3)  # (3t² − 1)/2
    tensor([ 1.0000, -0.5000])
    """
    if int(degree) != degree or degree < 0:
        raise ValueError(f"degree must be an integer >= 0, got {degree}")
    _check_dim(dim)
    if degree == 0:
        return torch.ones_like(t)
    prev, cur = torch.ones_like(t), t
    for ell in range(1, degree):
        prev, cur = cur, ((2 * ell + dim - 2) * t * cur - ell * prev) / (ell + dim - 2)
    return cur if degree > 1 else t.clone()


def gegenbauer_series(t: Tensor, coeffs: Sequence[float], dim: int) -> Tensor:
    """Σ_ℓ coeffs[ℓ]·P_ℓ(t) in dimension ``dim`` (ℓ from 0), one recurrence pass.

    Args:
        t: tensor of any shape.
        coeffs: c_0, c_1, …, c_L (python floats; zeros are allowed).
        dim: q ≥ 2.

    Returns:
        Tensor shaped like ``t``.
    """
    _check_dim(dim)
    if len(coeffs) == 0:
        raise ValueError("coeffs must hold at least one coefficient")
    out = torch.full_like(t, float(coeffs[0]))
    if len(coeffs) == 1:
        return out
    prev, cur = torch.ones_like(t), t
    out = out + coeffs[1] * cur
    for ell in range(1, len(coeffs) - 1):
        prev, cur = cur, ((2 * ell + dim - 2) * t * cur - ell * prev) / (ell + dim - 2)
        if coeffs[ell + 1] != 0:
            out = out + coeffs[ell + 1] * cur
    return out


def derivative_coeffs(coeffs: Sequence[float], dim: int) -> tuple[list[float], int]:
    """Coefficients of ψ' as a series in dimension dim + 2, for ψ = Σ_ℓ coeffs[ℓ]·P_ℓ{dim}.

    Returns ``(d, dim + 2)`` with ψ'(t) = Σ_ℓ d[ℓ]·P_ℓ{dim+2}(t).
    """
    _check_dim(dim)
    d = [coeffs[ell] * ell * (ell + dim - 2) / (dim - 1) for ell in range(1, len(coeffs))]
    return (d or [0.0]), dim + 2


def gegenbauer_to_monomial(coeffs: Sequence[float], dim: int) -> list[float]:
    """Monomial coefficients a with Σ_ℓ coeffs[ℓ]·P_ℓ{dim}(t) = Σ_k a[k]·t^k (float64 python)."""
    _check_dim(dim)
    degree = len(coeffs) - 1
    prev, cur = [1.0], [0.0, 1.0]  # P_0, P_1 as monomial coefficient lists
    total = [0.0] * (degree + 1)
    total[0] += coeffs[0]
    if degree >= 1:
        total[1] += coeffs[1]
    for ell in range(1, degree):
        shifted = [0.0, *cur]  # t·P_ℓ
        nxt = [
            ((2 * ell + dim - 2) * shifted[k] - ell * (prev[k] if k < len(prev) else 0.0))
            / (ell + dim - 2)
            for k in range(ell + 2)
        ]
        prev, cur = cur, nxt
        for k, a in enumerate(cur):
            total[k] += coeffs[ell + 1] * a
    return total
