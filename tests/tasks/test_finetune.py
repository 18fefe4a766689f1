"""Supervised fine-tuning on the shared engine, predictions, and runs sized to a time budget."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lowres_ssl.config import from_dict, merge
from lowres_ssl.errors import UserError
from lowres_ssl.predict import predict
from lowres_ssl.run_layout import CLASSIFIER_LAST_FILE, SUBSET_FILE
from lowres_ssl.tasks import FineTuning, balanced_subset, train
from lowres_ssl.weights import load_classifier
from tests.tasks.conftest import CLASSES
from tests.tiny import interrupt_at


def ft_config(labeled, pretrained=None, **sections):
    train_dir, val_dir = labeled
    values = {
        "data": {"path": str(train_dir), "load_size": 16, "cache": "none", "num_workers": 0},
        "model": {"backbone": "resnet18"},
        "optim": {"name": "sgd", "weight_decay": 0.0, "warmup_epochs": 0, "final_lr_ratio": 0},
        "train": {
            "epochs": 3,
            "batch_size": 8,
            "precision": "fp32",
            "log_every": 1,
            "checkpoint_every": 4,
        },
        "eval": {"every_epochs": 0},
        "finetune": {
            "checkpoint": str(pretrained) if pretrained else None,
            "random_init": pretrained is None,
            "val": str(val_dir),
            "head_lr": 2.0,
            "backbone_lr": 0.05,
        },
    }
    return from_dict(merge(values, sections))


def records(run_dir, kind):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == kind]


def test_fine_tuning_trains_keeps_the_best_model_and_resumes_exactly(labeled, pretrained, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    summary = train(ft_config(labeled, pretrained), whole, task=FineTuning(), progress_bar=False)
    vals = records(whole, "val")
    assert [r["epoch"] for r in vals] == [1, 2, 3]  # every epoch, on the whole val set
    assert all(r["n_val"] == 18 for r in vals)
    best = max(vals, key=lambda r: r["val_top1"])  # the first of equals: strictly better wins
    assert summary["best_val_top1"] == best["val_top1"]
    assert summary["best_step"] == best["step"]
    assert summary["val_top1"] == vals[-1]["val_top1"]
    assert best["val_top1"] > 0.5  # chance is 1/3: the colours are learnt
    clf = load_classifier(whole)  # the best one, with its class names and validation record
    assert clf.classes == list(CLASSES) and clf.info["val_top1"] == best["val_top1"]
    assert clf.info["step"] == best["step"]
    assert (whole / CLASSIFIER_LAST_FILE).is_file()

    with pytest.raises(KeyboardInterrupt):
        train(
            ft_config(labeled, pretrained),
            cut,
            task=FineTuning(),
            progress_bar=False,
            on_step=interrupt_at(5),
        )
    train(ft_config(labeled, pretrained), cut, task=FineTuning(), resume=True, progress_bar=False)
    a = {r["step"]: r["loss"] for r in records(whole, "step")}
    b = {r["step"]: r["loss"] for r in records(cut, "step")}
    assert sorted(b) == sorted(a)
    assert all(abs(a[s] - b[s]) <= 1e-6 * abs(a[s]) for s in a)  # the same steps, resumed
    assert [r["val_top1"] for r in records(cut, "val")] == [r["val_top1"] for r in vals]
    final_a, final_b = (
        load_file(whole / CLASSIFIER_LAST_FILE),
        load_file(cut / CLASSIFIER_LAST_FILE),
    )
    assert all(torch.allclose(final_a[k], final_b[k], atol=1e-6) for k in final_a)


def test_the_pretrained_backbone_is_loaded_and_random_init_is_not(labeled, pretrained, tmp_path):
    from lowres_ssl.weights import load_weights

    cfg = ft_config(labeled, pretrained, train={"max_steps": 1})
    task = FineTuning()
    task.open_images(cfg, "cpu", False)
    model, note = task.build_model(cfg, None, None, resuming=False)
    saved = load_weights(pretrained).backbone
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in saved.items())
    assert "backbone from" in note
    rand = FineTuning()
    rand.open_images(ft_config(labeled), "cpu", False)
    model, note = rand.build_model(ft_config(labeled), None, None, resuming=False)
    assert note == "random init"
    assert not torch.equal(model.backbone.state_dict()["conv1.weight"], saved["conv1.weight"])


def test_backbone_and_head_get_their_own_learning_rates(labeled, pretrained):
    cfg = ft_config(labeled, pretrained, finetune={"backbone_lr": 0.01, "head_lr": 0.4})
    task = FineTuning()
    task.open_images(cfg, "cpu", False)
    model, _ = task.build_model(cfg, None, None, resuming=False)
    optimizer, peak = task.optimizer(cfg, model, global_batch=64)
    assert peak == pytest.approx(0.4 * 64 / 256)
    head = {id(p) for p in model.head.parameters()}
    for group in optimizer.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1  # a group is all head or all backbone
        want = 0.4 if in_head.pop() else 0.01
        assert group["lr"] == pytest.approx(want * 64 / 256)
    from lowres_ssl.optim import CosineSchedule

    lr = CosineSchedule(peak, 10, 0, 0.0).apply(optimizer, 5)  # the schedule keeps the ratio
    assert lr == pytest.approx(peak / 2)
    lrs = sorted({round(g["lr"] / lr, 9) for g in optimizer.param_groups})
    assert lrs == [pytest.approx(0.01 / 0.4), 1.0]


def test_freeze_backbone_leaves_it_bit_identical(labeled, pretrained, tmp_path):
    from lowres_ssl.weights import load_weights

    run = tmp_path / "frozen"
    cfg = ft_config(labeled, pretrained, finetune={"freeze_backbone": True}, train={"epochs": 1})
    train(cfg, run, task=FineTuning(), progress_bar=False)
    before = load_weights(pretrained).backbone
    after = load_classifier(run / CLASSIFIER_LAST_FILE)
    state = after.state
    assert all(torch.equal(state[f"backbone.{k}"], v) for k, v in before.items())  # BN too
    assert not torch.equal(state["head.weight"], torch.zeros_like(state["head.weight"]))


def test_a_class_balanced_fraction_is_reproducible_and_recorded(labeled, pretrained, tmp_path):
    labels = torch.tensor([0] * 40 + [1] * 20 + [2] * 10)
    rows = balanced_subset(labels, 3, fraction=0.1, seed=3)
    assert torch.bincount(labels[rows]).tolist() == [4, 2, 1]
    assert torch.equal(rows, balanced_subset(labels, 3, fraction=0.1, seed=3))
    assert not torch.equal(rows, balanced_subset(labels, 3, fraction=0.1, seed=4))
    per = balanced_subset(labels, 3, per_class=15, seed=0)
    assert torch.bincount(labels[per]).tolist() == [15, 15, 10]  # all of a smaller class

    run = tmp_path / "few"
    cfg = ft_config(labeled, pretrained, finetune={"per_class": 5}, train={"max_steps": 1})
    train(cfg, run, task=FineTuning(), progress_bar=False)
    record = json.loads((run / SUBSET_FILE).read_text())
    assert record["per_class_counts"] == {c: 5 for c in CLASSES}
    assert record["images"] == 15 and len(record["files"]) == 15
    assert all(f.split("/")[0] in CLASSES for f in record["files"])
    again = tmp_path / "again"
    train(cfg, again, task=FineTuning(), progress_bar=False)
    assert json.loads((again / SUBSET_FILE).read_text())["files"] == record["files"]


def test_predict_writes_a_row_per_good_image_and_lists_the_bad_one(labeled, pretrained, tmp_path):
    run = tmp_path / "ft"
    summary = train(ft_config(labeled, pretrained), run, task=FineTuning(), progress_bar=False)
    out = tmp_path / "pred.csv"
    # The training folder has a corrupt file: every good image gets a row, the bad one is listed.
    result = predict(run, labeled[0], out, batch_size=5)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 48 and result["images"] == 48 and result["skipped"] == 1
    assert "red/broken.png" in (tmp_path / "pred.skipped.txt").read_text()
    assert {r["class"] for r in rows} <= set(CLASSES)
    top5 = rows[0]["top3"].split(";")
    assert len(top5) == 3 and top5[0].split(":")[0] == rows[0]["class"]
    assert all(0 <= float(r["probability"]) <= 1 for r in rows)
    # On the validation folder its accuracy is the best model's validation top-1.
    val = predict(run, labeled[1], tmp_path / "val.csv")
    assert val["accuracy"] == pytest.approx(summary["best_val_top1"], abs=1e-9)
    feats = predict(pretrained, labeled[1], tmp_path / "f.npy", embeddings=True)

    array = np.load(tmp_path / "f.npy")
    assert array.shape == (18, 512) and feats["features"] == 512
    listed = (tmp_path / "f.paths.txt").read_text().split()
    assert len(listed) == 18 and listed[0].startswith("blue/")


def test_a_backbone_is_not_a_classifier(pretrained, labeled, tmp_path):
    with pytest.raises(UserError, match="not a classifier") as e:
        predict(pretrained / "backbone.safetensors", labeled[1], tmp_path / "p.csv")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"no classifier\.safetensors"):
        predict(pretrained, labeled[1], tmp_path / "p.csv")
