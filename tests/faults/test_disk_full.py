"""A full disk while the kit writes — a checkpoint, metrics.jsonl, the decoded cache, the
exported weights — is one line naming the path and the space, leaves no partial file, keeps
the previous checkpoint, and ``--resume`` after freeing space continues exactly."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lowres_ssl import run_layout
from lowres_ssl.data import FolderImages, build_disk_cache
from lowres_ssl.data.folders import scan_folder
from lowres_ssl.errors import UserError
from lowres_ssl.files import is_disk_full
from lowres_ssl.tasks import train
from lowres_ssl.weights import BackboneSpec, random_backbone, save_safetensors
from tests.tiny import assert_same_run, tiny

FULL = OSError(errno.ENOSPC, "No space left on device")
#: What safetensors raises on a full disk (its own exception, the OS error in its words).
SAFETENSORS_FULL = RuntimeError(
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
    'left on device" })'
)


def test_the_full_disk_errors_are_recognised():
    assert is_disk_full(FULL) and is_disk_full(SAFETENSORS_FULL)
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    try:
        try:
            raise FULL
        except OSError as inner:
            raise RuntimeError("writing failed") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)  # what it was raised from counts
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(RuntimeError("shape mismatch"))


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text and text.startswith("the disk is full")
    return text


@pytest.mark.parametrize("error", [FULL, SAFETENSORS_FULL], ids=["oserror", "safetensors"])
def test_a_checkpoint_on_a_full_disk(folder, tmp_path, monkeypatch, error):
    from accelerate import Accelerator

    whole = tmp_path / "whole"
    train(tiny(folder), whole, progress_bar=False)
    plain = Accelerator.save_state
    calls = []

    def fills_up(self, output_dir, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:  # the second checkpoint (step 6): half a file, then the disk is full
            (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 1000)
            raise error
        return plain(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", fills_up)
    cut = tmp_path / "cut"
    with pytest.raises(UserError) as e:
        train(tiny(folder), cut, progress_bar=False)
    text = one_line(e)
    assert "the checkpoint of step 6" in text and ".tmp-step_00000006" in text
    assert "about " in text and " free" in text and f"--resume --out {cut}" in text
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["step_00000003"]
    assert run_layout.latest_intact(cut)[0].name == "step_00000003"
    monkeypatch.setattr(Accelerator, "save_state", plain)  # space freed
    train(tiny(folder), cut, resume=True, progress_bar=False)
    assert_same_run(whole, cut, steps=16)


def test_a_checkpoint_that_cannot_fit_is_refused_before_it_is_written(
    folder, tmp_path, monkeypatch
):
    """Less free space than the last checkpoint took: one line before any byte is written."""
    from lowres_ssl.engine import checkpointing

    free = iter([10**12, 10])  # plenty at step 3; 10 bytes at step 6
    monkeypatch.setattr(checkpointing, "free_bytes", lambda path: next(free))
    cut = tmp_path / "cut"
    with pytest.raises(UserError, match="the checkpoint of step 6") as e:
        train(tiny(folder), cut, progress_bar=False)
    assert "10 bytes free" in one_line(e)
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["step_00000003"]


def test_metrics_on_a_full_disk(folder, tmp_path, monkeypatch):
    from lowres_ssl.engine import reporting

    whole = tmp_path / "whole"
    train(tiny(folder), whole, progress_bar=False)
    writes = []

    def fills_up(path, mode="r", **kwargs):
        if str(path).endswith(run_layout.METRICS_FILE) and "a" in mode:
            writes.append(path)
            if len(writes) == 9:
                raise FULL
        return open(path, mode, **kwargs)

    monkeypatch.setattr(reporting, "open", fills_up, raising=False)
    cut = tmp_path / "cut"
    with pytest.raises(UserError, match="could not write the metrics") as e:
        train(tiny(folder), cut, progress_bar=False)
    assert f"--resume --out {cut}" in one_line(e)
    monkeypatch.undo()
    train(tiny(folder), cut, resume=True, progress_bar=False)
    assert_same_run(whole, cut, steps=16)


def test_the_decoded_cache_on_a_full_disk(folder, tmp_path, monkeypatch):
    def no_room(fd, offset, length):
        raise FULL

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    cache = tmp_path / "cache"
    images = FolderImages(scan_folder(folder), 16)
    with pytest.raises(UserError, match="could not write the decoded images") as e:
        build_disk_cache(images, cache, progress=False)
    text = one_line(e)
    needed = len(images) * 3 * 16 * 16  # every file's pixels, before any is found bad
    assert f"about {needed / 1000:.0f} KB needed" in text and "data.cache=none" in text
    assert list(cache.iterdir()) == []  # no partial build left behind


def test_exported_weights_on_a_full_disk(tmp_path, monkeypatch):
    from lowres_ssl import weights

    spec = BackboneSpec("resnet18", 32, True, 512)
    state = random_backbone(spec).state_dict()
    out = tmp_path / "backbone.safetensors"
    save_safetensors(state, spec, out)
    before = out.read_bytes()

    def fills_up(state, path, metadata=None):
        Path(path).write_bytes(b"\0" * 100)
        raise SAFETENSORS_FULL

    monkeypatch.setattr(weights, "save_file", fills_up)
    with pytest.raises(UserError, match="could not write the backbone's weights") as e:
        save_safetensors(state, spec, out)
    assert "MB needed" in one_line(e)
    assert out.read_bytes() == before  # the old file stays whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.safetensors"]


def _mount_tmpfs(where: Path, size_mb: int) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)],
        capture_output=True, check=False,
    )  # fmt: skip
    return done.returncode == 0


@contextlib.contextmanager
def small_disk(where: Path, size_mb: int):
    """A real disk of ``size_mb`` at ``where`` (a tmpfs), unmounted afterwards; the test
    skips where the machine does not let it mount one (it needs root)."""
    if shutil.which("mount") is None or not _mount_tmpfs(where, size_mb):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def fill(disk: Path) -> Path:
    """Write a file on ``disk`` until not one byte more fits."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        chunk = 2**20
        while chunk:
            try:
                os.write(fd, b"\0" * chunk)
            except OSError as err:
                assert is_disk_full(err)
                chunk //= 2
    finally:
        os.close(fd)
    return filler


