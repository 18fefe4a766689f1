"""Backbones (stems, shapes, state-dict names), the projector, SSLModel, and gradient
checkpointing: same outputs, gradients and BatchNorm running statistics as without it, with
fewer bytes saved for backward; off in eval and no-grad mode; channels_last."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn
from torchvision import models as tv_models

from lowres_ssl.errors import UserError
from lowres_ssl.models import (
    BACKBONES,
    SSLModel,
    build_backbone,
    build_model,
    build_projector,
    frozen_bn_statistics,
    parameter_count,
    parse_projector_spec,
    projector_out_dim,
)
from lowres_ssl.models import backbones as backbones_module


def images(n: int = 4, size: int = 32, seed: int = 0) -> Tensor:
    """(n, 3, size, size) standard-normal images."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def perturb_batchnorms(model: nn.Module, seed: int = 0) -> None:
    """Random BN affine parameters and running statistics.

    The backbones start with zero-init residuals (γ = 0 at the end of each block) and
    running stats (0, 1); both would make equivalence checks weaker than they look.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))


def layer4_output_shape(backbone: nn.Module, x: Tensor) -> torch.Size:
    """The shape of ``layer4``'s output when ``backbone`` runs on ``x``."""
    shapes: list[torch.Size] = []
    handle = backbone.layer4.register_forward_hook(lambda _m, _i, out: shapes.append(out.shape))
    try:
        backbone(x)
    finally:
        handle.remove()
    return shapes[0]


# --- backbones -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BACKBONES))
def test_cifar_stem_shapes(name: str) -> None:
    backbone = build_backbone(name, image_size=32).eval()
    assert backbone.out_dim == BACKBONES[name]
    assert backbone.cifar_stem
    with torch.no_grad():
        x = images(2, 32)
        # No downsampling before layer1, then three stride-2 stages: 32 → 4.
        assert layer4_output_shape(backbone, x)[-2:] == (4, 4)
        assert backbone(x).shape == (2, BACKBONES[name])


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_imagenet_stem_shapes(name: str) -> None:
    backbone = build_backbone(name, image_size=96).eval()
    assert not backbone.cifar_stem
    assert backbone.conv1.kernel_size == (7, 7) and backbone.conv1.stride == (2, 2)
    assert isinstance(backbone.maxpool, nn.MaxPool2d)
    with torch.no_grad():
        x = images(2, 96)
        # Stem /4, then three stride-2 stages: 96 → 3.
        assert layer4_output_shape(backbone, x)[-2:] == (3, 3)
        assert backbone(x).shape == (2, BACKBONES[name])


@pytest.mark.parametrize(
    ("image_size", "cifar"),
    [(16, True), (32, True), (64, True), (65, False), (96, False), (224, False)],
)
def test_cifar_stem_iff_at_most_64_pixels(image_size: int, cifar: bool) -> None:
    backbone = build_backbone("resnet18", image_size=image_size)
    assert backbone.cifar_stem is cifar
    if cifar:
        conv = backbone.conv1
        assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (1, 1), (1, 1))
        assert conv.bias is None
        assert isinstance(backbone.maxpool, nn.Identity)
    else:
        assert backbone.conv1.kernel_size == (7, 7)
        assert isinstance(backbone.maxpool, nn.MaxPool2d)
    assert isinstance(backbone.fc, nn.Identity)


@pytest.mark.parametrize("image_size", [32, 96])
def test_state_dict_is_torchvisions_without_fc(image_size: int) -> None:
    backbone = build_backbone("resnet18", image_size=image_size)
    reference = tv_models.resnet18(weights=None).state_dict()
    del reference["fc.weight"], reference["fc.bias"]
    assert list(backbone.state_dict()) == list(reference)
    if image_size > 64:
        # Same names and shapes: torchvision's weights load strictly.
        backbone.load_state_dict(reference, strict=True)
    else:
        assert backbone.state_dict()["conv1.weight"].shape == (64, 3, 3, 3)


def test_unknown_backbone_is_a_one_line_user_error() -> None:
    with pytest.raises(UserError) as info:
        build_backbone("vit_tiny", image_size=32)
    message = str(info.value)
    assert "\n" not in message and "vit_tiny" in message
    for name in ("resnet18", "resnet34", "resnet50"):
        assert name in message
    with pytest.raises(UserError, match="resnet18, resnet34, resnet50"):
        build_model("resnet101", "8192", image_size=32)


@pytest.mark.parametrize("image_size", [0, -32, 32.0, True])
def test_bad_image_size(image_size: object) -> None:
    with pytest.raises(UserError, match="image_size"):
        build_backbone("resnet18", image_size=image_size)  # type: ignore[arg-type]


