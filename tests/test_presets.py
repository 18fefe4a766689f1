"""Presets: discovery, loading, and the automatic choice by GPU memory."""

from __future__ import annotations

import pytest

from lowres_ssl import presets
from lowres_ssl.config import from_dict, validate
from lowres_ssl.errors import UserError


def test_every_preset_is_a_valid_config():
    found = presets.available()
    assert list(found) == ["cpu", "4gb", "6gb", "8gb", "12gb", "16gb", "24gb"]
    for name in found:
        _, values, meta = presets.load_preset(name)
        assert meta["description"] and "vram_gib" in meta
        values["data"] = {**values.get("data", {}), "path": "cifar10"}
        validate(from_dict(values))


@pytest.mark.parametrize(
    ("reported", "expected"),  # what torch reports for cards of these nominal sizes
    [(0, "cpu"), (3.8, "4gb"), (5.8, "6gb"), (7.7, "8gb"), (11.6, "12gb"), (15.6, "16gb"),
     (23.6, "24gb"), (79.2, "24gb")],
)  # fmt: skip
def test_auto_choice_follows_the_card(reported, expected):
    assert presets.choose_auto(reported) == expected


def test_auto_choice_errors_below_the_smallest_card():
    with pytest.raises(UserError, match=r"no preset fits a GPU of 2\.0 GiB") as e:
        presets.choose_auto(2.0)
    assert "--preset cpu" in str(e.value)


def test_unknown_preset_lists_the_choices(tmp_path):
    choices = "cpu, 4gb, 6gb, 8gb, 12gb, 16gb, 24gb"
    with pytest.raises(UserError, match=rf"unknown preset 'huge'; choose one of {choices}"):
        presets.load_preset("huge")
    own = tmp_path / "mine.yaml"
    own.write_text("description: mine\ntrain:\n  batch_size: 4\n")
    name, values, meta = presets.load_preset(str(own))
    assert name == "mine" and values == {"train": {"batch_size": 4}}
    assert meta == {"description": "mine"}
