"""Damaged files the kit reads: the decoded cache cut short, bit-flipped or with a damaged
index is found when opened and decoded again with one line; ``config.yaml`` edited to nonsense
is one line naming the key. (Every checkpoint damaged: tests/engine/test_trainer_edges.py.)"""

from __future__ import annotations

import logging

import pytest
import torch

from lowres_ssl.data import FolderImages, build_disk_cache
from lowres_ssl.data.cache import IMAGES_FILE, INDEX_FILE, DamagedCache, cache_path, verify
from lowres_ssl.data.folders import scan_folder
from lowres_ssl.run_layout import CONFIG_FILE
from lowres_ssl.tasks import train
from tests.tiny import tiny


def _cut_short(folder):
    pixels = folder / IMAGES_FILE
    pixels.write_bytes(pixels.read_bytes()[:-4096])


def _bit_flip(folder):
    pixels = folder / IMAGES_FILE
    data = bytearray(pixels.read_bytes())
    for i in range(1000, 1000 + 4096):  # 4 KB of flipped bits, the size unchanged
        data[i] ^= 0xFF
    pixels.write_bytes(bytes(data))


def _index_cut(folder):
    index = folder / INDEX_FILE
    index.write_text(index.read_text()[:50])


def _index_emptied(folder):
    (folder / INDEX_FILE).write_text("{}")


def _pixels_gone(folder):
    (folder / IMAGES_FILE).unlink()


DAMAGE = {
    "cut short": (_cut_short, "holds"),
    "bit-flipped": (_bit_flip, "differ from their checksums"),
    "index cut": (_index_cut, "cannot be read"),
    "index emptied": (_index_emptied, "lacks entries"),
    "pixels gone": (_pixels_gone, "is missing"),
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_decoded_cache_is_found_and_rebuilt(folder, tmp_path, caplog, how):
    damage, reason = DAMAGE[how]
    images = FolderImages(scan_folder(folder), 16)
    cache = tmp_path / "cache"
    first = build_disk_cache(images, cache, progress=False)
    pixels = first.images.clone()
    where = cache_path(images, cache)
    damage(where)
    with pytest.raises(DamagedCache, match=reason):
        verify(where)
    with caplog.at_level(logging.WARNING, logger="lowres_ssl"):
        again = build_disk_cache(FolderImages(scan_folder(folder), 16), cache, progress=False)
    warned = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warned) == 1 and reason in warned[0] and "decoding the images again" in warned[0]
    assert torch.equal(again.images, pixels) and again.paths == first.paths
    verify(where)  # whole again


def test_an_intact_cache_is_reused_without_a_word(folder, tmp_path, caplog):
    cache = tmp_path / "cache"
    build_disk_cache(FolderImages(scan_folder(folder), 16), cache, progress=False)
    with caplog.at_level(logging.INFO, logger="lowres_ssl"):
        build_disk_cache(FolderImages(scan_folder(folder), 16), cache, progress=False)
    assert not [r for r in caplog.records if "damaged" in r.getMessage()]


def _resume_error(run, capsys) -> str:
    """What ``train.py --resume --out run`` says (it must fail with one line)."""
    from lowres_ssl.cli import train_main

    assert train_main(["--resume", "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def finished(folder, tmp_path_factory):
    run = tmp_path_factory.mktemp("cfg") / "run"
    train(tiny(folder, train={"max_steps": 3}), run, progress_bar=False)
    return run


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda c: c["train"].update(batch_size="many"), "batch_size"),
        (lambda c: c["optim"].update(base_lr=-1), "base_lr"),
        (lambda c: c.update(trian={"epochs": 2}), "trian"),
        (lambda c: c["data"].update(load_size=0), "load_size"),
        (lambda c: c["loss"].update(name=None), "loss.name"),
    ],
    ids=["wrong type", "negative", "unknown section", "zero", "null"],
)
def test_a_config_yaml_edited_to_nonsense_is_one_line(finished, tmp_path, capsys, edit, key):
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    values = yaml.safe_load((run / CONFIG_FILE).read_text())
    edit(values)
    (run / CONFIG_FILE).write_text(yaml.safe_dump(values))
    assert key in _resume_error(run, capsys)


def test_a_config_yaml_that_is_not_yaml_is_one_line(finished, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / CONFIG_FILE).write_text("train: {epochs: [1, 2\n")
    assert "is not valid YAML" in _resume_error(run, capsys)
