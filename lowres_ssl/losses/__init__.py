"""The loss library: Gegenbauer polynomials, rotation-invariant kernels, MMD to the uniform law
on the sphere (dense, blocked and moments paths), the SFRIK objective and its baselines.

>>> from lowres_ssl.losses import SFRIKLoss, build_objective
>>> loss_fn = build_objective("sfrik", lam=2.048)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from lowres_ssl.errors import UserError

from .baselines import BarlowTwinsLoss, SimCLRLoss, UniformityLoss, VICRegLoss
from .distributed import gather_views, gather_with_grad, world_size
from .gegenbauer import gegenbauer, gegenbauer_series
from .kernels import GaussianKernel, PolynomialKernel, RotationInvariantKernel, SFRIKKernel
from .memory import MemorySFRIKLoss, mmd_with_memory
from .mmd import choose_path, expected_mmd_uniform, mmd_to_uniform
from .sfrik import SFRIKLoss, default_lam
from .views import LAYOUTS, ViewLayout

#: Objective name → class, for configs (``loss.name``).
OBJECTIVES: dict[str, type[nn.Module]] = {
    "sfrik": SFRIKLoss,
    "vicreg": VICRegLoss,
    "barlow_twins": BarlowTwinsLoss,
    "uniformity": UniformityLoss,
    "simclr": SimCLRLoss,
}


def build_objective(name: str, **kwargs: Any) -> nn.Module:
    """The objective called ``name`` (see :data:`OBJECTIVES`), built with ``kwargs``."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](**kwargs)


def objective_from_settings(
    name: str,
    *,
    lam: float | None = None,
    kernel_weights: Sequence[float] = (1.0, 40.0, 40.0),
    mmd_path: str = "auto",
    options: dict[str, Any] | None = None,
    q: int | None = None,
    layout: ViewLayout | None = None,
    memory: bool = False,
) -> nn.Module:
    """The objective of a config's ``loss`` section (its keys are the arguments): SFRIK with
    λ (unset: :func:`default_lam` of the embedding width ``q``, where given), kernel weights
    b_1..b_L and MMD path; another objective with ``options`` as its keyword arguments; every
    objective with the views' ``layout`` (default: two views); ``memory``: SFRIK that also
    takes a memory of earlier embeddings (:class:`MemorySFRIKLoss`, experimental). Settings
    that cannot work are a one-line :class:`UserError`."""
    options = options or {}
    official_form = {"sim_coeff", "mmd_coeff"} & set(options)
    if name == "sfrik" and lam is None and q is not None and not official_form:
        lam = default_lam(q)
    try:
        if name != "sfrik":
            return build_objective(name, layout=layout, **options)
        kernel = SFRIKKernel(list(kernel_weights))
        if mmd_path == "moments" and kernel.degree > 2:
            raise ValueError(
                f"mmd_path moments needs a kernel of degree <= 2, and kernel_weights "
                f"{list(kernel_weights)} has degree {kernel.degree}; use auto, dense or blocked"
            )
        sfrik = MemorySFRIKLoss if memory else SFRIKLoss
        return sfrik(lam, kernel, mmd_path=mmd_path, layout=layout, **options)
    except (ValueError, TypeError) as err:
        raise UserError(f"config section loss: {str(err).splitlines()[0]}") from None


__all__ = [
    "LAYOUTS",
    "OBJECTIVES",
    "BarlowTwinsLoss",
    "GaussianKernel",
    "MemorySFRIKLoss",
    "PolynomialKernel",
    "RotationInvariantKernel",
    "SFRIKKernel",
    "SFRIKLoss",
    "SimCLRLoss",
    "UniformityLoss",
    "VICRegLoss",
    "ViewLayout",
    "build_objective",
    "choose_path",
    "default_lam",
    "expected_mmd_uniform",
    "gather_views",
    "gather_with_grad",
    "gegenbauer",
    "gegenbauer_series",
    "mmd_to_uniform",
    "mmd_with_memory",
    "objective_from_settings",
    "world_size",
]
