"""The monitor's sets and the eval section's checks (its effect on training, resume and several
processes are tested with the engine: tests/engine/)."""

from __future__ import annotations

import pytest

from lowres_ssl.config import from_dict, validate
from lowres_ssl.errors import UserError
from lowres_ssl.eval.monitor import eval_sets


def test_a_dataset_name_brings_its_own_test_split(tmp_path):
    cifar = from_dict({"data": {"path": "cifar10"}})
    assert eval_sets(cifar) == ("cifar10:train", "cifar10:test")
    stl = from_dict({"data": {"path": "stl10", "split": "train+unlabeled"}})
    assert eval_sets(stl) == ("stl10:train", "stl10:test")  # the labeled split for the bank
    assert eval_sets(from_dict({"data": {"path": "cifar10"}, "eval": {"every_epochs": 0}})) is None


def test_a_folder_needs_a_test_set_and_its_train_set_defaults_to_the_folder(tmp_path):
    folder = str(tmp_path)
    assert eval_sets(from_dict({"data": {"path": folder}})) is None  # no test set: off
    cfg = from_dict({"data": {"path": folder}, "eval": {"test": "cifar10:test"}})
    assert eval_sets(cfg) == (folder, "cifar10:test")
    cfg = from_dict({"data": {"path": folder}, "eval": {"test": folder, "train": "cifar10"}})
    assert eval_sets(cfg) == ("cifar10", folder)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"every_epochs": 2}, "eval.every_epochs is set but there is no test set"),
        ({"test": "/no/such/folder"}, "eval.test: /no/such/folder is not a folder"),
        ({"test": "cifar10:val"}, "eval.test split is 'val'; choose one of train, test"),
        ({"test": "cifar10", "k": 0}, "eval.k must be > 0"),
        ({"test": "cifar10", "every_epochs": -1}, "eval.every_epochs must be >= 0"),
    ],
)
def test_eval_settings_are_checked(tmp_path, section, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        validate(from_dict({"data": {"path": str(tmp_path)}, "eval": section}))


def test_evaluate_takes_its_default_sets_from_the_runs_saved_config(tmp_path):
    from lowres_ssl.eval.evaluate import run_sets

    assert run_sets({"data": {"path": "cifar10"}}) == ("cifar10:train", "cifar10:test")
    saved = {"data": {"path": str(tmp_path)}, "eval": {"test": "stl10:test"}}
    assert run_sets(saved) == (str(tmp_path), "stl10:test")
    assert run_sets({"a_section_from_the_future": {}}) == (None, None)
    assert run_sets(None) == (None, None)  # a file with no config: --train and --test needed


def test_digits_brings_its_test_split_and_a_folder_of_that_name_wins(tmp_path, monkeypatch):
    assert eval_sets(from_dict({"data": {"path": "Digits"}})) == ("digits:train", "digits:test")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()
    assert eval_sets(from_dict({"data": {"path": "digits"}})) is None  # a folder: no test set
