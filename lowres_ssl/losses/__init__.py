"""The loss library: Gegenbauer polynomials, rotation-invariant kernels, MMD to the uniform law
on the sphere (dense, blocked and moments paths), the SFRIK objective and its baselines.

>>> from lowres_ssl.losses import SFRIKLoss, build_objective
>>> loss_fn = build_objective("sfrik", lam=2.048)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .baselines import BarlowTwinsLoss, SimCLRLoss, UniformityLoss, VICRegLoss
from .distributed import gather_views, gather_with_grad, world_size
from .gegenbauer import gegenbauer, gegenbauer_series
from .kernels import GaussianKernel, PolynomialKernel, RotationInvariantKernel, SFRIKKernel
from .mmd import choose_path, expected_mmd_uniform, mmd_to_uniform
from .sfrik import SFRIKLoss

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


__all__ = [
    "OBJECTIVES",
    "BarlowTwinsLoss",
    "GaussianKernel",
    "PolynomialKernel",
    "RotationInvariantKernel",
    "SFRIKKernel",
    "SFRIKLoss",
    "SimCLRLoss",
    "UniformityLoss",
    "VICRegLoss",
    "build_objective",
    "choose_path",
    "expected_mmd_uniform",
    "gather_views",
    "gather_with_grad",
    "gegenbauer",
    "gegenbauer_series",
    "mmd_to_uniform",
    "world_size",
]
