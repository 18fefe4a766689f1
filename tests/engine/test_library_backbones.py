"""A timm or torchvision backbone through the whole kit: training, an exact resume (after
Ctrl-C and after SIGKILL), the export loaded strictly back into the library, --init from a
library state dict, multi-crop and the embedding cache, kNN evaluation, fine-tuning and
predictions — on tiny models and the 16 px test folder."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from lowres_ssl.cli import finetune_main
from lowres_ssl.cli_results import predict_main
from lowres_ssl.errors import UserError
from lowres_ssl.eval.evaluate import evaluate
from lowres_ssl.models import build_model
from lowres_ssl.tasks import Pretraining, train
from lowres_ssl.weights import load_init
from tests.faults.test_stops import kill_after_first_checkpoint, spawn_training
from tests.tiny import assert_same_run, interrupt_at, tiny

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("timm") is None, reason="timm not installed (pip install -e '.[timm]')"
)

TIMM = {"backbone": "timm/resnet10t"}


@pytest.fixture(scope="module")
def timm_run(folder, tmp_path_factory):
    """A finished 16-step run of timm's resnet10t (stride-1 stem at 16 px)."""
    run = tmp_path_factory.mktemp("timm") / "run"
    train(tiny(folder, model=TIMM), run, progress_bar=False)
    return run


def test_a_timm_backbone_resumes_exactly_and_exports_for_timm(folder, timm_run, tmp_path):
    import timm

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(tiny(folder, model=TIMM), cut, progress_bar=False, on_step=interrupt_at(5))
    train(tiny(folder, model=TIMM), cut, resume=True, progress_bar=False)
    assert_same_run(timm_run, cut, 16)

    file = timm_run / "backbone.safetensors"
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    assert meta["backbone"] == "timm/resnet10t" and meta["stem"] == "cifar"
    assert json.loads(meta["kwargs"]) == {}
    model = timm.create_model("resnet10t", num_classes=0)
    model.conv1[0].stride = (1, 1)  # the stride-1 stem the record names
    model.maxpool = nn.Identity()
    model.load_state_dict(load_file(str(file)), strict=True)


def test_a_timm_backbone_killed_after_a_checkpoint_resumes_exactly(folder, timm_run, tmp_path):
    run = tmp_path / "killed"
    kill_after_first_checkpoint(spawn_training(folder, run, sections={"model": TIMM}), run)
    train(tiny(folder, model=TIMM), run, resume=True, progress_bar=False)
    assert_same_run(timm_run, run, 16)


def test_a_torchvision_backbone_trains_and_exports_for_torchvision(folder, tmp_path):
    import torchvision

    cfg = tiny(
        folder, model={"backbone": "torchvision/mobilenet_v3_small"}, data={"load_size": 64},
        train={"max_steps": 3},
    )  # fmt: skip
    summary = train(cfg, tmp_path / "run", progress_bar=False)
    assert summary["steps"] == 3 and torch.isfinite(torch.tensor(summary["final_loss"]))
    model = torchvision.models.mobilenet_v3_small(weights=None)
    model.classifier[3] = nn.Identity()
    model.load_state_dict(load_file(str(tmp_path / "run" / "backbone.safetensors")), strict=True)


def test_init_from_a_timm_state_dict_with_its_classifier(tmp_path):
    import timm

    torch.manual_seed(1)
    pretrained = timm.create_model("resnet10t")  # as an ImageNet checkpoint would be: fc too
    file = tmp_path / "resnet10t_imagenet.pth"
    torch.save(pretrained.state_dict(), file)
    model = build_model("timm/resnet10t", "64-128", image_size=96)
    assert load_init(model, file) == f"backbone from {file}"
    mine = model.backbone.library_state()
    theirs = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("fc.")}
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)

    other = tmp_path / "convnext.pth"
    torch.save(timm.create_model("convnext_atto").state_dict(), other)
    with pytest.raises(UserError, match=r"do not fit timm/resnet10t .* keys missing \(") as e:
        load_init(model, other)
    assert "\n" not in str(e.value)


def test_knn_finetune_and_predict_rebuild_it_from_the_run(folder, timm_run, tmp_path):
    record = evaluate("knn", checkpoint=timm_run, train=str(folder), test=str(folder),
                      k=5, batch_size=16, device="cpu", progress=False)  # fmt: skip
    assert 0.0 <= record["knn_top1"] <= 1.0 and record["backbone"] == "timm/resnet10t"
    baseline = evaluate("knn", random_init=True, backbone="timm/resnet10t", size=16,
                        train=str(folder), test=str(folder), k=5, batch_size=16,
                        device="cpu", progress=False)  # fmt: skip
    assert 0.0 <= baseline["knn_top1"] <= 1.0 and baseline["random_init"]

    ft = tmp_path / "ft"
    assert finetune_main(["--checkpoint", str(timm_run), "--train", str(folder), "--val",
                          str(folder), "--preset", "cpu", "--epochs", "1",
                          "--set", "train.batch_size=8", "--set", "data.num_workers=0",
                          "--set", "data.cache=none", "--out", str(ft)]) == 0  # fmt: skip
    out = tmp_path / "p.csv"
    assert predict_main(["--checkpoint", str(ft), "--images", str(folder), "--out", str(out),
                         "--num-workers", "0"]) == 0  # fmt: skip
    rows = list(csv.reader(out.open()))
    assert len(rows) == 1 + 64


def test_multi_crop_and_the_embedding_cache_with_a_vit(folder, tmp_path):
    """A timm ViT at 16 px (2-px patches, 8 x 8 of them) with 8-px crops (its dynamic image
    size) and the full-batch regulariser in micro-batches of 4: finite steps."""
    cfg = tiny(
        folder, model={"backbone": "timm/vit_tiny_patch16_224"},
        data={"views": {"small": 2}}, train={"max_steps": 2, "micro_batch_size": 4},
    )  # fmt: skip
    summary = train(cfg, tmp_path / "run", progress_bar=False)
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["final_loss"]))


def test_crops_smaller_than_the_backbone_takes_are_one_line(folder, tmp_path):
    cfg = tiny(folder, model={"backbone": "timm/convnext_atto"},
               data={"load_size": 64, "views": {"small": 2}})  # fmt: skip
    with pytest.raises(UserError, match=r"data.views.small_size: .* 32-px crops .* 64 px") as e:
        train(cfg, tmp_path / "run", progress_bar=False)
    assert "\n" not in str(e.value)


def test_the_micro_batch_is_fitted_to_the_card_for_a_library_backbone():
    """``train.micro_batch_size: auto`` (and so --autofit's start) from the estimator, which
    counts a timm model's activations by its stages."""
    from lowres_ssl.config import from_dict, validate
    from lowres_ssl.plan import Machine, resolve

    def fitted(backbone: str, card: float):
        cfg = validate(from_dict({
            "data": {"path": "cifar10", "load_size": 96},
            "model": {"backbone": backbone, "projector": "2048-16384"},
            "train": {"batch_size": 1024, "micro_batch_size": "auto"},
        }))  # fmt: skip
        return resolve(cfg, Machine.card(card), defaults=Pretraining.defaults).cfg.train

    small, large = fitted("timm/convnext_atto", 4), fitted("timm/convnext_atto", 48)
    assert small.batch_size == large.batch_size == 1024
    assert small.micro_batch_size < 1024 and large.micro_batch_size is None
    # A lighter model fits larger micro-batches on the same card.
    assert fitted("timm/resnet10t", 4).micro_batch_size >= small.micro_batch_size