# --- projector -------------------------------------------------------------------------------


def test_projector_structure_and_parameter_count() -> None:
    projector = build_projector(512, "2048-2048-8192")
    kinds = [type(m) for m in projector]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    linears = [m for m in projector if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (512, 2048),
        (2048, 2048),
        (2048, 8192),
    ]
    assert linears[0].bias is not None and linears[1].bias is not None
    assert linears[-1].bias is None
    assert [m.num_features for m in projector if isinstance(m, nn.BatchNorm1d)] == [2048, 2048]
    # Linear weights + biases, BN γ and β, last Linear weight only.
    expected = (512 * 2048 + 2048) + 2 * 2048 + (2048 * 2048 + 2048) + 2 * 2048 + 2048 * 8192
    assert parameter_count(projector) == expected
    assert projector_out_dim("2048-2048-8192") == 8192
    with torch.no_grad():
        assert projector.eval()(torch.randn(3, 512)).shape == (3, 8192)


@pytest.mark.parametrize("spec", ["8192", 8192, " 8192 "])
def test_single_width_projector_is_one_bias_free_linear(spec: str | int) -> None:
    projector = build_projector(512, spec)
    assert len(projector) == 1
    (linear,) = projector
    assert isinstance(linear, nn.Linear) and linear.bias is None
    assert (linear.in_features, linear.out_features) == (512, 8192)
    assert projector_out_dim(spec) == 8192
    assert parse_projector_spec(spec) == [8192]


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "-",
        "2048-",
        "-2048",
        "2048--8192",
        "a-8192",
        "0-8192",
        "2048-0",
        "-1",
        "2048-8192.5",
        "2048 - 8192",
        "2048,8192",
        "2048x8192",
        "²",
        None,
        [2048, 8192],
        True,
        0,
    ],
)
def test_bad_projector_spec_is_a_one_line_user_error(spec: object) -> None:
    with pytest.raises(UserError) as info:
        build_projector(512, spec)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message and "'2048-2048-8192'" in message
    with pytest.raises(UserError):
        projector_out_dim(spec)  # type: ignore[arg-type]
    with pytest.raises(UserError):
        build_model("resnet18", spec, image_size=32)  # type: ignore[arg-type]


# --- SSLModel --------------------------------------------------------------------------------


def test_ssl_model_shapes_and_attributes() -> None:
    model = build_model("resnet18", "256-128", image_size=32)
    assert isinstance(model, SSLModel)
    assert model.q == 128 and model.feature_dim == 512 and model.backbone.out_dim == 512
    assert not model.backbone.grad_checkpointing
    x = images(4, 32)
    z = model(x)
    assert z.shape == (4, 128)
    with torch.no_grad():
        assert model.features(x).shape == (4, 512)
    assert parameter_count(model) == parameter_count(model.backbone) + parameter_count(
        model.projector
    )
    # resnet18 with the CIFAR stem: torchvision's 11,689,512 less fc (513,000) less the
    # 7x7 conv1 (9,408), plus the 3x3 conv1 (1,728).
    assert parameter_count(model.backbone) == 11_689_512 - 513_000 - 9_408 + 1_728
    model.projector.requires_grad_(False)
    assert parameter_count(model, trainable_only=True) == parameter_count(model.backbone)
    assert build_model(
        "resnet18", "64", image_size=32, grad_checkpointing=True
    ).backbone.grad_checkpointing


# --- gradient checkpointing ------------------------------------------------------------------


def twin_backbones(seed: int = 0, momentum: float | None = 0.1) -> tuple[nn.Module, nn.Module]:
    """Two resnet18 backbones with identical weights and buffers; the second checkpoints."""
    torch.manual_seed(seed)
    plain = build_backbone("resnet18", image_size=32)
    perturb_batchnorms(plain, seed)
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    checkpointed = copy.deepcopy(plain)
    checkpointed.grad_checkpointing = True
    return plain.train(), checkpointed.train()


