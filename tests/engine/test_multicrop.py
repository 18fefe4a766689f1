"""Multi-crop through the steps: the embedding cache gives the one-pass gradient, two views are
the two-view step of before bit for bit, the small crops run in one pass, two processes equal
one, and a run with crops resumes exactly."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lowres_ssl import run_layout
from lowres_ssl.augment import build_augment, forward_groups
from lowres_ssl.engine.steps import StepResult, embedding_cache_step, global_mean, one_pass_step
from lowres_ssl.errors import UserError
from lowres_ssl.losses import SFRIKLoss, SimCLRLoss, ViewLayout
from lowres_ssl.models import build_model
from lowres_ssl.tasks import train
from tests.engine.test_steps import GlooAccelerator, Recorder, no_bn_model
from tests.tiny import assert_same_run, interrupt_at, losses, tiny

LAYOUT = ViewLayout.swav(2, 3)


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def crops(n: int = 12, large: int = 8, small: int = 4, count: int = 3) -> list[torch.Tensor]:
    """Two large views and ``count`` small crops of n random images (held tensors)."""
    g = torch.Generator().manual_seed(1)
    sides = [large, large] + [small] * count
    return [torch.randn(n, 3, s, s, generator=g) for s in sides]


def run(step, model, acc, views, objective=None, **kwargs):
    optimizer = Recorder(model)
    objective = objective or SFRIKLoss(lam=2.0, layout=LAYOUT)
    result = step(model, objective, views, accelerator=acc, optimizer=optimizer, **kwargs)
    return result, optimizer.grads


def relative_error(got, ref) -> float:
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref, strict=True))


@pytest.mark.parametrize("reg_small", [False, True])
@pytest.mark.parametrize("micro", [4, 5])  # divides 12, does not
def test_the_cache_gives_the_one_pass_gradient_with_crops(accelerator, micro, reg_small):
    objective = SFRIKLoss(lam=2.0, layout=ViewLayout.swav(2, 3, reg_small=reg_small))
    model, v = no_bn_model(), crops()
    whole, ref = run(one_pass_step, copy.deepcopy(model), accelerator, v, objective)
    cached, got = run(
        embedding_cache_step, model, accelerator, v, objective, micro_batch_size=micro
    )
    assert cached.finite and cached.loss == pytest.approx(whole.loss, rel=1e-6)
    assert relative_error(got, ref) <= 1e-5  # fp32: a different summation order only


def test_the_cache_with_a_contrastive_objective_and_obow(accelerator):
    layout = ViewLayout.obow(1, 3)
    v = crops()  # as the whole image, one large crop, three small crops
    objective = SimCLRLoss(0.3, layout=layout)
    whole, ref = run(one_pass_step, no_bn_model(), accelerator, v, objective)
    cached, got = run(
        embedding_cache_step, no_bn_model(), accelerator, v, objective, micro_batch_size=5
    )
    assert cached.loss == pytest.approx(whole.loss, rel=1e-6)
    assert relative_error(got, ref) <= 1e-5


def old_two_view_step(model, objective, views, *, accelerator: object, optimizer) -> StepResult:
    """The plain two-view step as it was before multi-crop (its body, unchanged)."""
    acc = accelerator
    v1, v2 = views[:2]
    with acc.autocast():
        z1, z2 = model(v1), model(v2)
    loss = objective(z1, z2)
    value = global_mean(acc, loss)
    finite = math.isfinite(value)
    if finite:
        acc.backward(loss)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(value, dict(getattr(objective, "terms", {})), finite)


def test_two_views_are_the_two_view_step_bit_for_bit(accelerator):
    model = build_model("resnet18", "32-64", image_size=16)  # with BatchNorm
    augment = build_augment("cifar", 16)
    images = torch.randint(0, 256, (8, 3, 20, 20), dtype=torch.uint8)
    plan = augment.plan(images, generator=torch.Generator().manual_seed(5))
    held = plan.take()
    objective = SFRIKLoss(lam=2.0)
    old, ref = run(old_two_view_step, copy.deepcopy(model), accelerator, held, objective)
    new, got = run(one_pass_step, copy.deepcopy(model), accelerator, plan, objective)
    assert new.loss == old.loss
    assert all(torch.equal(new.terms[k], old.terms[k]) for k in old.terms)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


def test_the_small_crops_run_through_the_network_in_one_pass(accelerator):
    augment = build_augment("cifar", 16, num_small_crops=3, small_size=8)
    assert augment.groups == [[0], [1], [2, 3, 4]]
    assert forward_groups([16, 16, 16]) == [[0], [1], [2]]  # large views stay apart
    assert build_augment("cifar", 16, original=True, num_large=1).groups == [[0], [1]]
    model = no_bn_model()
    shapes = []
    model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    plan = augment.plan(images, generator=torch.Generator().manual_seed(0))
    result, _ = run(one_pass_step, model, accelerator, plan)
    assert result.finite
    assert shapes == [(6, 3, 16, 16), (6, 3, 16, 16), (18, 3, 8, 8)]


def cache_worker(rank: int, world: int, micro: int):
    v = crops(12)
    rows = slice(rank * 6, (rank + 1) * 6)
    model = nn.parallel.DistributedDataParallel(no_bn_model())
    objective = SFRIKLoss(lam=2.0, layout=ViewLayout.swav(2, 3, reg_small=True))
    result, grads = run(
        embedding_cache_step, model, GlooAccelerator(world), [x[rows] for x in v], objective,
        micro_batch_size=micro,
    )  # fmt: skip
    return {"loss": torch.tensor(result.loss), "grads": grads}


def test_two_processes_with_crops_equal_one():
    from tests.distributed_harness import run_distributed

    objective = SFRIKLoss(lam=2.0, layout=ViewLayout.swav(2, 3, reg_small=True))
    whole, ref = run(one_pass_step, no_bn_model(), GlooAccelerator(1), crops(12), objective)
    for r in run_distributed(cache_worker, 2, 4):  # micro-batches of 4 of each process's 6
        assert r["loss"].item() == pytest.approx(whole.loss, rel=1e-6)
        assert relative_error(r["grads"], ref) <= 1e-5


def test_a_run_with_crops_resumes_exactly(folder, tmp_path):
    """Two small crops of 8 px beside the two 16-px views, the embedding cache in
    micro-batches of 3 (the crops too); interrupted after step 5 and resumed, the same
    per-step losses and final weights as the uninterrupted run."""
    sections = {
        "data": {"views": {"small": 2, "small_size": 8}},
        "train": {"epochs": 1, "micro_batch_size": 3},
    }
    whole = tmp_path / "whole"
    train(tiny(folder, **sections), whole, progress_bar=False)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(tiny(folder, **sections), cut, progress_bar=False, on_step=interrupt_at(5))
    assert run_layout.latest(cut).name == "step_00000005"
    train(tiny(folder, **sections), cut, resume=True, progress_bar=False)
    assert_same_run(whole, cut, 8)
    # The crops were used: the run's config says so, and its losses are not the two-view run's.
    two = tmp_path / "two"
    train(tiny(folder, train={"epochs": 1, "micro_batch_size": 3}), two, progress_bar=False)
    assert losses(two)[1] != losses(whole)[1]


def test_the_crop_area_of_the_large_views(folder):
    """``large_scale`` set: that; unset with crops: the multi-crop (0.14, 1); set in the
    ``photos`` overlay: that on photos (not on small images); else the recipe's."""
    from lowres_ssl.config import validate
    from lowres_ssl.plan import resolve_views
    from lowres_ssl.tasks.pretrain import MULTI_CROP_LARGE_SCALE, augment_options

    def scale(load_size, photos=None, **views):
        cfg = tiny(
            folder,
            data={"load_size": load_size, "views": views},
            photos={"data": {"views": {"large_scale": photos}}} if photos else {},
        )
        return augment_options(resolve_views(cfg)[0])["large_scale"]

    assert scale(96, small=0) is None  # the recipe's (0.08, 1)
    assert scale(96, small=2) == tuple(MULTI_CROP_LARGE_SCALE)
    assert scale(96, photos=[0.25, 1.0], small=0) == (0.25, 1.0)
    assert scale(32, photos=[0.25, 1.0], small=0) is None  # small images keep theirs
    with pytest.raises(UserError, match=r"photos\.data\.views\.large_scale"):
        validate(tiny(folder, photos={"data": {"views": {"large_scale": [0.5, 0.2]}}}))
