"""timm and torchvision backbones: features of the pooled output, the library's own keys
(an export loads into the library's constructor with strict=True), gradient checkpointing
with BatchNorm statistics updated once per forward, the small-image rules, one-line errors."""

from __future__ import annotations

import copy
import functools
import importlib.util

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lowres_ssl.errors import UserError
from lowres_ssl.models import build_backbone, build_model, check_backbone_name
from lowres_ssl.models.library import LibraryBackbone, has_batchnorm

needs_timm = pytest.mark.skipif(
    importlib.util.find_spec("timm") is None, reason="timm not installed (pip install -e '.[timm]')"
)


def _batch(size: int, n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@needs_timm
@pytest.mark.parametrize(
    ("name", "size", "width"),
    [("timm/resnet10t", 32, 512), ("timm/convnext_atto", 64, 320),
     ("timm/vit_tiny_patch16_224", 32, 192), ("torchvision/mobilenet_v3_small", 64, 1024),
     ("torchvision/resnet18", 32, 512)],
)  # fmt: skip
def test_features_and_an_export_that_loads_strictly_into_the_library(name, size, width):
    import timm
    import torchvision

    torch.manual_seed(0)
    net = build_backbone(name, image_size=size).eval()
    x = _batch(size)
    y = net(x)
    assert y.shape == (4, width) == (4, net.out_dim)
    # The library's own model, built as the export's record says, takes the state strictly
    # and computes the same features.
    library, model = name.split("/")
    if library == "timm":
        ref = timm.create_model(model, num_classes=0, **net.kwargs)
    else:
        ref = torchvision.models.get_model(model, weights=None, **net.kwargs)
        ref.set_submodule(net.head, nn.Identity())
    if net.cifar_stem:
        first = next(m for m in ref.conv1.modules() if isinstance(m, nn.Conv2d))
        first.stride = (1, 1)
        ref.maxpool = nn.Identity()
    ref.load_state_dict(net.library_state(), strict=True)
    torch.testing.assert_close(ref.eval()(x).flatten(1), y, rtol=1e-5, atol=1e-5)


@needs_timm
def test_the_state_dict_has_the_librarys_keys_and_round_trips():
    a = build_model("timm/resnet10t", "64-128", image_size=32)
    state = a.state_dict()
    assert "backbone.conv1.0.weight" in state and not any(".net." in k for k in state)
    b = build_model("timm/resnet10t", "64-128", image_size=32)
    b.load_state_dict(state)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in state.items())


def _bn_state(module: nn.Module) -> list[torch.Tensor]:
    out = []
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            out += [m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()]
    return out


@needs_timm
@pytest.mark.parametrize(
    ("name", "size"),
    [("timm/resnet10t", 32), ("timm/efficientnet_b0", 64), ("torchvision/mobilenet_v3_small", 64)],
)
def test_checkpointing_with_batchnorm_updates_statistics_once_and_keeps_gradients(name, size):
    """Same outputs, gradients and BatchNorm buffers with and without checkpointing — timm's
    own checkpointing would count each batch twice (shown below)."""
    torch.manual_seed(0)
    plain = build_backbone(name, image_size=size).train()
    assert has_batchnorm(plain)
    ckpt = copy.deepcopy(plain)
    ckpt.grad_checkpointing = True
    x = _batch(size)
    calls = []
    for which, net in enumerate((plain, ckpt)):  # inside the last stage: again when recomputed
        inner = next(iter(net.stages()[-1][1].children()))
        inner.register_forward_pre_hook(functools.partial(lambda w, *_: calls.append(w), which))
        net(x).square().sum().backward()
    assert calls == [0, 1, 1]  # the copy does recompute
    torch.testing.assert_close(_bn_state(ckpt), _bn_state(plain), rtol=0, atol=0)
    assert all(int(t) == 1 for t in _bn_state(plain)[2::3])  # one forward: one batch counted
    grads = [(p.grad, q.grad) for p, q in zip(plain.parameters(), ckpt.parameters(), strict=True)]
    assert all(g is not None for g, _ in grads)
    for g, h in grads:
        torch.testing.assert_close(h, g, rtol=1e-4, atol=1e-5)


@needs_timm
def test_timms_own_checkpointing_would_count_a_batch_twice():
    """Why BatchNorm models use ours: the fact the design rests on."""
    import timm

    net = timm.create_model("resnet10t", num_classes=0).train()
    net.set_grad_checkpointing(True)
    net(_batch(32)).sum().backward()
    assert int(net.layer1[0].bn1.num_batches_tracked) == 2


@needs_timm
@pytest.mark.parametrize("name", ["timm/convnext_atto", "timm/vit_tiny_patch16_224"])
def test_checkpointing_without_batchnorm_uses_timms_own_and_keeps_gradients(name):
    torch.manual_seed(0)
    size = 64
    plain = build_backbone(name, image_size=size).train()
    assert not has_batchnorm(plain)
    ckpt = copy.deepcopy(plain)
    ckpt.grad_checkpointing = True
    assert any(getattr(m, "grad_checkpointing", False) is True for m in ckpt.net.modules())
    x = _batch(size, n=2)
    for net in (plain, ckpt):
        net(x).square().sum().backward()
    for p, q in zip(plain.parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5)


@needs_timm
def test_small_images_follow_each_familys_rule():
    # ResNet-like: a stride-1 stem, no max-pool, up to 64 px (the weights keep their shapes).
    small = build_backbone("timm/resnet10t", image_size=32)
    large = build_backbone("timm/resnet10t", image_size=96)
    assert small.cifar_stem and not large.cifar_stem
    assert {k: v.shape for k, v in small.state_dict().items()} == {
        k: v.shape for k, v in large.state_dict().items()
    }
    # A ViT takes the view size, a patch that leaves 8x8 patches, and smaller crops.
    vit = build_backbone("timm/vit_tiny_patch16_224", image_size=32)
    assert vit.kwargs == {"img_size": 32, "patch_size": 4, "dynamic_img_size": True}
    assert vit(_batch(16)).shape == (4, 192)
    # Others: one line naming the smallest size.
    with pytest.raises(UserError, match=r"leave a 1x1 feature map .* at least 64 px") as e:
        build_backbone("timm/convnext_atto", image_size=32)
    assert "\n" not in str(e.value)


@needs_timm
def test_a_bad_name_is_one_line():
    for name, pattern in [
        ("timm/convnext_nope", "timm has no model 'convnext_nope'; similar: convnext_"),
        ("torchvision/resnet1000", "torchvision has no classification model"),
        ("torchvision/vit_b_16", "use the timm model"),
        ("resnet19", "unknown model.backbone 'resnet19'"),
    ]:
        with pytest.raises(UserError, match=pattern) as e:
            check_backbone_name(name)
        assert "\n" not in str(e.value)


def test_timm_missing_is_one_line_naming_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "timm" else real(n, *a)
    )
    with pytest.raises(UserError, match=r"pip install -e '.\[timm\]'"):
        check_backbone_name("timm/resnet10t")


@needs_timm
def test_mismatched_weights_name_the_first_keys():
    net = build_backbone("timm/resnet10t", image_size=32)
    state = net.library_state()
    state.pop("layer4.0.bn1.weight")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match=r"1 keys missing \(layer4.0.bn1.weight\); 1 keys unexp"):
        net.load_library_state(state, "--init x.pth")
    full = {**net.library_state(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1)}
    net.load_library_state(full, "--init x.pth")  # a full model's classifier is left out
    assert isinstance(net, LibraryBackbone)
