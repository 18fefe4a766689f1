"""What every backbone is, whichever class builds it: the kit's ResNet
(:class:`~lowres_ssl.models.backbones.ResNetBackbone`) or a timm/torchvision model
(:class:`~lowres_ssl.models.library.LibraryBackbone`). Code that takes any backbone (evaluation,
the weights' files) annotates it :class:`Backbone`, not one of the two classes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class Backbone(Protocol):
    """A :class:`torch.nn.Module` mapping images (B, 3, H, W) to features (B, ``out_dim``).

    Attributes:
        name: what :func:`~lowres_ssl.models.build_backbone` builds it from (``resnet18``,
            ``timm/<model>``, ``torchvision/<model>``).
        out_dim: the width of its features.
        cifar_stem: whether its stem keeps the resolution of small images (a 3×3 stride-1
            convolution, no max-pool).
        grad_checkpointing: whether each stage is recomputed in backward (may be switched).
    """

    name: str
    out_dim: int
    cifar_stem: bool
    grad_checkpointing: bool

    def __call__(self, images: Tensor) -> Tensor: ...

    def stages(self) -> list[tuple[str, nn.Module]]:
        """Its stages in order, by name: the units of checkpointing and of activation counts."""
        ...

    def library_state(self) -> dict[str, Tensor]:
        """Its weights under its library's own names (what an export writes)."""
        ...

    # The torch.nn.Module methods that the call sites use.
    def to(self, *args: Any, **kwargs: Any) -> Any: ...

    def eval(self) -> Any: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = ...) -> Any: ...


__all__ = ["Backbone"]
