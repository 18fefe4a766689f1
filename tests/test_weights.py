"""Weights in and out: the architecture read from the tensors, exports that torchvision loads
with strict=True and that give the same features, and a one-line error for each bad file."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import save_file

from lowres_ssl.errors import UserError
from lowres_ssl.models import build_backbone, build_model
from lowres_ssl.weights import (
    export,
    find_weights,
    infer_architecture,
    load_backbone,
    load_init,
    load_weights,
    random_backbone,
    save_safetensors,
    spec_of,
)


def trained_like(name: str = "resnet18", size: int = 32) -> torch.nn.Module:
    """A backbone whose weights and BN statistics are not at their init (a few train-mode
    forward passes move the running statistics; the γ's are randomised)."""
    torch.manual_seed(1)
    net = build_backbone(name, image_size=size)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        net.train()
        for _ in range(2):
            net(torch.randn(8, 3, size, size))
    return net.eval()


@pytest.mark.parametrize(
    ("name", "size", "stem"),
    [("resnet18", 32, True), ("resnet34", 96, False), ("resnet50", 32, True)],
)
def test_the_architecture_is_read_from_the_tensors(name, size, stem):
    assert infer_architecture(build_backbone(name, image_size=size).state_dict()) == (name, stem)


@pytest.mark.parametrize("size", [32, 96])  # the CIFAR stem and the ImageNet one
def test_torchvision_export_loads_strictly_and_gives_the_same_features(tmp_path, size):
    net = trained_like(size=size)
    save_safetensors(net.state_dict(), spec_of(net, size, {"data": {}}), tmp_path / "b.safetensors")
    out = export(load_weights(tmp_path / "b.safetensors"), tmp_path / "resnet18.pth", "torchvision")
    sidecar = json.loads((tmp_path / "resnet18.json").read_text())
    assert sidecar["stem"] == ("cifar" if size <= 64 else "imagenet")
    assert sidecar["image_size"] == size and sidecar["backbone"] == "resnet18"
    assert sidecar["config"] == {"data": {}}  # an object, read back as the run's config
    assert load_weights(out).spec.config == {"data": {}}

    model = torchvision.models.resnet18(num_classes=10)
    model.fc = torch.nn.Identity()
    if sidecar["stem"] == "cifar":  # the two lines docs/evaluation.md shows
        model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = torch.nn.Identity()
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    model.eval()
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        assert (model(x) - net(x)).abs().max().item() <= 1e-5


def test_safetensors_export_keeps_the_spec_and_round_trips(tmp_path):
    net = trained_like()
    save_safetensors(net.state_dict(), spec_of(net, 32, {"train": {}}), tmp_path / "a.safetensors")
    out = export(load_weights(tmp_path / "a.safetensors"), tmp_path / "b.safetensors")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["backbone"] == "resnet18" and meta["stem"] == "cifar"
    assert meta["image_size"] == "32" and meta["out_dim"] == "512"
    assert json.loads(meta["config"]) == {"train": {}}
    again, weights = load_backbone(out)
    assert weights.spec.image_size == 32 and weights.spec.cifar_stem
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), net(x))


def test_a_file_of_another_architecture_is_a_one_line_error(tmp_path):
    net = build_backbone("resnet50", image_size=32)
    save_safetensors(net.state_dict(), spec_of(net, 32, None), tmp_path / "r50.safetensors")
    model = build_model("resnet18", "64-128", image_size=32)
    with pytest.raises(UserError, match="backbone resnet50 in the file, resnet18 asked for") as e:
        load_init(model, tmp_path / "r50.safetensors")
    assert "\n" not in str(e.value)
    imagenet = build_model("resnet50", "64-128", image_size=96)
    with pytest.raises(UserError, match=r"CIFAR \(3x3 conv1\) stem in the file, ImageNet stem"):
        load_init(imagenet, tmp_path / "r50.safetensors")


def test_metadata_that_contradicts_the_tensors_is_refused(tmp_path):
    net = build_backbone("resnet18", image_size=32)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(tmp_path / "lie.safetensors"), metadata={"backbone": "resnet34"})
    with pytest.raises(UserError, match="metadata says resnet34 but its tensors are a resnet18"):
        load_weights(tmp_path / "lie.safetensors")


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def _bad_files(tmp_path):
    good = tmp_path / "good.safetensors"
    net = build_backbone("resnet18", image_size=32)
    save_safetensors(net.state_dict(), spec_of(net, 32, None), good)
    raw = good.read_bytes()
    files = {
        "truncated.safetensors": raw[: len(raw) // 2],
        "pickle-renamed.safetensors": pickle.dumps({"a": 1}),
        "empty.safetensors": b"",
        "code.pth": pickle.dumps(_RunsCode()),
        "text.pth": b"hello, not a checkpoint",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"lr": 0.1, "epochs": 3}, tmp_path / "no-tensors.pth")
    torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "not-a-resnet.pth")
    return [*files, "no-tensors.pth", "not-a-resnet.pth"]


def test_each_kind_of_bad_file_is_a_one_line_error_and_runs_no_code(tmp_path, capsys):
    for name in _bad_files(tmp_path):
        for flag, call in (
            ("--checkpoint", lambda p: load_weights(p)),
            ("--init", lambda p: load_init(build_model("resnet18", "64-128", image_size=32), p)),
        ):
            with pytest.raises(UserError) as e:
                call(tmp_path / name)
            message = str(e.value)
            assert "\n" not in message and message.startswith(f"{flag} {tmp_path / name}"), message
    assert "this must never run" not in capsys.readouterr().out


def test_weights_are_found_in_run_and_checkpoint_folders(tmp_path):
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (run / "config.yaml").write_text("data:\n  load_size: 24\n")
    (step / "trainer_state.json").write_text("{}")
    model = build_model("resnet18", "64-128", image_size=24)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(step / "model.safetensors"), metadata={"format": "pt"})
    # No backbone.safetensors yet: the latest checkpoint, whose size comes from config.yaml.
    for source in (run, step):
        file, run_dir = find_weights(source)
        assert file == step / "model.safetensors" and run_dir == run
        weights = load_weights(source)
        assert weights.spec.image_size == 24 and weights.projector
        assert set(weights.backbone) == set(model.backbone.state_dict())
    with pytest.raises(UserError, match=r"no backbone\.safetensors, model\.safetensors or"):
        find_weights(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        find_weights(tmp_path / "nothing")


def test_random_init_is_fixed_and_leaves_the_callers_random_state(tmp_path):
    net = build_backbone("resnet18", image_size=32)
    spec = spec_of(net, 32, None)
    state = torch.get_rng_state()
    a, b = random_backbone(spec, seed=0), random_backbone(spec, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = random_backbone(spec, seed=1)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_export_refuses_a_suffix_that_does_not_match_the_format(tmp_path):
    net = build_backbone("resnet18", image_size=32)
    save_safetensors(net.state_dict(), spec_of(net, 32, None), tmp_path / "a.safetensors")
    weights = load_weights(tmp_path / "a.safetensors")
    with pytest.raises(UserError, match=r"a torchvision export is a \.pth"):
        export(weights, tmp_path / "x.safetensors", "torchvision")
    with pytest.raises(UserError, match="does not exist"):
        export(weights, tmp_path / "no" / "x.pth")
