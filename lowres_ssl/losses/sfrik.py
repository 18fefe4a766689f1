"""The SFRIK objective (Zheng, Puy, Riccietti, Pérez, Gribonval, ICLR 2023)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_views, fp32
from .distributed import gather_views
from .kernels import RotationInvariantKernel, SFRIKKernel
from .mmd import mmd_to_uniform
from .views import ViewLayout, mean_over, over_pairs


class SFRIKLoss(nn.Module):
    """Invariance + MMD to the uniform law on the sphere, with a rotation-invariant kernel.

    With ẑ = z/‖z‖ (rows, float32) and MMD² from :func:`mmd_to_uniform`, the paper's form is

        L = (1/n)·Σ_i ‖ẑ¹_i − ẑ²_i‖² + (λ/2)·(MMD²(ẑ¹, U) + MMD²(ẑ², U)).

    The official code writes ``sim·mean((ẑ¹ − ẑ²)²) + mmd·(MMD²(ẑ¹) + MMD²(ẑ²))/2`` with the
    mean over all n·q entries: pass ``sim_coeff`` and ``mmd_coeff`` to get exactly that value
    (it is the paper's form times sim/q, with λ = mmd·q/sim). The official recipes change sim
    with q (4000 at q = 8192, 40000 at q = 32768), so λ does change with q:
    :func:`default_lam` follows them.

    **Multi-crop** (``layout``, :mod:`lowres_ssl.losses.views`): with K views and anchors A, the
    invariance is the mean over the anchors a of the mean over the other views v of
    (1/n)·Σ_i ‖ẑᵃ_i − ẑᵛ_i‖², and the MMD term the mean of MMD²(ẑᵛ, U) over the anchors (over
    every view with ``reg_small``): the official code's SwAV and OBoW forms. The default layout
    is two views, both anchors: the formula above.

    Under torch.distributed the MMD uses the embeddings of all processes (see
    :mod:`lowres_ssl.losses.distributed`; one collective for all regularised views); the
    invariance term is local.

    Args:
        lam: λ (default 8192/4000 = 2.048, the paper's q = 8192, sim = 4000; the trainer
            passes :func:`default_lam` of its q).
        kernel: the kernel (default ``SFRIKKernel((1, 40, 40))``).
        sim_coeff, mmd_coeff: the official code's coefficients, instead of ``lam``.
        mmd_path, block_size: passed to :func:`mmd_to_uniform`.
        layout: the views and anchors (default: two views).

    Shapes: ``loss_fn(z1, z2, *crops)``, each (n, q) raw projector outputs (any float dtype),
    as many as the layout's views → scalar float32 loss. After each call, ``self.terms`` holds
    the detached ``invariance`` and ``mmd`` terms (``mmd`` is (MMD²(ẑ¹) + MMD²(ẑ²))/2 at two
    views).

    >>> loss_fn = SFRIKLoss()
    >>> loss = loss_fn(torch.randn(256, 8192), torch.randn(256, 8192))
    """

    def __init__(
        self,
        lam: float | None = None,
        kernel: RotationInvariantKernel | None = None,
        *,
        sim_coeff: float | None = None,
        mmd_coeff: float | None = None,
        mmd_path: str = "auto",
        block_size: int | None = None,
        layout: ViewLayout | None = None,
    ):
        super().__init__()
        official = sim_coeff is not None or mmd_coeff is not None
        if official and (sim_coeff is None or mmd_coeff is None or lam is not None):
            raise ValueError(
                "give either lam (the paper's form) or both sim_coeff and mmd_coeff "
                "(the official code's form), not a mix"
            )
        if lam is None and not official:
            lam = 8192 / 4000
        for name, value in (("lam", lam), ("sim_coeff", sim_coeff), ("mmd_coeff", mmd_coeff)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.lam, self.sim_coeff, self.mmd_coeff = lam, sim_coeff, mmd_coeff
        self.kernel = kernel if kernel is not None else SFRIKKernel()
        self.mmd_path, self.block_size = mmd_path, block_size
        self.layout = layout or ViewLayout()
        self.terms: dict[str, Tensor] = {}

    def forward(self, *views: Tensor) -> Tensor:
        return self.loss_with(views, self.regulariser)

    def loss_with(self, views: tuple[Tensor, ...], regulariser) -> Tensor:
        """The loss of ``views`` with ``regulariser`` (normalised float32 views → the MMD term)
        in place of :meth:`regulariser`: the one place a variant (a memory) changes the MMD."""
        check_views(*views)
        self.layout.check(views, type(self).__name__)
        with torch.autocast(device_type=views[0].device.type, enabled=False):
            z = [F.normalize(fp32(v), dim=1) for v in views]
            invariance = over_pairs(self.layout, lambda a, b: (z[a] - z[b]).pow(2).sum(1).mean())
            mmd = regulariser(z)
            if self.lam is not None:
                loss = invariance + self.lam * mmd
            else:
                loss = (self.sim_coeff / z[0].shape[1]) * invariance + self.mmd_coeff * mmd
        self.terms = {"invariance": invariance.detach(), "mmd": mmd.detach()}
        return loss

    def regulariser(self, z: list[Tensor]) -> Tensor:
        """The mean over the regularised views of MMD²(ẑᵛ, U), each view gathered across
        processes (one collective for all)."""
        regularised = self.layout.regularised
        *gathered, _ = gather_views(*(z[v] for v in regularised))
        gathered = dict(zip(regularised, gathered, strict=True))
        return mean_over(
            regularised,
            lambda v: mmd_to_uniform(gathered[v], self.kernel, self.mmd_path, self.block_size),
        )

    def extra_repr(self) -> str:
        if self.lam is not None:
            return f"lam={self.lam}, kernel={self.kernel!r}, mmd_path={self.mmd_path!r}"
        return (
            f"sim_coeff={self.sim_coeff}, mmd_coeff={self.mmd_coeff}, kernel={self.kernel!r}, "
            f"mmd_path={self.mmd_path!r}"
        )


def default_lam(q: int) -> float:
    """λ for embeddings of width ``q`` when the config leaves it unset: the official recipes'
    λ = mmd·q/sim (mmd = 1). Up to q = 8192 their fixed sim = 4000 (λ = q/4000: 0.512 at
    q = 2048, 2.048 at 8192); from q = 32768 on, sim = 40000 (0.82 at 32768); in between, sim
    grows log-linearly with q (λ ≈ 1.30 at q = 16384: interpolated, not a published recipe).
    ``docs/benchmarks/recipes.md`` has the measurements at the ``cpu`` preset's scale."""
    if q <= 8192:
        return q / 4000
    if q >= 32768:
        return q / 40000
    sim = 4000 * 10 ** (math.log(q / 8192) / math.log(4))
    return q / sim
