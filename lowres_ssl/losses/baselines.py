"""The baselines that the SFRIK paper compares with: VICReg, Barlow Twins, alignment +
uniformity, and SimCLR (NT-Xent).

Every objective takes the two views' raw projector outputs z¹, z² (n × q, any float dtype),
computes in float32 (float64 stays float64) with autocast off, returns a scalar loss and
stores its separate detached terms in ``self.terms`` after each call.

Under torch.distributed (see :mod:`lowres_ssl.losses.distributed`) the batch statistics
(VICReg's variance and covariance, Barlow Twins' standardisation and cross-correlation, the
uniformity term, SimCLR's negatives) use the embeddings of all processes; the terms that are a
mean over the samples (VICReg's invariance, the alignment, SimCLR's mean over anchors) are
local. With equal local batches, the mean over processes of the losses is then the
one-process loss on the concatenated batch, and DistributedDataParallel's averaged gradients
are its gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_views, fp32
from .distributed import gather_views


def _check_coeff(name: str, value: float, *, positive: bool = False) -> None:
    """One-line ValueError unless ``value`` is finite and ≥ 0 (or > 0 with ``positive``)."""
    valid = math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not valid:
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")


def _check_batch(n: int, name: str) -> None:
    """The batch statistics need two samples; ``n`` is the (gathered) batch size."""
    if n < 2:
        raise ValueError(f"{name} needs a batch of at least 2 samples, got {n}")


def _off_diagonal_square_sum(m: Tensor) -> Tensor:
    """Σ_{i≠j} m_ij² for a square matrix, without forming Σ_ij m_ij² − Σ_i m_ii².

    Dropping the last entry of the row-major flattening leaves q² − 1 = (q − 1)(q + 1) entries
    in which the diagonal entries m_00 … m_(q−2)(q−2) sit every q + 1 places, starting at 0:
    as a (q − 1) × (q + 1) matrix they form its first column, and m_(q−1)(q−1) was dropped.
    """
    q = m.shape[0]
    return m.reshape(-1)[:-1].reshape(q - 1, q + 1)[:, 1:].pow(2).sum()


class VICRegLoss(nn.Module):
    """Variance-Invariance-Covariance regularisation (Bardes, Ponce, LeCun, ICLR 2022).

    On the raw embeddings z (n × q), with z̄ = z − mean_batch(z), S_j(z) = √(Var(z_j) + ε)
    (unbiased variance) and C(z) = z̄ᵀz̄ / (n − 1):

        s(z¹, z²) = (1/(n·q))·Σ_i Σ_j (z¹_ij − z²_ij)²
        v(z)      = (1/q)·Σ_j max(0, 1 − S_j(z))
        c(z)      = (1/q)·Σ_{i≠j} C(z)_ij²

        L = inv_coeff·s + var_coeff·(v(z¹) + v(z²))/2 + cov_coeff·(c(z¹) + c(z²)).

    The paper's equation writes μ·(v(z¹) + v(z²)); the official code, with which its defaults
    λ = μ = 25, ν = 1 were run, averages the two variance terms and sums the two covariance
    terms. This module follows the code, so its value is the published one.

    Under torch.distributed, v and c use the embeddings of all processes (n is then the
    global batch size, as with the official code's full gather); s is local.

    Args:
        inv_coeff: λ, weight of the invariance term (default 25).
        var_coeff: μ, weight of the variance term (default 25).
        cov_coeff: ν, weight of the covariance term (default 1).
        eps: ε inside the square root of the variance (default 1e-4).

    Shapes: z1, z2 (n, q) raw projector outputs (any float dtype, n ≥ 2) → scalar float32
    loss. After each call, ``self.terms`` holds the detached ``invariance`` (s),
    ``variance`` ((v(z¹) + v(z²))/2) and ``covariance`` (c(z¹) + c(z²)), unweighted.

    >>> loss_fn = VICRegLoss()
    >>> loss = loss_fn(torch.randn(256, 2048), torch.randn(256, 2048))
    """

    def __init__(
        self,
        inv_coeff: float = 25.0,
        var_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        eps: float = 1e-4,
    ):
        super().__init__()
        for name, value in (
            ("inv_coeff", inv_coeff),
            ("var_coeff", var_coeff),
            ("cov_coeff", cov_coeff),
        ):
            _check_coeff(name, value)
        _check_coeff("eps", eps, positive=True)
        self.inv_coeff, self.var_coeff, self.cov_coeff, self.eps = (
            inv_coeff,
            var_coeff,
            cov_coeff,
            eps,
        )
        self.terms: dict[str, Tensor] = {}

    def _variance_covariance(self, z: Tensor) -> tuple[Tensor, Tensor]:
        n, q = z.shape
        centred = z - z.mean(dim=0)
        cov = centred.T @ centred / (n - 1)
        std = torch.sqrt(cov.diagonal() + self.eps)
        return F.relu(1 - std).mean(), _off_diagonal_square_sum(cov) / q

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        check_views(z1, z2)
        with torch.autocast(device_type=z1.device.type, enabled=False):
            z1, z2 = fp32(z1), fp32(z2)
            invariance = (z1 - z2).pow(2).mean()
            all1, all2, _ = gather_views(z1, z2)
            _check_batch(all1.shape[0], "VICRegLoss")
            (var1, cov1), (var2, cov2) = (self._variance_covariance(v) for v in (all1, all2))
            variance = (var1 + var2) / 2
            covariance = cov1 + cov2
            loss = (
                self.inv_coeff * invariance
                + self.var_coeff * variance
                + self.cov_coeff * covariance
            )
        self.terms = {
            "invariance": invariance.detach(),
            "variance": variance.detach(),
            "covariance": covariance.detach(),
        }
        return loss

    def extra_repr(self) -> str:
        return (
            f"inv_coeff={self.inv_coeff}, var_coeff={self.var_coeff}, "
            f"cov_coeff={self.cov_coeff}, eps={self.eps}"
        )


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins: cross-correlation close to the identity (Zbontar et al., ICML 2021).

    Each view is standardised along the batch as by a BatchNorm without affine parameters in
    training mode, ẑ_j = (z_j − mean(z_j)) / √(Var(z_j) + ε) with the biased variance, and

        C = (ẑ¹)ᵀ ẑ² / n        (q × q)

        L = Σ_i (1 − C_ii)² + λ·Σ_{i≠j} C_ij².

    Under torch.distributed the means, variances and C use the embeddings of all processes
    (the official code's SyncBatchNorm and all-reduced C), so every process computes the
    loss of the global batch.

    Args:
        lambda_offdiag: λ, weight of the off-diagonal (redundancy) term (default 0.0051, the
            paper's value for q = 8192).
        eps: ε of the standardisation (default 1e-5, BatchNorm's).

    Shapes: z1, z2 (n, q) raw projector outputs (any float dtype, n ≥ 2) → scalar float32
    loss. After each call, ``self.terms`` holds the detached ``on_diagonal`` Σ_i (1 − C_ii)²
    and ``off_diagonal`` Σ_{i≠j} C_ij² (unweighted).

    >>> loss_fn = BarlowTwinsLoss()
    >>> loss = loss_fn(torch.randn(256, 2048), torch.randn(256, 2048))
    """

    def __init__(self, lambda_offdiag: float = 0.0051, eps: float = 1e-5):
        super().__init__()
        _check_coeff("lambda_offdiag", lambda_offdiag)
        _check_coeff("eps", eps, positive=True)
        self.lambda_offdiag, self.eps = lambda_offdiag, eps
        self.terms: dict[str, Tensor] = {}

    def _standardise(self, z: Tensor) -> Tensor:
        centred = z - z.mean(dim=0)
        return centred / torch.sqrt(centred.pow(2).mean(dim=0) + self.eps)

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        check_views(z1, z2)
        with torch.autocast(device_type=z1.device.type, enabled=False):
            all1, all2, _ = gather_views(fp32(z1), fp32(z2))
            n = all1.shape[0]
            _check_batch(n, "BarlowTwinsLoss")
            s1, s2 = self._standardise(all1), self._standardise(all2)
            c = s1.T @ s2 / n
            on_diagonal = (1 - c.diagonal()).pow(2).sum()
            off_diagonal = _off_diagonal_square_sum(c)
            loss = on_diagonal + self.lambda_offdiag * off_diagonal
        self.terms = {"on_diagonal": on_diagonal.detach(), "off_diagonal": off_diagonal.detach()}
        return loss

    def extra_repr(self) -> str:
        return f"lambda_offdiag={self.lambda_offdiag}, eps={self.eps}"


class UniformityLoss(nn.Module):
    """Alignment and uniformity on the hypersphere (Wang & Isola, ICML 2020).

    With ẑ = z/‖z‖ (rows),

        align      = (1/n)·Σ_i ‖ẑ¹_i − ẑ²_i‖^α
        uniform(ẑ) = log( (1/(n(n−1)))·Σ_{i≠j} exp(−t·‖ẑ_i − ẑ_j‖²) )

        L = align_weight·align + unif_weight·(uniform(ẑ¹) + uniform(ẑ²))/2.

    ‖ẑ_i − ẑ_j‖² is computed as 2 − 2⟨ẑ_i, ẑ_j⟩ from the Gram matrix (n × n memory) and the
    log of the mean as a logsumexp, stable for any t.

    Under torch.distributed the uniformity uses the embeddings of all processes (n is then
    the global batch size); the alignment is local.

    Args:
        align_weight: weight of the alignment term (default 1).
        unif_weight: weight of the uniformity term (default 1).
        alpha: α > 0, exponent of the alignment distance (default 2, the paper's choice).
        t: t > 0, scale of the Gaussian potential (default 2, the paper's choice).

    Shapes: z1, z2 (n, q) raw projector outputs (any float dtype, n ≥ 2) → scalar float32
    loss. After each call, ``self.terms`` holds the detached ``alignment`` and
    ``uniformity`` ((uniform(ẑ¹) + uniform(ẑ²))/2) terms.

    >>> loss_fn = UniformityLoss()
    >>> loss = loss_fn(torch.randn(256, 128), torch.randn(256, 128))
    """

    def __init__(
        self,
        align_weight: float = 1.0,
        unif_weight: float = 1.0,
        alpha: float = 2.0,
        t: float = 2.0,
    ):
        super().__init__()
        _check_coeff("align_weight", align_weight)
        _check_coeff("unif_weight", unif_weight)
        _check_coeff("alpha", alpha, positive=True)
        _check_coeff("t", t, positive=True)
        self.align_weight, self.unif_weight, self.alpha, self.t = (
            align_weight,
            unif_weight,
            alpha,
            t,
        )
        self.terms: dict[str, Tensor] = {}

    def _uniformity(self, z: Tensor) -> Tensor:
        n = z.shape[0]
        # −t‖ẑ_i − ẑ_j‖² = 2t(⟨ẑ_i, ẑ_j⟩ − 1); the diagonal (i = j) is left out.
        exponent = (2 * self.t) * (z @ z.T - 1)
        diagonal = torch.eye(n, dtype=torch.bool, device=z.device)
        exponent = exponent.masked_fill(diagonal, float("-inf"))
        return torch.logsumexp(exponent.reshape(-1), dim=0) - math.log(n * (n - 1))

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        check_views(z1, z2)
        with torch.autocast(device_type=z1.device.type, enabled=False):
            z1 = F.normalize(fp32(z1), dim=1)
            z2 = F.normalize(fp32(z2), dim=1)
            if self.alpha == 2:
                alignment = (z1 - z2).pow(2).sum(dim=1).mean()
            else:
                # At ẑ¹_i = ẑ²_i, d^α has an infinite (α < 1) or undefined (α = 1) derivative;
                # the double where gives it the gradient 0 there instead of NaN.
                distance = torch.linalg.vector_norm(z1 - z2, dim=1)
                apart = distance > 0
                safe = torch.where(apart, distance, torch.ones_like(distance))
                alignment = torch.where(apart, safe.pow(self.alpha), 0.0).mean()
            all1, all2, _ = gather_views(z1, z2)
            _check_batch(all1.shape[0], "UniformityLoss")
            unif1, unif2 = self._uniformity(all1), self._uniformity(all2)
            uniformity = (unif1 + unif2) / 2
            loss = self.align_weight * alignment + self.unif_weight * uniformity
        self.terms = {"alignment": alignment.detach(), "uniformity": uniformity.detach()}
        return loss

    def extra_repr(self) -> str:
        return (
            f"align_weight={self.align_weight}, unif_weight={self.unif_weight}, "
            f"alpha={self.alpha}, t={self.t}"
        )


class SimCLRLoss(nn.Module):
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al.,
    ICML 2020).

    With ẑ = z/‖z‖ (rows), the 2n embeddings e = (ẑ¹_1 … ẑ¹_n, ẑ²_1 … ẑ²_n), sim(a, b) =
    ⟨e_a, e_b⟩ (cosine similarity) and p(a) the other view of the same sample,

        ℓ(a) = −log( exp(sim(a, p(a))/τ) / Σ_{b≠a} exp(sim(a, b)/τ) )

        L = (1/(2n))·Σ_a ℓ(a),

    so each anchor has one positive and 2n − 2 negatives, and both views serve as anchors.

    Under torch.distributed the anchors are this process's 2n embeddings and the candidates b
    are the 2N embeddings of all processes (2N − 2 negatives), as in SimCLR's cross-replica
    version.

    Args:
        temperature: τ > 0 (default 0.2; SimCLR used 0.1 on ImageNet with large batches, 0.5
            on CIFAR-10).

    Shapes: z1, z2 (n, q) raw projector outputs (any float dtype; a global batch of ≥ 2) →
    scalar float32 loss. After each call, ``self.terms`` holds the detached ``nt_xent`` (the
    loss) and ``positive_similarity`` (mean cosine of the local positive pairs).

    >>> loss_fn = SimCLRLoss(temperature=0.2)
    >>> loss = loss_fn(torch.randn(256, 128), torch.randn(256, 128))
    """

    def __init__(self, temperature: float = 0.2):
        super().__init__()
        _check_coeff("temperature", temperature, positive=True)
        self.temperature = temperature
        self.terms: dict[str, Tensor] = {}

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        check_views(z1, z2)
        n = z1.shape[0]
        with torch.autocast(device_type=z1.device.type, enabled=False):
            z1 = F.normalize(fp32(z1), dim=1)
            z2 = F.normalize(fp32(z2), dim=1)
            all1, all2, offset = gather_views(z1, z2)
            total = all1.shape[0]
            _check_batch(total, "SimCLRLoss")
            candidates = torch.cat([all1, all2])  # (2N, q): all views 1, then all views 2
            anchors = torch.cat([z1, z2])  # (2n, q)
            logits = anchors @ candidates.T / self.temperature  # (2n, 2N)
            rows = torch.arange(n, device=z1.device) + offset
            itself = torch.cat([rows, rows + total])
            positive = torch.cat([rows + total, rows])
            anchor_index = torch.arange(2 * n, device=z1.device)
            is_self = torch.zeros_like(logits, dtype=torch.bool)
            is_self[anchor_index, itself] = True
            logits = logits.masked_fill(is_self, float("-inf"))
            loss = F.cross_entropy(logits, positive)
            positive_similarity = (z1 * z2).sum(dim=1).mean()
        self.terms = {
            "nt_xent": loss.detach(),
            "positive_similarity": positive_similarity.detach(),
        }
        return loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
