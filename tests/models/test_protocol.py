"""Both backbone classes are a :class:`lowres_ssl.models.protocol.Backbone`, so code that takes
any backbone (evaluation, the weights' files) takes a timm/torchvision model too."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowres_ssl.models import build_backbone
from lowres_ssl.models.protocol import Backbone


@pytest.mark.parametrize("name", ["resnet18", "torchvision/mobilenet_v3_small"])
def test_every_backbone_class_is_a_backbone(name):
    backbone = build_backbone(name, image_size=64)
    assert isinstance(backbone, Backbone)
    assert backbone.name == name and backbone.out_dim > 0
    assert backbone(torch.zeros(2, 3, 64, 64)).shape == (2, backbone.out_dim)


def test_a_plain_module_is_not_a_backbone():
    assert not isinstance(nn.Linear(2, 2), Backbone)
