"""The embedding-cache step against the plain two-view step: the whole batch's gradient in
micro-batches, BatchNorm statistics updated once per micro-batch, checkpointing, bf16."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from lowres_ssl.engine.steps import embedding_cache_step, one_pass_step
from lowres_ssl.losses import SFRIKLoss
from lowres_ssl.models import build_model


class Recorder:
    """An optimizer that moves nothing and keeps the gradients it was asked to apply."""

    def __init__(self, model: nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grads: list[torch.Tensor] | None = None

    def step(self) -> None:
        self.grads = [p.grad.detach().clone() for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def no_bn_model(q: int = 64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, q),
    )  # fmt: skip


def views(n: int = 12, side: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, side, side, generator=g) for _ in range(2)]


def run(step, model, accelerator, v, **kwargs):
    optimizer = Recorder(model)
    objective = SFRIKLoss(lam=2.0)
    result = step(model, objective, v, accelerator=accelerator, optimizer=optimizer, **kwargs)
    return result, optimizer.grads


@pytest.mark.parametrize("micro", [4, 5, 1])  # divides 12, does not, one image at a time
def test_without_batchnorm_the_gradient_is_the_whole_batchs(accelerator, micro):
    model = no_bn_model()
    v = views()
    whole, ref = run(one_pass_step, copy.deepcopy(model), accelerator, v)
    cached, got = run(embedding_cache_step, model, accelerator, v, micro_batch_size=micro)
    assert cached.finite and cached.loss == pytest.approx(whole.loss, rel=1e-6)
    for a, b in zip(got, ref, strict=True):  # fp32: a different summation order only
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_a_micro_batch_of_the_whole_batch_is_the_plain_step_bit_for_bit(accelerator):
    model = build_model("resnet18", "32-64", image_size=16)
    v = views(8, 16)
    whole, ref = run(one_pass_step, copy.deepcopy(model), accelerator, v)
    same, got = run(embedding_cache_step, model, accelerator, v, micro_batch_size=8)
    assert same.loss == whole.loss
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


def test_batchnorm_statistics_are_updated_once_per_micro_batch(accelerator):
    model = build_model("resnet18", "32-64", image_size=16)
    manual = copy.deepcopy(model).train()
    v = views(12, 16)
    run(embedding_cache_step, model, accelerator, v, micro_batch_size=4)
    with torch.no_grad():  # what pass 1 does: each micro-batch of each view once
        for i in range(0, 12, 4):
            for view in v:
                manual(view[i : i + 4])
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    twins = [m for m in manual.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn, twin in zip(norms, twins, strict=True):
        assert int(bn.num_batches_tracked) == 6  # 3 micro-batches × 2 views; not 12
        assert torch.equal(bn.running_mean, twin.running_mean)
        assert torch.equal(bn.running_var, twin.running_var)


def test_the_cache_step_with_gradient_checkpointing(accelerator):
    plain = build_model("resnet18", "32-64", image_size=16)
    checkpointed = copy.deepcopy(plain)
    checkpointed.backbone.grad_checkpointing = True
    v = views(10, 16)
    a, ga = run(embedding_cache_step, plain, accelerator, v, micro_batch_size=4)
    b, gb = run(embedding_cache_step, checkpointed, accelerator, v, micro_batch_size=4)
    assert a.loss == b.loss
    for x, y in zip(ga, gb, strict=True):
        assert (x - y).abs().max() <= 1e-5 * y.abs().max() + 1e-12
    bn = checkpointed.backbone.bn1
    assert int(bn.num_batches_tracked) == 6  # the recomputation did not count again


def test_the_cache_step_under_bf16_autocast_on_the_cpu():
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        model = no_bn_model()
        v = views()
        fp32 = Accelerator(cpu=True)
        _, ref = run(embedding_cache_step, copy.deepcopy(model), fp32, v, micro_batch_size=5)
        AcceleratorState._reset_state(reset_partial_state=True)
        bf16 = Accelerator(cpu=True, mixed_precision="bf16")
        result, got = run(embedding_cache_step, model, bf16, v, micro_batch_size=5)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert result.finite
    flat = torch.cat([g.flatten() for g in got])
    flat_ref = torch.cat([g.flatten() for g in ref])
    # bf16 keeps 8 bits of mantissa: the direction of the gradient, not its last digits.
    assert torch.nn.functional.cosine_similarity(flat, flat_ref, dim=0) > 0.99


class GlooAccelerator:
    """What the steps use of Accelerate, over torch.distributed directly (the harness starts
    the gloo processes itself)."""

    def __init__(self, world: int):
        self.num_processes = world

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def no_sync(self, model):
        return model.no_sync()

    def reduce(self, value, reduction="mean"):
        value = value.clone()
        torch.distributed.all_reduce(value)
        return value / self.num_processes


def cache_step_worker(rank: int, world: int, micro: int):
    v = views(12)
    rows = slice(rank * 6, (rank + 1) * 6)
    model = nn.parallel.DistributedDataParallel(no_bn_model())
    result, grads = run(
        embedding_cache_step, model, GlooAccelerator(world), [x[rows] for x in v],
        micro_batch_size=micro,
    )  # fmt: skip
    return {"loss": torch.tensor(result.loss), "grads": grads}


@pytest.mark.parametrize("micro", [2, 4])  # divides the 6 images per process, and does not
def test_two_processes_give_the_gradient_of_one_process_on_the_whole_batch(micro):
    from tests.distributed_harness import run_distributed

    whole, ref = run(one_pass_step, no_bn_model(), GlooAccelerator(1), views(12))
    results = run_distributed(cache_step_worker, 2, micro)
    for r in results:  # the regulariser saw the global batch of 12; gradients synchronised
        assert r["loss"].item() == pytest.approx(whole.loss, rel=1e-6)
        for a, b in zip(r["grads"], ref, strict=True):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_plain_accumulation_is_the_mean_of_the_parts_another_objective(accelerator):
    from lowres_ssl.engine.steps import accumulation_step

    model = no_bn_model()
    v = views()
    one, ref_one = run(one_pass_step, copy.deepcopy(model), accelerator, v)
    same, got_one = run(accumulation_step, copy.deepcopy(model), accelerator, v, accumulate_steps=1)
    assert same.loss == one.loss and all(map(torch.equal, got_one, ref_one))
    halves = [run(one_pass_step, copy.deepcopy(model), accelerator, [x[s] for x in v])
              for s in (slice(0, 6), slice(6, 12))]  # fmt: skip
    acc, got = run(accumulation_step, model, accelerator, v, accumulate_steps=2)
    assert acc.loss == pytest.approx((halves[0][0].loss + halves[1][0].loss) / 2, rel=1e-6)
    for g, a, b in zip(got, halves[0][1], halves[1][1], strict=True):
        assert (g - (a + b) / 2).abs().max() <= 1e-5 * g.abs().max()
    # The regulariser saw batches of 6, not 12: not the whole batch's gradient.
    assert (
        max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(got, ref_one, strict=True))
        > 1e-3
    )


# ---------------------------------------------------------------------------------------------
# Planned views: the uint8 batch and its drawn parameters, views computed per micro-batch


def planned(n: int = 12, seed: int = 3):
    from lowres_ssl.augment import build_augment

    augment = build_augment("cifar", 16)
    images = torch.randint(
        0, 256, (n, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    return augment, images


def test_planned_views_are_the_augmentation_bit_for_bit_and_in_parts():
    augment, images = planned()
    held = augment(images, generator=torch.Generator().manual_seed(5))
    plan = augment.plan(images, generator=torch.Generator().manual_seed(5))
    for a, b in zip(held, plan.take(), strict=True):
        assert torch.equal(a, b)
    parts = [plan.take(slice(0, 5), 2), plan.take(slice(5, 12), 2)]
    for i in range(2):
        torch.testing.assert_close(
            torch.cat([parts[0][i], parts[1][i]]), held[i], rtol=0, atol=1e-6
        )
    again = plan.take(slice(5, 12), 2)
    assert all(torch.equal(a, b) for a, b in zip(again, parts[1], strict=True))


@pytest.mark.parametrize("micro", [4, 5])
def test_cache_step_with_planned_views_equals_held_views(accelerator, micro):
    augment, images = planned()
    held = augment(images, generator=torch.Generator().manual_seed(5))
    plan = augment.plan(images, generator=torch.Generator().manual_seed(5))
    model = build_model("resnet18", "32-16", image_size=16)
    _, ref = run(
        embedding_cache_step, copy.deepcopy(model), accelerator, held, micro_batch_size=micro
    )
    seen: list[int] = []
    compute = augment._compute

    def spy(x, params, count):
        seen.append(x.shape[0])
        return compute(x, params, count)

    augment._compute = spy
    _, got = run(
        embedding_cache_step, copy.deepcopy(model), accelerator, plan, micro_batch_size=micro
    )
    assert max(seen) <= micro  # the whole batch's views were never computed at once
    assert len(seen) == 2 * len(range(0, 12, micro))  # each micro-batch twice: passes 1 and 3
    for a, b in zip(ref, got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_plain_step_with_planned_views_is_bit_identical(accelerator):
    augment, images = planned()
    held = augment(images, generator=torch.Generator().manual_seed(5))
    plan = augment.plan(images, generator=torch.Generator().manual_seed(5))
    model = build_model("resnet18", "32-16", image_size=16)
    r1, ref = run(one_pass_step, copy.deepcopy(model), accelerator, held)
    r2, got = run(one_pass_step, copy.deepcopy(model), accelerator, plan)
    assert r1.loss == r2.loss
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))


# ---------------------------------------------------------------------------------------------
# Steps thrown away: the fp16 loss scaler's skips are seen, BatchNorm statistics put back


class OverflowingGradient(torch.autograd.Function):
    """The identity whose backward sends inf: an fp16 gradient overflow, on the CPU."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class Overflowing(nn.Module):
    """SFRIK's loss on embeddings whose gradient overflows."""

    def forward(self, *z):
        return SFRIKLoss(lam=2.0)(*(OverflowingGradient.apply(x) for x in z))


def bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k}


@pytest.mark.parametrize("micro", [None, 4])
def test_an_update_the_loss_scaler_skips_is_reported_and_leaves_no_trace(micro):
    """With persistent fp16 overflow every update was skipped and reported as a good step
    (bad_steps stayed 0). The step says so now, and the model is as it was before it."""
    from lowres_ssl.engine.state import Progress, State, StepDone

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    model = build_model("resnet18", "32-64", image_size=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = one_pass_step if micro is None else embedding_cache_step
    kwargs = {} if micro is None else {"micro_batch_size": micro}
    result = step(
        model, Overflowing(), views(12, 16), accelerator=accelerator, optimizer=optimizer, **kwargs
    )
    assert result.finite and result.scaler_skipped and not result.applied
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics
    assert accelerator.scaler.get_scale() == 2.0**15
    state = State(Progress(), 10, lambda: 0.0)
    state.count_step(StepDone(result, 0.1, 12, None))
    assert state.progress.bad_steps == 1
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("micro", [None, 4])
def test_a_non_finite_loss_leaves_batchnorm_statistics_as_they_were(accelerator, micro):
    """The forward pass of a step (the embedding cache's first pass) folds its batch into
    BatchNorm's running statistics before the loss is known: a NaN image made them NaN for
    good, although the step was skipped."""
    model = build_model("resnet18", "32-64", image_size=16)
    before = bn_state(model)
    v = views(12, 16)
    v[0][3] = float("nan")
    step = one_pass_step if micro is None else embedding_cache_step
    kwargs = {} if micro is None else {"micro_batch_size": micro}
    result, grads = run(step, model, accelerator, v, **kwargs)
    assert not result.finite and grads is None
    after = bn_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
