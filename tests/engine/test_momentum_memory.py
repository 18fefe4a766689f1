"""The experimental memory of SFRIK's MMD (``loss.memory``): the formula against a float64
reference written here, the ring buffer, the momentum encoder, a tiny run, and its errors."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowres_ssl.config import from_dict, merge, validate
from lowres_ssl.engine.momentum import EmbeddingMemory, MemoryStep, MomentumEncoder
from lowres_ssl.errors import UserError
from lowres_ssl.losses import (
    MemorySFRIKLoss,
    SFRIKKernel,
    SFRIKLoss,
    mmd_to_uniform,
    mmd_with_memory,
)
from lowres_ssl.tasks import train
from tests.tiny import losses, tiny


def psi_reference(t: torch.Tensor, q: int, weights=(1.0, 40.0, 40.0)) -> torch.Tensor:
    """b_1·P_1 + b_2·P_2 + b_3·P_3 in dimension q, from the closed forms of the normalised
    Gegenbauer polynomials (P_ℓ(1) = 1): t, (q·t² − 1)/(q − 1), ((q + 2)·t³ − 3t)/(q − 1)."""
    p = [t, (q * t**2 - 1) / (q - 1), ((q + 2) * t**3 - 3 * t) / (q - 1)]
    return sum(w * pl for w, pl in zip(weights, p, strict=False))


def reference(z: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """(1/(n·N))·(Σ_{B×B} ψ + 2·Σ_{B×M} ψ), pair by pair (b_0 = 0 for SFRIK's kernel)."""
    n, q = z.shape
    big_n = n + memory.shape[0]
    total = sum(psi_reference(z[i] @ z[j], q) for i in range(n) for j in range(n))
    total = total + 2 * sum(psi_reference(z[i] @ m, q) for i in range(n) for m in memory)
    return total / (n * big_n)


def sphere(n: int, q: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, q, generator=g, dtype=torch.float64), dim=1)


def test_the_memory_mmd_is_the_formula_in_float64_value_and_gradient():
    z, memory = sphere(6, 16, 0).requires_grad_(), sphere(10, 16, 1)
    got = mmd_with_memory(z, memory, SFRIKKernel())
    want = reference(z, memory)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    (g_got,) = torch.autograd.grad(got, z)
    (g_want,) = torch.autograd.grad(reference(z, memory), z)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(
        lambda x: mmd_with_memory(x, memory, SFRIKKernel()), (z.detach().requires_grad_(),)
    )


def test_the_memory_carries_no_gradient_and_an_empty_one_is_the_batch_mmd():
    z, memory = sphere(6, 16, 0).requires_grad_(), sphere(10, 16, 1).requires_grad_()
    mmd_with_memory(z, memory, SFRIKKernel()).backward()
    assert z.grad is not None and memory.grad is None
    torch.testing.assert_close(
        mmd_with_memory(z, None, SFRIKKernel()), mmd_to_uniform(z, SFRIKKernel(), "dense"),
        rtol=1e-12, atol=0,
    )  # fmt: skip


def test_each_gradient_keeps_its_batch_only_size():
    """A memory that repeats the batch's own points k times leaves the gradient unchanged:
    the scale N/n makes it an average over N points, not a sum."""
    z = sphere(5, 12, 2).requires_grad_()
    (alone,) = torch.autograd.grad(mmd_with_memory(z, None, SFRIKKernel()), z)
    repeated = z.detach().repeat(3, 1)
    (with_memory,) = torch.autograd.grad(mmd_with_memory(z, repeated, SFRIKKernel()), z)
    torch.testing.assert_close(with_memory, alone, rtol=1e-12, atol=1e-14)


def test_the_memory_loss_without_a_memory_is_sfrik():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 32, generator=g), torch.randn(8, 32, generator=g)
    torch.testing.assert_close(
        MemorySFRIKLoss(lam=1.0)(z1, z2), SFRIKLoss(lam=1.0)(z1, z2), rtol=1e-6, atol=0
    )


def test_the_ring_buffer_keeps_the_last_rows():
    memory = EmbeddingMemory(5)
    assert memory.contents() is None
    for start in (0, 3, 6):
        memory.push(torch.arange(start, start + 3, dtype=torch.float32)[:, None].repeat(1, 2))
    assert len(memory) == 5
    assert sorted(memory.contents()[:, 0].tolist()) == [4, 5, 6, 7, 8]
    memory.push(torch.arange(20, 27, dtype=torch.float32)[:, None].repeat(1, 2))  # > size
    assert sorted(memory.contents()[:, 0].tolist()) == [22, 23, 24, 25, 26]


def test_the_momentum_encoder_is_a_moving_average():
    online = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    encoder = MomentumEncoder(online, 0.75)
    before = encoder.model[0].weight.clone()
    with torch.no_grad():
        online[0].weight.add_(1.0)
        online[1].running_mean.fill_(3.0)
    encoder.follow(online)
    torch.testing.assert_close(encoder.model[0].weight, 0.75 * before + 0.25 * online[0].weight)
    assert torch.equal(encoder.model[1].running_mean, online[1].running_mean)
    assert not any(p.requires_grad for p in encoder.model.parameters())


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_a_run_with_a_memory_trains_and_fills_it(folder, tmp_path, momentum, monkeypatch):
    steps = []
    original = MemoryStep.__call__

    def spy(self, *args, **kwargs):
        steps.append(len(self.memory))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MemoryStep, "__call__", spy)
    cfg = tiny(folder, train={"epochs": 1},
               loss={"memory": 24, "memory_momentum": momentum})  # fmt: skip
    train(cfg, tmp_path / "run", progress_bar=False)
    # 8 steps of 8 images, two views each into the memory: 0, 16, 24, 24, ...
    assert steps[:4] == [0, 16, 24, 24]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(tmp_path / "run").values())


@pytest.mark.parametrize(
    ("sections", "says"),
    [
        ({"loss": {"name": "simclr", "memory": 64}}, "needs loss.name=sfrik"),
        ({"loss": {"memory": 64, "memory_momentum": 1.0}}, "in [0, 1)"),
        ({"loss": {"memory": 64}, "train": {"micro_batch_size": 4}}, "one pass"),
        ({"loss": {"memory": -1}}, "loss.memory"),
    ],
)
def test_settings_that_cannot_work_are_one_line(sections, says):
    with pytest.raises(UserError, match=re.escape(says)) as err:
        validate(from_dict(merge({"data": {"path": "digits"}}, sections)))
    assert "\n" not in str(err.value)
