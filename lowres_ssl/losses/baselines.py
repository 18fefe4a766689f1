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

**Multi-crop**: each objective takes a ``layout`` (:class:`~lowres_ssl.losses.views.ViewLayout`:
K views, the anchors, ``reg_small``) and is called with its K views. Pairwise terms are
averaged over the layout's pairs (anchor a against every other view, averaged over a), per-view
batch statistics over its regularised views (the anchors, or all with ``reg_small``); each
class says which of its terms is which. The default layout, two views, gives the published
two-view formulas exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_views, fp32
from .distributed import gather_views
from .views import ViewLayout, mean_over, over_pairs, weighted_sum


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


def _sum_times(terms: list[Tensor], factor: float) -> Tensor:
    """``factor``·Σ terms, summed in order (``t0 + t1`` itself where the factor is 1)."""
    total = weighted_sum([(t, 1) for t in terms])
    return total if factor == 1 else total * factor


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

    Multi-crop: s averaged over the layout's pairs; v the mean over the regularised views,
    c twice that mean (so that two views keep c(z¹) + c(z²)).

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
        layout: ViewLayout | None = None,
    ):
        super().__init__()
        self.layout = layout or ViewLayout()
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

    def forward(self, *views: Tensor) -> Tensor:
        check_views(*views)
        self.layout.check(views, "VICRegLoss")
        with torch.autocast(device_type=views[0].device.type, enabled=False):
            z = [fp32(v) for v in views]
            invariance = over_pairs(self.layout, lambda a, b: (z[a] - z[b]).pow(2).mean())
            regularised = self.layout.regularised
            *gathered, _ = gather_views(*(z[v] for v in regularised))
            _check_batch(gathered[0].shape[0], "VICRegLoss")
            stats = dict(zip(regularised, map(self._variance_covariance, gathered), strict=True))
            variance = mean_over(regularised, lambda v: stats[v][0])
            covariance = _sum_times([stats[v][1] for v in regularised], 2 / len(regularised))
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

    Multi-crop: L averaged over the layout's pairs (each pair's own C).

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

    def __init__(
        self, lambda_offdiag: float = 0.0051, eps: float = 1e-5, layout: ViewLayout | None = None
    ):
        super().__init__()
        self.layout = layout or ViewLayout()
        _check_coeff("lambda_offdiag", lambda_offdiag)
        _check_coeff("eps", eps, positive=True)
        self.lambda_offdiag, self.eps = lambda_offdiag, eps
        self.terms: dict[str, Tensor] = {}

    def _standardise(self, z: Tensor) -> Tensor:
        centred = z - z.mean(dim=0)
        return centred / torch.sqrt(centred.pow(2).mean(dim=0) + self.eps)

    def forward(self, *views: Tensor) -> Tensor:
        check_views(*views)
        self.layout.check(views, "BarlowTwinsLoss")
        with torch.autocast(device_type=views[0].device.type, enabled=False):
            *gathered, _ = gather_views(*(fp32(v) for v in views))
            n = gathered[0].shape[0]
            _check_batch(n, "BarlowTwinsLoss")
            used = sorted({v for a, b, _ in self.layout.pairs() for v in (a, b)})
            s = {v: self._standardise(gathered[v]) for v in used}
            c = {(a, b): s[a].T @ s[b] / n for a, b, _ in self.layout.pairs()}
            on_diagonal = over_pairs(
                self.layout, lambda a, b: (1 - c[a, b].diagonal()).pow(2).sum()
            )
            off_diagonal = over_pairs(self.layout, lambda a, b: _off_diagonal_square_sum(c[a, b]))
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

    Multi-crop: the alignment averaged over the layout's pairs, the uniformity over its
    regularised views.

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
        layout: ViewLayout | None = None,
    ):
        super().__init__()
        self.layout = layout or ViewLayout()
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

    def _alignment(self, z1: Tensor, z2: Tensor) -> Tensor:
        if self.alpha == 2:
            return (z1 - z2).pow(2).sum(dim=1).mean()
        # At ẑ¹_i = ẑ²_i, d^α has an infinite (α < 1) or undefined (α = 1) derivative; the
        # double where gives it the gradient 0 there instead of NaN.
        distance = torch.linalg.vector_norm(z1 - z2, dim=1)
        apart = distance > 0
        safe = torch.where(apart, distance, torch.ones_like(distance))
        return torch.where(apart, safe.pow(self.alpha), 0.0).mean()

    def forward(self, *views: Tensor) -> Tensor:
        check_views(*views)
        self.layout.check(views, "UniformityLoss")
        with torch.autocast(device_type=views[0].device.type, enabled=False):
            z = [F.normalize(fp32(v), dim=1) for v in views]
            alignment = over_pairs(self.layout, lambda a, b: self._alignment(z[a], z[b]))
            regularised = self.layout.regularised
            *gathered, _ = gather_views(*(z[v] for v in regularised))
            _check_batch(gathered[0].shape[0], "UniformityLoss")
            gathered = dict(zip(regularised, gathered, strict=True))
            uniformity = mean_over(regularised, lambda v: self._uniformity(gathered[v]))
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

    Multi-crop, the official code's multi-view NCE: the K·n embeddings of K views; for each
    layout anchor c, every row of every other view v has its positive at the same image in view
    c and its negatives at the other images in every view (the same image's other views are
    left out); L is the mean over all such (row, c). Two views are the formula above.

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

    def __init__(self, temperature: float = 0.2, layout: ViewLayout | None = None):
        super().__init__()
        self.layout = layout or ViewLayout()
        _check_coeff("temperature", temperature, positive=True)
        self.temperature = temperature
        self.terms: dict[str, Tensor] = {}

    def forward(self, *views: Tensor) -> Tensor:
        check_views(*views)
        self.layout.check(views, "SimCLRLoss")
        n, device = views[0].shape[0], views[0].device
        with torch.autocast(device_type=device.type, enabled=False):
            z = [F.normalize(fp32(v), dim=1) for v in views]
            *gathered, offset = gather_views(*z)
            total = gathered[0].shape[0]
            _check_batch(total, "SimCLRLoss")
            candidates = torch.cat(gathered)  # (K·N, q): all of view 0, then view 1, …
            pairs = self.layout.positives()  # (row view v, positive view c)
            anchors = torch.cat([z[v] for v, _ in pairs])  # (P·n, q)
            logits = anchors @ candidates.T / self.temperature  # (P·n, K·N)
            rows = torch.arange(n, device=device) + offset
            left_out = torch.zeros_like(logits, dtype=torch.bool)
            for i, (_, c) in enumerate(pairs):
                block = torch.arange(i * n, (i + 1) * n, device=device)
                for w in range(len(z)):
                    if w != c:  # the same image in a view other than the positive's
                        left_out[block, rows + w * total] = True
            logits = logits.masked_fill(left_out, float("-inf"))
            positive = torch.cat([rows + c * total for _, c in pairs])
            loss = F.cross_entropy(logits, positive)
            positive_similarity = over_pairs(
                self.layout, lambda a, b: (z[a] * z[b]).sum(dim=1).mean()
            )
        self.terms = {
            "nt_xent": loss.detach(),
            "positive_similarity": positive_similarity.detach(),
        }
        return loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