@pytest.mark.slow
def test_metrics_on_a_small_real_disk(folder, tmp_path):
    """For real: the disk fills (another program's file) after the checkpoint at the end of
    the first epoch (step 16); metrics.jsonl then grows past its first 4 KB page at about
    step 18, before the next checkpoint (step 20), and finds no room. One line; with the
    file gone, --resume ends like a run never stopped."""
    sections = {"train": {"epochs": 4, "checkpoint_every": 10}}
    whole = tmp_path / "whole"
    train(tiny(folder, **sections), whole, progress_bar=False)
    with small_disk(tmp_path / "disk", 200) as disk:
        cut, filler = disk / "run", []
        with pytest.raises(UserError, match="could not write the metrics") as e:
            train(tiny(folder, **sections), cut, progress_bar=False,
                  on_step=lambda p, v: p.step == 17 and filler.append(fill(disk)))  # fmt: skip
        assert f"--resume --out {cut}" in one_line(e)
        assert run_layout.latest_intact(cut)[0].name == "step_00000016"
        filler[0].unlink()
        train(tiny(folder, **sections), cut, resume=True, progress_bar=False)
        assert_same_run(whole, cut, steps=32)


@pytest.mark.slow
def test_the_decoded_cache_on_a_small_real_disk(folder, tmp_path):
    """For real: a decoded cache of 3 MB asked for on a disk of 1 MB is one line, before a
    byte is decoded, and leaves nothing on that disk."""
    with small_disk(tmp_path / "disk", 1) as disk:
        cfg = tiny(folder, data={"cache": "disk", "cache_dir": str(disk), "load_size": 128})
        with pytest.raises(UserError, match="could not write the decoded images") as e:
            train(cfg, tmp_path / "run", progress_bar=False)
        assert "data.cache=none" in one_line(e)
        assert list(disk.iterdir()) == []


@pytest.mark.slow
def test_a_run_on_a_small_real_disk(folder, tmp_path):
    """For real, where the machine lets the test mount a tmpfs (root): a disk that holds one
    checkpoint but not two. The run stops with one line; moved to a larger disk, it resumes."""
    with small_disk(tmp_path / "disk", 110) as disk:
        run = disk / "run"
        cfg = tiny(folder, train={"keep_checkpoints": 2})
        with pytest.raises(UserError) as e:
            train(cfg, run, progress_bar=False)
        text = one_line(e)
        assert "could not write the checkpoint of step" in text and "--resume" in text
        kept = run_layout.checkpoints(run)
        assert kept and run_layout.latest_intact(run)[0] == kept[-1]
        assert not list((run / "checkpoints").glob(".tmp-*"))
        moved = tmp_path / "moved"
        shutil.copytree(run, moved)
    summary = train(cfg, moved, resume=True, progress_bar=False)
    assert summary["steps"] == 16 and torch.isfinite(torch.tensor(summary["final_loss"]))
