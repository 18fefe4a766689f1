"""The typed config: YAML in and out, layering, --set parsing and one-line validation errors."""

from __future__ import annotations

import re

import pytest

from lowres_ssl.config import (
    Config,
    dump_yaml,
    from_dict,
    load_yaml,
    merge,
    parse_set,
    to_dict,
    validate,
)
from lowres_ssl.errors import UserError


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = from_dict({"train": {"batch_size": 64}, "loss": {"kernel_weights": [1, 20]}})
    assert cfg.train.batch_size == 64 and cfg.loss.kernel_weights == [1.0, 20.0]
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))
    assert from_dict(load_yaml(path)) == cfg
    assert from_dict({}) == Config()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"train": {"batchsize": 1}}, r"unknown config key train\.batchsize; valid keys in train:"),
        ({"trian": {}}, "unknown config key trian; valid keys: data, model, loss"),
        ({"train": {"batch_size": "big"}}, r"train\.batch_size must be an integer, got 'big'"),
        ({"train": {"batch_size": 1.5}}, r"train\.batch_size must be an integer"),
        ({"train": {"batch_size": True}}, r"train\.batch_size must be an integer"),
        ({"optim": {"base_lr": "fast"}}, r"optim\.base_lr must be a number"),
        ({"train": {"max_steps": "x"}}, r"train\.max_steps must be an integer or null"),
        ({"loss": {"kernel_weights": 3}}, r"loss\.kernel_weights must be a list of numbers"),
        ({"model": {"grad_checkpointing": "yes"}}, "must be true or false"),
        ({"train": 5}, r"config key train must be a section"),
    ],
)
def test_type_errors_name_the_key(values, message):
    with pytest.raises(UserError, match=message) as e:
        from_dict(values)
    assert "\n" not in str(e.value)


def test_ints_are_accepted_where_numbers_are_expected():
    assert from_dict({"optim": {"base_lr": 2}}).optim.base_lr == 2.0


def test_merge_overrides_values_and_merges_sections():
    base = {"train": {"epochs": 10, "batch_size": 8}, "loss": {"options": {"a": 1}}}
    out = merge(base, {"train": {"epochs": 3}, "loss": {"options": {"b": 2}}})
    assert out == {"train": {"epochs": 3, "batch_size": 8}, "loss": {"options": {"b": 2}}}
    assert base["train"]["epochs"] == 10  # not modified


def test_set_values_are_yaml():
    out = parse_set(
        ["train.batch_size=128", "loss.kernel_weights=[1, 20, 20]", "train.max_steps=null",
         "data.path=/tmp/my photos", "model.grad_checkpointing=true"]
    )  # fmt: skip
    assert out == {
        "train": {"batch_size": 128, "max_steps": None},
        "loss": {"kernel_weights": [1, 20, 20]},
        "data": {"path": "/tmp/my photos"},
        "model": {"grad_checkpointing": True},
    }
    with pytest.raises(UserError, match="key=value"):
        parse_set(["train.batch_size"])


def test_validation_names_the_key_and_the_choices(tmp_path):
    ok = {"data": {"path": str(tmp_path)}}
    validate(from_dict(ok))
    cases = [
        ({"loss": {"name": "byol"}}, "loss.name is 'byol'; choose one of sfrik, vicreg"),
        ({"optim": {"name": "sgdw"}}, "optim.name is 'sgdw'; choose one of lars, adamw, sgd"),
        ({"model": {"backbone": "vit"}}, "choose one of resnet18, resnet34, resnet50"),
        ({"data": {"cache": "ram"}}, "choose one of auto, none, disk, gpu"),
        ({"data": {"recipe": "simclr"}}, "choose one of vicreg, auh, cifar, supervised"),
        ({"train": {"time_budget": "soon"}}, "time_budget 'soon' is not a duration"),
        ({"finetune": {"train_fraction": 1.5}}, r"finetune\.train_fraction must be in \(0, 1\]"),
        ({"finetune": {"train_fraction": 0.1, "per_class": 5}}, "set one"),
        ({"train": {"precision": "fp64"}}, "choose one of auto, bf16, fp16, fp32"),
        ({"train": {"batch_size": 0}}, r"train\.batch_size must be > 0"),
        ({"optim": {"state_bits": 16}}, "must be 8 or 32"),
        ({"model": {"projector": "2048-x"}}, "projector"),
        ({"data": {"path": str(tmp_path / "missing")}}, "is not a folder; pass a folder"),
        ({"data": {"path": "cifar10", "split": "unlabeled"}}, "choose one of train, test"),
    ]
    for values, message in cases:
        with pytest.raises(UserError, match=message) as e:
            validate(from_dict(merge(ok, values)))
        assert "\n" not in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_yaml(bad)
    assert to_dict(from_dict(load_yaml(_write(tmp_path / "empty.yaml", "")))) == to_dict(Config())


def _write(path, text):
    path.write_text(text)
    return path


def test_micro_batches_and_accumulation_are_not_combined(tmp_path):
    values = {"data": {"path": str(tmp_path)}, "eval": {"every_epochs": 0},
              "train": {"batch_size": 8, "micro_batch_size": 4, "accumulate_steps": 2}}  # fmt: skip
    with pytest.raises(UserError, match="set one"):
        validate(from_dict(values))


@pytest.mark.parametrize(
    ("views", "message"),
    [
        ({"layout": "dino"}, "data.views.layout is 'dino'; choose one of swav, obow"),
        ({"large": 0, "small": 4}, "data.views.large must be >= 1 with layout swav"),
        ({"large": 1, "small": 0}, "fewer than two views"),
        ({"layout": "obow", "large": 0, "small": 0}, "fewer than two views"),
        ({"small": "many"}, "data.views.small must be an integer, got 'many'"),
        ({"small_scale": [0.3, 0.1]}, "data.views.small_scale must be [low, high]"),
        ({"colour": 1}, "unknown config key data.views.colour"),
    ],
)
def test_bad_views_are_one_line_errors(views, message):
    with pytest.raises(UserError, match=re.escape(message)) as err:
        validate(from_dict({"data": {"path": "cifar10", "views": views}}))
    assert "\n" not in str(err.value)


def test_small_crops_on_photos_only_through_the_photos_overlay():
    from lowres_ssl.plan import resolve_views

    values = {"data": {"path": "cifar10"}, "photos": {"data": {"views": {"small": 6}}}}
    for size, crops in ((32, 0), (96, 6)):
        sized = from_dict({**values, "data": {**values["data"], "load_size": size}})
        resolved, _ = resolve_views(sized)
        assert resolved.data.views.small == crops and resolved.data.views.count == 2 + crops
    old = from_dict({"data": {"views": {"small": "auto", "photo_small": 6}}})  # an old config
    assert old.data.views.small == 0 and old.photos == values["photos"]
    obow = from_dict({"data": {"views": {"layout": "obow", "large": 2, "small": 3}}})
    assert obow.data.views.count == 6  # the whole image, 2 large, 3 small
