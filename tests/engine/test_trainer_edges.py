"""Edge cases of the engine found by an independent review: resume at the edges of a run or an
epoch, settings that validate but cannot work, and a changed image set."""

from __future__ import annotations

import json
import math

import pytest
from accelerate.state import AcceleratorState

from lowres_ssl.config import merge
from lowres_ssl.errors import UserError
from lowres_ssl.tasks import train
from tests.tiny import crash_at, interrupt_at
from tests.tiny import tiny as base_tiny


def tiny(folder, **sections):
    """The engine tests' tiny run (8 steps per epoch), for 1 epoch."""
    return base_tiny(folder, **merge({"train": {"epochs": 1}}, sections))


def records(run_dir, kind):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == kind]


def test_resume_of_a_finished_run_keeps_its_summary_and_skipped_files(folder, tmp_path):
    """--resume on a run that already finished trains nothing; it must not replace
    summary.json by one with final_loss NaN, 0 images/s, ~0 s of wall time, and an empty
    skipped_files.txt."""
    run = tmp_path / "run"
    first = train(tiny(folder), run, progress_bar=False)
    listed = (run / "skipped_files.txt").read_text()
    again = train(tiny(folder), run, resume=True, progress_bar=False)
    saved = json.loads((run / "summary.json").read_text())
    assert math.isfinite(saved["final_loss"]) and math.isfinite(again["final_loss"])
    assert saved["skipped_files"] == first["skipped_files"] == 1
    assert (run / "skipped_files.txt").read_text() == listed
    assert saved["wall_time_s"] >= first["wall_time_s"]


def test_ctrl_c_at_the_last_step_then_resume_closes_the_epoch(folder, tmp_path):
    """Ctrl-C on the last step of the run: the epoch's end (its metrics line, the epoch count)
    is skipped, and --resume never does it, so the run ends with 0 epochs and NaN loss."""
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny(folder), run, progress_bar=False, on_step=interrupt_at(8))
    summary = train(tiny(folder), run, resume=True, progress_bar=False)
    assert summary["epochs"] == 1
    assert math.isfinite(summary["final_loss"])
    epochs = records(run, "epoch")
    assert len(epochs) == 1 and isinstance(epochs[0]["loss_mean"], float)


def test_epoch_loss_mean_after_a_mid_epoch_resume_covers_the_whole_epoch(folder, tmp_path):
    """metrics.jsonl should read as one uninterrupted run, but the epoch's loss_mean after a
    resume is the mean over the steps of the resumed session only."""
    whole = tmp_path / "whole"
    train(tiny(folder), whole, progress_bar=False)
    cut = tmp_path / "cut"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny(folder), cut, progress_bar=False, on_step=crash_at(5))  # checkpoint: 3
    train(tiny(folder), cut, resume=True, progress_bar=False)
    a, b = records(whole, "epoch")[0], records(cut, "epoch")[0]
    assert b["loss_mean"] == pytest.approx(a["loss_mean"], rel=1e-6)


def test_resume_with_another_image_set_is_refused(folder, tmp_path, monkeypatch):
    """With one unreadable file, the folder loader (65 files) and the disk cache (64 images)
    order an epoch differently, so a resume cannot be exact: an explicit change of data.cache
    is refused by the config check, and a change that comes from data.cache: auto resolving
    differently (the free disk space changed) by the image count kept in the checkpoint."""
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(tiny(folder), cut, progress_bar=False, on_step=interrupt_at(3))
    disk = {"cache": "disk", "cache_dir": str(tmp_path / "cache")}
    with pytest.raises(UserError, match="another config"):
        train(tiny(folder, data=disk), cut, resume=True, progress_bar=False)
    import lowres_ssl.tasks.pretrain as tasks_module

    real = tasks_module.open_images
    monkeypatch.setattr(tasks_module, "open_images", lambda *a, **k: real(*a, **{**k, **disk}))
    with pytest.raises(UserError, match="image set has changed since step_00000003") as e:
        train(tiny(folder), cut, resume=True, progress_bar=False)
    assert "65 then, 64 now" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "loss",
    [
        {"mmd_path": "moments"},  # the default kernel has degree 3
        {"kernel_weights": [0.0, 0.0]},
        {"options": {"no_such_option": 1}},
    ],
)
def test_loss_settings_that_cannot_work_are_one_line_errors(folder, tmp_path, loss):
    """They pass validation, then fail as a raw ValueError/TypeError (a traceback from the
    CLI); mmd_path=moments only at the first step, leaving a run folder that --resume refuses
    to continue with a fixed config and a plain start refuses to overwrite."""
    run = tmp_path / "run"
    with pytest.raises(UserError):
        train(tiny(folder, loss=loss, train={"max_steps": 1}), run, progress_bar=False)
    assert not run.exists()


