"""Weights that would run code — a pickle with a payload as ``.pt``, ``.pth``, a zipped
``torch.save`` file, renamed ``.safetensors``, and planted in a checkpoint folder with its
recorded checksum forged — given to every script and flag that reads weights: never executed
(the payload would create a file; it never exists), one line each."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from lowres_ssl import cli, cli_results, run_layout


class Payload:
    """Unpickled, it creates ``marker`` (as ``open(marker, "w")`` does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(tmp_path, marker):
    """name → a file that runs the payload when unpickled."""
    files = {}
    raw = pickle.dumps({"conv1.weight": Payload(marker)})
    for name in ("code.pt", "code.pth", "code.safetensors"):
        (tmp_path / name).write_bytes(raw)
        files[name] = tmp_path / name
    zipped = tmp_path / "zipped.pt"
    torch.save({"conv1.weight": Payload(marker)}, zipped)  # torch's zip format, pickled inside
    files["zipped.pt"] = zipped
    return files


def _forge(checkpoint, name, data):
    """Replace ``name`` in a checkpoint and forge its size and sha256 in the manifest."""
    (checkpoint / name).write_bytes(data)
    state_file = checkpoint / run_layout.STATE_FILE
    state = json.loads(state_file.read_text())
    state["files"][name] = [len(data), hashlib.sha256(data).hexdigest()]
    state_file.write_text(json.dumps(state))
    assert run_layout.damage(checkpoint) is None  # the forgery passes the checksum check


def _commands(bad, images, labeled, out):
    return {
        "train.py --init": (cli.train_main, [
            "--preset", "cpu", "--data", str(images), "--out", str(out / "t"), "--init", str(bad),
            "--max-steps", "1", "--set", "data.load_size=16", "--set", "data.cache=none",
            "--set", "data.num_workers=0",
        ]),
        "finetune.py --checkpoint": (cli.finetune_main, [
            "--checkpoint", str(bad), "--train", str(labeled), "--out", str(out / "f"),
            "--max-steps", "1", "--set", "data.num_workers=0",
        ]),
        "predict.py --checkpoint": (cli_results.predict_main, [
            "--checkpoint", str(bad), "--images", str(labeled), "--out", str(out / "p.csv"),
        ]),
        "evaluate.py --checkpoint": (cli_results.evaluate_main, [
            "knn", "--checkpoint", str(bad), "--train", str(labeled), "--test", str(labeled),
            "--num-workers", "0",
        ]),
        "export.py --checkpoint": (cli_results.export_main, [
            "--checkpoint", str(bad), "--out", str(out / "e.safetensors"),
        ]),
    }  # fmt: skip


def _refused(main, argv, bad, marker, capsys):
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0], err
    assert not marker.exists(), "the payload ran"


COMMANDS = list(_commands("x", "x", "x", Path("x")))


@pytest.mark.parametrize("command", COMMANDS)
def test_a_pickle_with_a_payload_is_never_run(finished, folder, tmp_path, capsys, command):
    labeled = finished[1]
    marker = tmp_path / "payload-ran"
    for name, bad in _plant(tmp_path, marker).items():
        out = tmp_path / f"out-{name}"
        out.mkdir()
        main, argv = _commands(bad, folder, labeled, out)[command]
        _refused(main, argv, bad, marker, capsys)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_payload_planted_in_a_checkpoint_folder_is_never_run(
    finished, folder, tmp_path, capsys, command
):
    """The checkpoint's weights replaced by a pickle, its manifest forged to match."""
    run, labeled = finished
    marker = tmp_path / "payload-ran"
    checkpoint = tmp_path / "step_00000003"
    shutil.copytree(run_layout.latest(run), checkpoint)
    _forge(checkpoint, "model.safetensors", pickle.dumps({"conv1.weight": Payload(marker)}))
    main, argv = _commands(checkpoint, folder, labeled, tmp_path)[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not marker.exists(), "the payload ran"


def test_resume_with_a_payload_in_the_optimizer_state_never_runs_it(finished, tmp_path, capsys):
    """``--resume`` reads the optimizer state (``torch.load(weights_only=True)``): a zipped
    pickle with a payload there, its checksum forged, is refused in one line."""
    run, _ = finished
    marker = tmp_path / "payload-ran"
    copy = shutil.copytree(run, tmp_path / "run")
    checkpoint = run_layout.latest(copy)
    buffer = tmp_path / "optimizer.bin"
    torch.save({"state": Payload(marker)}, buffer)
    _forge(checkpoint, "optimizer.bin", buffer.read_bytes())
    (copy / run_layout.SUMMARY_FILE).unlink()  # as if it had stopped there
    assert cli.train_main(["--resume", "--out", str(copy), "--max-steps", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "more than plain weights" in err[0] and "weights_only" not in err[0]
    assert not marker.exists(), "the payload ran"
