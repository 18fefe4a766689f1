"""MMD² between the empirical law of embeddings and the uniform law on the sphere.

For rows z_1..z_n of Z (n × q) and a rotation-invariant kernel ψ with constant term b_0,

    MMD²(z, U) = (1/n²)·Σ_i Σ_j ψ(⟨z_i, z_j⟩) − b_0        (V-statistic, diagonal included)

    ∂MMD²/∂z_k = (2/n²)·Σ_j ψ'(⟨z_k, z_j⟩)·z_j.

Three ways to compute the same function of Z (the rows are meant to be unit vectors, but every
path evaluates exactly this formula, so values and gradients agree for any Z):

- ``dense``: the n × n Gram matrix once; ψ'(G) kept for the backward. O(n²) memory.
- ``blocked``: rows of G in blocks of b, forward and backward (recomputed); O(n·b) memory.
- ``moments``: kernels of degree ≤ 2 only. With m = mean z and C = ZᵀZ/n,
  (1/n²)Σ G_ij = ‖m‖² and (1/n²)Σ G_ij² = ‖C‖²_F, so MMD² needs O(q²) memory, O(n·q²) time.
  ‖C‖²_F − 1/q is evaluated as ‖C − I/q‖²_F + 2·tr(C − I/q)/q, which avoids the cancellation,
  with m and C summed in float64 over chunks of rows.

Everything runs in float32 (float64 input stays float64), with autocast off, whatever the
network's precision. Sums over the Gram matrix are accumulated in float64.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .kernels import RotationInvariantKernel

PATHS = ("auto", "dense", "blocked", "moments")

#: The auto path keeps the full Gram matrix up to this many entries (4096² floats = 64 MiB).
DENSE_MAX_ENTRIES = 4096 * 4096
#: Blocks of the Gram matrix hold about this many entries (16 MiB in float32).
BLOCK_ENTRIES = 2048 * 2048


@contextmanager
def exact_fp32(device: torch.device) -> Iterator[None]:
    """Autocast off and, on CUDA, TF32 off for matmuls: the Gram matrix in true fp32.

    TF32 keeps 10 mantissa bits, which is too coarse for ψ(⟨z_i, z_j⟩) at large q; the loss
    costs a small fraction of a training step, so full precision is cheap here.
    """
    with torch.autocast(device_type=device.type, enabled=False):
        if device.type != "cuda":
            yield
            return
        flags = torch.backends.cuda.matmul
        name = "fp32_precision" if hasattr(flags, "fp32_precision") else "allow_tf32"
        previous = getattr(flags, name)
        setattr(flags, name, "ieee" if name == "fp32_precision" else False)
        try:
            yield
        finally:
            setattr(flags, name, previous)


def _compute_dtype(z: Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def choose_path(n: int, dim: int, kernel: RotationInvariantKernel) -> str:
    """The cheapest exact path for n embeddings of dimension ``dim`` (what ``auto`` uses).

    Moments when ψ has degree ≤ 1 (O(n·q)), or degree 2 and q < n (n·q² < n²·q flops) with a
    small q × q matrix; dense while the Gram matrix stays small; blocked beyond.
    """
    return path_for_degree(n, dim, kernel.degree)


def path_for_degree(n: int, dim: int, degree: int | None) -> str:
    """:func:`choose_path` for a kernel of polynomial degree ``degree`` (None: not a
    polynomial), without the kernel itself (the memory estimator's case)."""
    small_second_moment = dim * dim <= DENSE_MAX_ENTRIES
    if degree is not None and (degree <= 1 or (degree == 2 and dim < n and small_second_moment)):
        return "moments"
    return "dense" if n * n <= DENSE_MAX_ENTRIES else "blocked"


def default_block_size(n: int) -> int:
    return max(1, min(n, BLOCK_ENTRIES // max(n, 1)))


def mmd_to_uniform(
    z: Tensor,
    kernel: RotationInvariantKernel,
    path: str = "auto",
    block_size: int | None = None,
) -> Tensor:
    """MMD²(empirical law of the rows of z, uniform law on S^{q−1}) under ``kernel``.

    Args:
        z: (n, q) embeddings, rows on the unit sphere (normalise first). Any float dtype;
            bf16/fp16 are computed in float32.
        kernel: a :class:`RotationInvariantKernel` (e.g. ``SFRIKKernel()``).
        path: ``"auto"`` | ``"dense"`` | ``"blocked"`` | ``"moments"`` (see the module doc).
        block_size: rows per block for ``"blocked"`` (default: about 4M Gram entries a block).

    Returns:
        A scalar tensor (float32, or float64 for float64 input), differentiable in z; ≥ 0 up to
        rounding for rows on the sphere.

    >>> z = torch.nn.functional.normalize(torch.randn(256, 128), dim=1)
    >>> loss = mmd_to_uniform(z, SFRIKKernel())  # ≈ ψ(1)/n = 81/256 for uniform points
    """
    if path not in PATHS:
        raise ValueError(f"unknown MMD path {path!r}; choose one of {', '.join(PATHS)}")
    if not isinstance(kernel, RotationInvariantKernel):
        raise TypeError(
            f"kernel must be a RotationInvariantKernel (e.g. SFRIKKernel()), got {type(kernel)}"
        )
    if z.dim() != 2 or z.shape[0] < 1 or z.shape[1] < 2:
        raise ValueError(
            f"z must be a 2-D tensor (n >= 1 embeddings × q >= 2 dims), got shape {tuple(z.shape)}"
        )
    if not z.is_floating_point():
        raise TypeError(f"z must be a floating-point tensor, got {z.dtype}")
    n, dim = z.shape
    if path == "auto":
        path = choose_path(n, dim, kernel)
    if block_size is not None and (int(block_size) != block_size or block_size < 1):
        raise ValueError(f"block_size must be a positive integer, got {block_size}")

    with exact_fp32(z.device):
        z = z.to(_compute_dtype(z))
        if path == "moments":
            return _moments_mmd(z, kernel)
        if path == "dense":
            return _GramMMD.apply(z, kernel, n, True)
        return _GramMMD.apply(z, kernel, int(block_size or default_block_size(n)), False)


#: Rows per chunk of the moments path: each chunk's ZᵀZ is an fp32 GEMM, the chunks are summed
#: in float64, so C's rounding error does not grow with n.
MOMENT_CHUNK_ROWS = 256


def _moments_mmd(z: Tensor, kernel: RotationInvariantKernel) -> Tensor:
    dim = z.shape[1]
    coeffs = kernel.monomial_coefficients(dim)
    if coeffs is None or len(coeffs) > 3:
        raise ValueError(
            f"the moments path needs a kernel of degree <= 2, and {kernel!r} has degree "
            f"{kernel.degree}; use path='dense', 'blocked' or 'auto'"
        )
    c0, c1, c2 = [*coeffs, 0.0, 0.0][:3]
    # (1/n²)Σψ(G) − b0 = (c0 + c2/q − b0) + c1‖m‖² + c2(‖C‖² − 1/q); the constant is exact.
    constant = c0 + c2 / dim - kernel.b0(dim)
    return _MomentsMMD.apply(z, c1, c2, constant)


class _MomentsMMD(torch.autograd.Function):
    """c1‖m‖² + c2(‖C‖²_F − 1/q) + constant, m = mean z, C = ZᵀZ/n, moments summed in float64.

    ‖C‖² − 1/q is evaluated as ‖D‖² + 2·tr(D)/q with D = C − I/q (no cancellation), and the
    gradient (2c1/n)·m + (4c2/n)·Z·C is written out, so it stays fp32 under autocast too.
    """

    @staticmethod
    def forward(ctx, z: Tensor, c1: float, c2: float, constant: float):
        n, dim = z.shape
        total = torch.zeros(dim, dtype=torch.float64, device=z.device)
        second = torch.zeros(dim, dim, dtype=torch.float64, device=z.device) if c2 else None
        squares = torch.zeros(dim, dtype=torch.float64, device=z.device)
        for chunk in z.split(MOMENT_CHUNK_ROWS):
            total += chunk.sum(dim=0, dtype=torch.float64)
            if c2:
                second += torch.mm(chunk.t(), chunk)
                squares += chunk.double().pow(2).sum(dim=0)
        if c2:  # the diagonal (≈ n/q each) is where fp32 GEMM rounding piles up: take it exactly
            second.diagonal().copy_(squares)
        mean = total / n
        value = constant + c1 * mean.dot(mean)
        if c2:
            second /= n  # C
            centred = second.clone()
            centred.diagonal().sub_(1.0 / dim)  # D = C − I/q
            value = value + c2 * (centred.pow(2).sum() + (2.0 / dim) * centred.diagonal().sum())
            second = second.to(z.dtype)
        ctx.save_for_backward(z, mean.to(z.dtype), second)
        ctx.c1, ctx.c2 = c1, c2
        return value.to(z.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        z, mean, second = ctx.saved_tensors
        n = z.shape[0]
        with exact_fp32(z.device):
            grad_out = grad_out.to(z.dtype)
            grad = (grad_out * (2.0 * ctx.c1 / n) * mean).expand_as(z)
            if ctx.c2:
                grad = torch.mm(z, second).mul_(grad_out * (4.0 * ctx.c2 / n)).add_(grad)
        return grad.contiguous(), None, None, None


def _psi_sum(g: Tensor, kernel: RotationInvariantKernel, dim: int) -> Tensor:
    return kernel.value(g, dim).sum(dtype=torch.float64)


class _GramMMD(torch.autograd.Function):
    """MMD² over Gram rows in blocks of ``block``; ``dense`` keeps ψ'(G) for the backward."""

    @staticmethod
    def forward(ctx, z: Tensor, kernel: RotationInvariantKernel, block: int, dense: bool):
        n, dim = z.shape
        total = torch.zeros((), dtype=torch.float64, device=z.device)
        keep = dense and ctx.needs_input_grad[0]
        if keep:
            gram = torch.mm(z, z.t())
            rows = default_block_size(n)  # evaluate ψ, ψ' in chunks to bound the temporaries
            for start in range(0, n, rows):
                chunk = gram[start : start + rows]
                total += _psi_sum(chunk, kernel, dim)
                chunk.copy_(kernel.derivative(chunk, dim))  # the Gram buffer now holds ψ'(G)
            ctx.save_for_backward(z, gram)
        else:
            for start in range(0, n, block):
                total += _psi_sum(torch.mm(z[start : start + block], z.t()), kernel, dim)
            ctx.save_for_backward(z)
        ctx.kernel, ctx.block, ctx.dense = kernel, block, keep
        return (total / (n * n) - kernel.b0(dim)).to(z.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        n, dim = ctx.saved_tensors[0].shape
        scale = grad_out.to(ctx.saved_tensors[0].dtype) * (2.0 / (n * n))
        with exact_fp32(grad_out.device):
            if ctx.dense:
                z, dpsi = ctx.saved_tensors
                return torch.mm(dpsi, z).mul_(scale), None, None, None
            (z,) = ctx.saved_tensors
            grad = torch.empty_like(z)
            for start in range(0, n, ctx.block):
                dpsi = ctx.kernel.derivative(torch.mm(z[start : start + ctx.block], z.t()), dim)
                torch.mm(dpsi, z, out=grad[start : start + ctx.block])
            return grad.mul_(scale), None, None, None


def expected_mmd_uniform(kernel: RotationInvariantKernel, n: int, dim: int) -> float:
    """E[MMD²] for n i.i.d. uniform points on S^{dim−1}: (ψ(1) − b_0)/n (diagonal terms only)."""
    psi1 = float(kernel.value(torch.ones((), dtype=torch.float64), dim))
    return (psi1 - kernel.b0(dim)) / n


__all__ = ["PATHS", "choose_path", "expected_mmd_uniform", "mmd_to_uniform"]
