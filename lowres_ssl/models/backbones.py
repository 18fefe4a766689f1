"""ResNet backbones for small images, with per-stage gradient checkpointing.

>>> backbone = build_backbone("resnet18", image_size=32)
>>> backbone(torch.randn(8, 3, 32, 32)).shape
torch.Size([8, 512])

The module keeps torchvision's child names (``conv1``, ``bn1``, ``layer1`` … ``layer4``), so its
state dict is torchvision's without the ``fc.*`` keys.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision import models as tv_models

from lowres_ssl.errors import UserError
from lowres_ssl.models.batchnorm import recompute_contexts
from lowres_ssl.models.library import LIBRARIES, LibraryBackbone, check_name, is_library_name
from lowres_ssl.small_images import SMALL_MAX

#: Backbone name → feature width (the length of the pooled feature vector).
BACKBONES: dict[str, int] = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
}

#: Images at most this many pixels on a side get the CIFAR stem (3x3 conv, no max-pool): the
#: small-image boundary of :mod:`lowres_ssl.small_images`, under the name the stem goes by.
CIFAR_STEM_MAX_SIZE = SMALL_MAX

_BUILDERS: dict[str, Callable[..., tv_models.ResNet]] = {
    "resnet18": tv_models.resnet18,
    "resnet34": tv_models.resnet34,
    "resnet50": tv_models.resnet50,
}

_STAGES = ("layer1", "layer2", "layer3", "layer4")


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without its classifier: images (B, 3, H, W) → features (B, out_dim).

    Args:
        name: one of :data:`BACKBONES`.
        image_size: the training image side in pixels; up to :data:`CIFAR_STEM_MAX_SIZE` px
            selects the CIFAR stem (3x3 stride-1 ``conv1``, no max-pool), larger sizes keep
            the ImageNet stem (7x7 stride-2 ``conv1`` + 3x3 stride-2 max-pool).
        grad_checkpointing: recompute each stage (``layer1`` … ``layer4``) in backward instead
            of keeping its activations; only in train mode with grad enabled. Running BN
            statistics and gradients are the same as without it.
        zero_init_residual: start each residual block's last BN at γ = 0 (each block is the
            identity at init), as VICReg / SFRIK's reference code does.
        cifar_stem: force the stem (a saved backbone keeps the stem it was trained with);
            None chooses by ``image_size``.

    Attributes:
        name: the backbone name, one of :data:`BACKBONES`.
        out_dim: the feature width (512 for resnet18/34, 2048 for resnet50).
        cifar_stem: whether the CIFAR stem is used.
        grad_checkpointing: may be switched after construction.

    Works with ``channels_last`` (``.to(memory_format=torch.channels_last)``) as it is.
    """

    def __init__(
        self,
        name: str,
        *,
        image_size: int,
        grad_checkpointing: bool = False,
        zero_init_residual: bool = True,
        cifar_stem: bool | None = None,
    ):
        super().__init__()
        if name not in BACKBONES:
            raise UserError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise UserError(f"image_size must be a positive number of pixels, got {image_size!r}")
        net = _BUILDERS[name](weights=None, zero_init_residual=zero_init_residual)
        self.name: str = name
        self.out_dim: int = BACKBONES[name]
        self.cifar_stem: bool = (
            image_size <= CIFAR_STEM_MAX_SIZE if cifar_stem is None else bool(cifar_stem)
        )
        self.grad_checkpointing: bool = grad_checkpointing
        if self.cifar_stem:
            # At 32–64 px the ImageNet stem's 4x downsampling throws away most of the image
            # before the first residual block; the CIFAR stem keeps full resolution.
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            # Same init torchvision gives its own convolutions (the default would differ).
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
            net.maxpool = nn.Identity()
        # Same names and order as torchvision's ResNet, so state-dict keys match its own.
        self.conv1 = net.conv1
        self.bn1 = net.bn1
        self.relu = net.relu
        self.maxpool = net.maxpool
        self.layer1 = net.layer1
        self.layer2 = net.layer2
        self.layer3 = net.layer3
        self.layer4 = net.layer4
        self.avgpool = net.avgpool
        # Identity (not deleted) so code that expects `.fc` on a ResNet still finds it.
        self.fc = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) → features (B, out_dim)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        use_checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for stage_name in _STAGES:
            stage: nn.Module = getattr(self, stage_name)
            if use_checkpoint and torch.compiler.is_compiling():
                # Compiled graphs apply buffer updates once, outside the recomputed region,
                # and torch.compile rejects a context_fn that is not a TorchDispatchMode.
                x = checkpoint(stage, x, use_reentrant=False)
            elif use_checkpoint:
                x = checkpoint(
                    stage,
                    x,
                    use_reentrant=False,
                    context_fn=functools.partial(recompute_contexts, stage),
                )
            else:
                x = stage(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def stages(self) -> list[tuple[str, nn.Module]]:
        """The checkpointed units, ``layer1`` … ``layer4``."""
        return [(name, getattr(self, name)) for name in _STAGES]

    def library_state(self) -> dict[str, Tensor]:
        """The state dict: torchvision's ResNet keys without ``fc.*``."""
        return self.state_dict()

    def extra_repr(self) -> str:
        return (
            f"out_dim={self.out_dim}, cifar_stem={self.cifar_stem}, "
            f"grad_checkpointing={self.grad_checkpointing}"
        )


def build_backbone(
    name: str,
    *,
    image_size: int,
    grad_checkpointing: bool = False,
    zero_init_residual: bool = True,
    cifar_stem: bool | None = None,
    kwargs: dict | None = None,
) -> nn.Module:
    """The backbone ``name`` for ``image_size``-pixel images, randomly initialised: one of
    :data:`BACKBONES` (a :class:`ResNetBackbone`), or ``timm/<model>`` / ``torchvision/<model>``
    (a :class:`~lowres_ssl.models.library.LibraryBackbone`, built with ``kwargs``).

    Maps (B, 3, H, W) → (B, out_dim); every backbone has ``name``, ``out_dim``,
    ``cifar_stem``, a switchable ``grad_checkpointing``, ``stages()`` and ``library_state()``.
    """
    if is_library_name(name):
        return LibraryBackbone(
            name, image_size=image_size, grad_checkpointing=grad_checkpointing,
            cifar_stem=cifar_stem, kwargs=kwargs,
        )  # fmt: skip
    return ResNetBackbone(
        name,
        image_size=image_size,
        grad_checkpointing=grad_checkpointing,
        zero_init_residual=zero_init_residual,
        cifar_stem=cifar_stem,
    )


def check_backbone_name(name: str) -> None:
    """A one-line error when ``name`` is no backbone (builds nothing)."""
    if is_library_name(name):
        check_name(name)
    elif name not in BACKBONES:
        raise UserError(
            f"unknown model.backbone {name!r}; choose one of {', '.join(BACKBONES)}, or "
            f"{'/<model> or '.join(LIBRARIES)}/<model>"
        )