def ssl_step(model: nn.Module, views: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The SSL pattern: forward every view, then one backward through all of them.

    Returns the outputs and the input gradients. Later views run forward before the earlier
    ones are recomputed in backward, which is when a stray ``num_batches_tracked`` increment
    or running-stat update would show.
    """
    inputs = [v.clone().requires_grad_() for v in views]
    outputs = [model(x) for x in inputs]
    weights = torch.linspace(-1, 1, outputs[0].shape[1], device=outputs[0].device)
    loss = sum((out.square() * weights).sum() for out in outputs)
    loss.backward()
    return [out.detach() for out in outputs], [x.grad for x in inputs]


def assert_same_state(plain: nn.Module, checkpointed: nn.Module) -> None:
    """Parameter gradients and all buffers (running stats, batch counts) agree."""
    for (name, p), (_, q) in zip(
        plain.named_parameters(), checkpointed.named_parameters(), strict=True
    ):
        assert p.grad is not None, name
        torch.testing.assert_close(
            q.grad,
            p.grad,
            rtol=1e-6,
            atol=1e-6 * p.grad.abs().max().item(),
            msg=lambda m, name=name: f"grad of {name}: {m}",
        )
    for (name, b), (_, c) in zip(plain.named_buffers(), checkpointed.named_buffers(), strict=True):
        torch.testing.assert_close(c, b, rtol=1e-6, atol=0, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    ("n_views", "steps", "momentum"),
    [(1, 1, 0.1), (2, 2, 0.1), (2, 2, None)],
    ids=["one-view", "two-views-two-steps", "cumulative-bn"],
)
def test_checkpointing_matches_plain(n_views: int, steps: int, momentum: float | None) -> None:
    plain, checkpointed = twin_backbones(momentum=momentum)
    initial_mean = plain.layer3[0].bn1.running_mean.clone()
    for step in range(steps):
        views = [images(2, 32, seed=10 * step + v) for v in range(n_views)]
        out_p, grad_p = ssl_step(plain, views)
        out_c, grad_c = ssl_step(checkpointed, views)
        for a, b in zip(out_p + grad_p, out_c + grad_c, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6 * a.abs().max().item())
        assert_same_state(plain, checkpointed)
    # The running stats did move (otherwise the comparison above proves little).
    assert not torch.equal(initial_mean, plain.layer3[0].bn1.running_mean)
    assert int(plain.layer3[0].bn1.num_batches_tracked) == n_views * steps


def test_without_the_bn_fix_running_stats_would_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    # The control: a recompute that leaves BN alone updates the running stats a second time.
    monkeypatch.setattr(
        backbones_module,
        "recompute_contexts",
        lambda _module: (contextlib.nullcontext(), contextlib.nullcontext()),
    )
    plain, checkpointed = twin_backbones()
    ssl_step(plain, [images(4, 32)])
    ssl_step(checkpointed, [images(4, 32)])
    bn = "layer2.0.bn1"
    assert not torch.equal(
        plain.get_submodule(bn).running_mean, checkpointed.get_submodule(bn).running_mean
    )
    assert int(checkpointed.get_submodule(bn).num_batches_tracked) == 2


def saved_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes of distinct storages, other than parameters, that autograd saves for backward
    during ``model(x)`` (parameters exist anyway; only activations cost extra memory)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.sum().backward()
    return sum(storages.values())


def test_checkpointing_saves_fewer_bytes() -> None:
    plain, checkpointed = twin_backbones()
    x = images(4, 32)
    full, reduced = saved_bytes(plain, x), saved_bytes(checkpointed, x)
    # Only the stem's tensors and the four stage inputs stay (≈ 4 MB against ≈ 19 MB here).
    assert reduced < 0.3 * full, (reduced, full)


@contextlib.contextmanager
def counting_checkpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Count calls to ``checkpoint`` from the backbone module."""
    calls = [0]
    real: Callable[..., Tensor] = backbones_module.checkpoint

    def counted(*args: object, **kwargs: object) -> Tensor:
        calls[0] += 1
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(backbones_module, "checkpoint", counted)
        yield calls


def test_checkpointing_only_in_train_mode_with_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    plain, checkpointed = twin_backbones()
    x = images(2, 32)
    with counting_checkpoint(monkeypatch) as calls:
        plain(x).sum().backward()  # grad_checkpointing off
        assert calls[0] == 0
        checkpointed(x).sum().backward()
        assert calls[0] == 4  # one per stage
        with torch.no_grad():
            out_c = checkpointed(x)
            out_p = plain(x)
        assert calls[0] == 4
        torch.testing.assert_close(out_c, out_p, rtol=0, atol=0)
        plain.eval()
        checkpointed.eval()
        out_c = checkpointed(x)
        assert out_c.requires_grad and calls[0] == 4
        torch.testing.assert_close(out_c, plain(x), rtol=0, atol=0)


def test_checkpointing_under_torch_compile_matches_plain() -> None:
    # torch.compile rejects a plain-context-manager context_fn, so the compiled path uses none;
    # the compiled graph then applies each running-stat update once. aot_eager: no C++ compiler
    # needed, same autograd partitioning as inductor.
    plain, checkpointed = twin_backbones()
    compiled = torch.compile(checkpointed, backend="aot_eager")
    views = [images(4, 32)]
    out_p, grad_p = ssl_step(plain, views)
    out_c, grad_c = ssl_step(compiled, views)
    for a, b in zip(out_p + grad_p, out_c + grad_c, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())
    for (name, b), (_, c) in zip(plain.named_buffers(), checkpointed.named_buffers(), strict=True):
        torch.testing.assert_close(
            c, b, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}"
        )
    # And it still checkpoints.
    assert saved_bytes(compiled, views[0]) < 0.3 * saved_bytes(plain, views[0])


