"""Models: backbones (ResNets for small images; timm and torchvision models), the projector
MLP, and the two joined; :mod:`~lowres_ssl.models.batchnorm` keeps BatchNorm's running
statistics out of checkpointing's recomputation and thrown-away steps.

>>> from lowres_ssl.models import build_model
>>> model = build_model("resnet18", "2048-2048-8192", image_size=32)
>>> z = model(torch.randn(8, 3, 32, 32))  # (8, 8192), what the loss sees
>>> h = model.features(torch.randn(8, 3, 32, 32))  # (8, 512), for linear probes / k-NN
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowres_ssl.models.backbones import (
    BACKBONES,
    CIFAR_STEM_MAX_SIZE,
    ResNetBackbone,
    build_backbone,
    check_backbone_name,
)
from lowres_ssl.models.batchnorm import (
    BatchNormStatistics,
    frozen_bn_statistics,
    normalises_batches,
)
from lowres_ssl.models.library import LibraryBackbone, is_library_name
from lowres_ssl.models.projector import build_projector, parse_projector_spec, projector_out_dim


class SSLModel(nn.Module):
    """Backbone + projector: images (B, 3, H, W) → embeddings (B, q).

    Attributes:
        backbone: images → features (B, backbone.out_dim).
        projector: features → embeddings (B, q).
        q: the embedding width (the projector's last width).
        feature_dim: the backbone's feature width.
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module, q: int):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.q = q
        self.feature_dim: int = backbone.out_dim

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) → projector output z (B, q)."""
        return self.projector(self.backbone(x))

    def features(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) → backbone features (B, feature_dim), the representation."""
        return self.backbone(x)


class Classifier(nn.Module):
    """Backbone + a linear head: images (B, 3, H, W) → class logits (B, num_classes).

    With ``freeze_backbone`` the backbone is not trained: its parameters need no gradient, it
    stays in eval mode (BatchNorm's running statistics do not move) and runs without autograd.
    The head starts as in the semi-supervised protocols of VICReg and SFRIK: weights
    N(0, 0.01²), bias 0.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, freeze_backbone: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_dim, num_classes)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.num_classes = num_classes
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            backbone.requires_grad_(False)
            backbone.eval()

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.freeze_backbone:
            with torch.no_grad():
                h = self.backbone(x)
        else:
            h = self.backbone(x)
        return self.head(h)

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)


def build_model(
    backbone: str,
    projector: str | int,
    *,
    image_size: int,
    grad_checkpointing: bool = False,
) -> SSLModel:
    """The :class:`SSLModel` with backbone ``backbone`` (see :data:`BACKBONES`) and projector
    spec ``projector`` (e.g. ``"2048-2048-8192"``) for ``image_size``-pixel images.

    Both names are checked before anything is built, so a bad projector spec fails fast.
    """
    q = projector_out_dim(projector)
    net = build_backbone(backbone, image_size=image_size, grad_checkpointing=grad_checkpointing)
    return SSLModel(net, build_projector(net.out_dim, projector), q)


def parameter_count(module: nn.Module, *, trainable_only: bool = False) -> int:
    """The number of parameters of ``module`` (shared ones once); with ``trainable_only``,
    only those with ``requires_grad``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "BACKBONES",
    "CIFAR_STEM_MAX_SIZE",
    "BatchNormStatistics",
    "Classifier",
    "LibraryBackbone",
    "ResNetBackbone",
    "SSLModel",
    "build_backbone",
    "build_model",
    "build_projector",
    "check_backbone_name",
    "frozen_bn_statistics",
    "is_library_name",
    "normalises_batches",
    "parameter_count",
    "parse_projector_spec",
    "projector_out_dim",
]