@pytest.fixture
def fresh_accelerator_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="fp16 on the CPU is the failing case"
)
def test_fp16_on_the_cpu_trains_or_is_a_one_line_error(folder, tmp_path, fresh_accelerator_state):
    """train.precision=fp16 validates, then on the CPU the first step dies with 'expected
    scalar type Half but found Float', after the run folder was created (no checkpoint)."""
    run = tmp_path / "run"
    try:
        train(tiny(folder, train={"precision": "fp16", "max_steps": 1}), run, progress_bar=False)
    except UserError as err:
        assert "\n" not in str(err)
        assert not run.exists()


def _damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one byte changed, same size: only the checksum tells
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "bit-flip"])
def test_resume_passes_over_a_damaged_checkpoint(folder, tmp_path, caplog, how):
    """The newest checkpoint's weights damaged (a full disk, a bad copy): --resume warns in one
    line and continues from the intact one before it, repeating the uninterrupted losses."""
    from tests.tiny import losses

    whole = tmp_path / "whole"
    train(tiny(folder), whole, progress_bar=False)
    cut = tmp_path / "cut"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny(folder), cut, progress_bar=False, on_step=crash_at(7))  # checkpoints 3, 6
    _damage(cut / "checkpoints" / "step_00000006" / "model.safetensors", how)
    with caplog.at_level("WARNING", logger="lowres_ssl"):
        train(tiny(folder), cut, resume=True, progress_bar=False)
    warned = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warned) == 1 and "step_00000006: model.safetensors" in warned[0]
    assert "resuming from step_00000003" in warned[0]
    a, b = losses(whole), losses(cut)
    assert sorted(b) == list(range(1, 9))
    assert all(abs(a[s] - b[s]) <= 1e-6 * abs(a[s]) for s in a), (a, b)


def test_resume_with_no_intact_checkpoint_is_a_one_line_error(folder, tmp_path):
    cut = tmp_path / "cut"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny(folder), cut, progress_bar=False, on_step=crash_at(4))  # checkpoint 3
    _damage(cut / "checkpoints" / "step_00000003" / "model.safetensors", "truncated")
    with pytest.raises(UserError, match=r"no intact checkpoint in .*step_00000003: model") as e:
        train(tiny(folder), cut, resume=True, progress_bar=False)
    assert "\n" not in str(e.value)


def test_one_training_per_run_folder(folder, tmp_path):
    """A second training into a folder in use is a one-line error naming the holder (before
    anything is set up or written); once the first ends, the folder can be used."""
    import os

    from lowres_ssl.engine import run_folder

    run = tmp_path / "run"
    with run_folder.exclusive(run):
        with pytest.raises(UserError, match=f"in use by process {os.getpid()} on ") as e:
            train(tiny(folder, train={"max_steps": 2}), run, progress_bar=False)
        assert "\n" not in str(e.value) and "choose another --out" in str(e.value)
        assert not run.exists()
    assert train(tiny(folder, train={"max_steps": 2}), run, progress_bar=False)["steps"] == 2


def test_a_killed_training_leaves_no_stuck_lock(tmp_path):
    import signal
    import subprocess
    import sys

    from lowres_ssl.engine import run_folder

    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from lowres_ssl.engine import run_folder\n"
         "with run_folder.exclusive(Path(sys.argv[1])):\n"
         "    print('held', flush=True); time.sleep(600)", str(run)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with (
        pytest.raises(UserError, match=f"in use by process {holder.pid}"),
        run_folder.exclusive(run),
    ):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    with run_folder.exclusive(run):  # the system released the dead process's lock
        pass


def test_exact_resume_with_the_embedding_cache(folder, tmp_path):
    """train.micro_batch_size below the batch: the regulariser sees the batch of 8, the network
    runs 3 images at a time; interrupted mid-epoch and resumed, the losses repeat."""
    from tests.tiny import losses

    cache = {"train": {"micro_batch_size": 3}}
    whole = tmp_path / "whole"
    train(tiny(folder, **cache), whole, progress_bar=False)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(tiny(folder, **cache), cut, progress_bar=False, on_step=interrupt_at(5))
    train(tiny(folder, **cache), cut, resume=True, progress_bar=False)
    a, b = losses(whole), losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(abs(a[s] - b[s]) <= 1e-6 * abs(a[s]) for s in a), (a, b)
    plain = tmp_path / "plain"
    train(tiny(folder), plain, progress_bar=False)
    # Step 1 sees the same weights and views; its loss differs from the plain step's only by
    # BatchNorm's statistics, per micro-batch here (as on several GPUs without SyncBN): the
    # cache was used. (Without BatchNorm the two are equal: tests/engine/test_steps.py.)
    assert losses(plain)[1] != a[1]