def test_frozen_bn_statistics_restores_on_exception() -> None:
    bn = nn.BatchNorm2d(3, momentum=None).train()
    mean = bn.running_mean.clone()
    with pytest.raises(RuntimeError, match="stop"), frozen_bn_statistics(bn):
        bn(torch.randn(4, 3, 2, 2) + 5)
        assert bn.momentum == 0.0
        raise RuntimeError("stop")
    assert bn.momentum is None
    assert int(bn.num_batches_tracked) == 0
    torch.testing.assert_close(bn.running_mean, mean, rtol=0, atol=0)


# --- channels_last ---------------------------------------------------------------------------

CL = torch.channels_last


def test_channels_last_forward_matches_contiguous() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", "256-64", image_size=32)
    perturb_batchnorms(model)
    cl = copy.deepcopy(model).to(memory_format=CL)
    assert cl.backbone.conv1.weight.is_contiguous(memory_format=CL)
    x = images(4, 32)
    with torch.no_grad():
        for train in (True, False):
            model.train(train)
            cl.train(train)
            feats = cl.features(x.to(memory_format=CL))
            torch.testing.assert_close(feats, model.features(x), rtol=1e-5, atol=1e-5)
        # Eval only for z: train-mode BatchNorm1d over 4 samples amplifies float32 rounding.
        torch.testing.assert_close(cl(x.to(memory_format=CL)), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_channels_last_training_step_matches_contiguous(grad_checkpointing: bool) -> None:
    # float64: in float32 the two layouts round differently, and an activation within ~1e-6 of
    # zero can land on the other side of a ReLU, which changes a gradient element outright.
    torch.manual_seed(0)
    model = build_model("resnet18", "256-64", image_size=32, grad_checkpointing=grad_checkpointing)
    model.double()
    perturb_batchnorms(model)
    cl = copy.deepcopy(model).to(memory_format=CL)
    layouts: list[bool] = []
    cl.backbone.layer3.register_forward_hook(
        lambda _m, _i, out: layouts.append(out.is_contiguous(memory_format=CL))
    )
    x = images(2, 32).double()
    (out,), (grad,) = ssl_step(model, [x])
    (out_cl,), (grad_cl,) = ssl_step(cl, [x.to(memory_format=CL)])
    assert layouts and all(layouts)  # the activations really were channels_last
    torch.testing.assert_close(out_cl, out, rtol=1e-10, atol=1e-10 * out.abs().max().item())
    torch.testing.assert_close(grad_cl, grad, rtol=1e-10, atol=1e-10 * grad.abs().max().item())
    # One absolute scale for all: the Linear biases before BatchNorm1d have gradient zero in
    # exact arithmetic, so their own scale is rounding noise.
    grad_scale = max(p.grad.abs().max().item() for p in model.parameters())
    for (name, p), (_, q) in zip(model.named_parameters(), cl.named_parameters(), strict=True):
        torch.testing.assert_close(
            q.grad,
            p.grad,
            rtol=1e-10,
            atol=1e-10 * grad_scale,
            msg=lambda m, name=name: f"grad of {name}: {m}",
        )
    for (name, b), (_, c) in zip(model.named_buffers(), cl.named_buffers(), strict=True):
        torch.testing.assert_close(
            c, b, rtol=1e-10, atol=0, msg=lambda m, name=name: f"{name}: {m}"
        )


# --- CUDA (skipped without a device) ---------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_cuda_channels_last_checkpointing_matches_plain(autocast: bool) -> None:
    # As the trainer runs it: channels_last, optionally bf16 autocast. Forward kernels are
    # deterministic, so running stats agree tightly; backward kernels may use atomics, so
    # gradients are compared by norm.
    plain, checkpointed = (
        m.to("cuda", memory_format=CL).train() for m in twin_backbones(momentum=0.1)
    )
    x = images(16, 32).to("cuda", memory_format=CL)
    peaks = []
    grads = []
    for model in (plain, checkpointed):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            _, input_grads = ssl_step(model, [x, x.flip(-1)])
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
        grads.append(input_grads + [p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert ((b.float() - a.float()).norm() / a.float().norm().clamp_min(1e-30)).item() < 1e-3
    for (name, b), (_, c) in zip(plain.named_buffers(), checkpointed.named_buffers(), strict=True):
        torch.testing.assert_close(
            c, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )
    assert peaks[1] < peaks[0], peaks
