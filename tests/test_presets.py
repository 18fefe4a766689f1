"""Presets: discovery, loading, and the automatic choice by GPU memory."""

from __future__ import annotations

import pytest

from lowres_ssl import presets
from lowres_ssl.config import from_dict, validate
from lowres_ssl.errors import UserError


def test_every_preset_is_a_valid_config():
    found = presets.available()
    assert {"cpu", "8gb"} <= set(found)
    for name in found:
        _, values, meta = presets.load_preset(name)
        assert meta["description"] and "vram_gib" in meta
        values["data"] = {**values.get("data", {}), "path": "cifar10"}
        validate(from_dict(values))


def test_auto_choice_follows_the_card():
    assert presets.choose_auto(0) == "cpu"
    assert presets.choose_auto(7.7) == "8gb"  # an "8 GB" card reports a little less
    assert presets.choose_auto(80) in presets.available()
    with pytest.raises(UserError, match=r"no preset fits a GPU of 2\.0 GiB") as e:
        presets.choose_auto(2.0)
    assert "--preset cpu" in str(e.value)


def test_unknown_preset_lists_the_choices(tmp_path):
    with pytest.raises(UserError, match=r"unknown preset 'huge'; choose one of 8gb, cpu"):
        presets.load_preset("huge")
    own = tmp_path / "mine.yaml"
    own.write_text("description: mine\ntrain:\n  batch_size: 4\n")
    name, values, meta = presets.load_preset(str(own))
    assert name == "mine" and values == {"train": {"batch_size": 4}}
    assert meta == {"description": "mine"}
