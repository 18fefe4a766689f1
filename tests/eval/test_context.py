"""The inference context: one choice of device and of precision for evaluation, the explorer,
predictions and the benchmarks; a device or precision this machine lacks is a one-line error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowres_ssl.config import PRECISIONS
from lowres_ssl.errors import UserError
from lowres_ssl.eval.context import InferenceContext, pick_device, pick_precision


def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_auto_is_a_gpu_where_there_is_one(monkeypatch):
    no_gpu(monkeypatch)
    assert pick_device("auto") == torch.device("cpu")
    one_gpu(monkeypatch)
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cuda:0") == torch.device("cuda", 0)
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    ("name", "gpus", "message"),
    [
        ("cuda", 0, "--device cuda: no CUDA GPU is available; use --device cpu"),
        ("cuda:1", 0, "no CUDA GPU is available"),
        ("cuda:1", 1, "this machine has 1 CUDA GPU(s), cuda:0 to cuda:0; use one of those"),
        ("gpu", 1, "--device gpu: choose auto, cpu, cuda or cuda:N"),
        ("meta", 1, "choose auto, cpu, cuda or cuda:N"),
    ],
)
def test_a_device_this_machine_lacks_is_a_one_line_error(monkeypatch, name, gpus, message):
    (one_gpu if gpus else no_gpu)(monkeypatch)
    with pytest.raises(UserError) as caught:
        pick_device(name)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_precision_follows_the_training_on_a_gpu_and_is_fp32_on_the_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert pick_precision("auto", cpu, {"train": {"precision": "bf16"}}) == "fp32"
    assert pick_precision("auto", cuda, {"train": {"precision": "bf16"}}) == "bf16"
    assert pick_precision("auto", cuda, {"train": {"precision": "fp32"}}) == "fp32"
    assert pick_precision("bf16", cpu) == "bf16"
    assert set(PRECISIONS) == {"auto", "fp32", "bf16", "fp16"}
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        pick_precision("fp16", cpu)
    with pytest.raises(UserError, match="--precision fp8: choose one of auto"):
        pick_precision("fp8", cpu)


def test_the_context_puts_the_network_on_its_device_in_eval_mode():
    context = InferenceContext.choose("cpu", "auto", batch_size=32)
    assert (context.device, context.precision, context.batch_size) == (
        torch.device("cpu"),
        "fp32",
        32,
    )
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    prepared = context.prepare(net)
    assert not prepared.training
    assert prepared[0].weight.is_contiguous(memory_format=torch.channels_last)
    plain = InferenceContext(torch.device("cpu"), channels_last=False).prepare(nn.Conv2d(3, 4, 3))
    assert plain.weight.is_contiguous()
    with context.autocast():
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    with InferenceContext(torch.device("cpu"), "bf16").autocast():
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.bfloat16
