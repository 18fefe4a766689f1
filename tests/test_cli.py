"""scripts/train.py's front end: flags, layering, --dry-run, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from lowres_ssl.cli import train_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def dry_run(capsys, *argv):
    assert train_main([*argv, "--dry-run"]) == 0
    text = capsys.readouterr().out
    return yaml.safe_load(text), text


def test_dry_run_layers_preset_flags_and_set(capsys, images, tmp_path):
    cfg, text = dry_run(
        capsys, "--preset", "cpu", "--data", str(images), "--epochs", "3", "--max-steps", "7",
        "--set", "train.batch_size=4", "--set", "loss.kernel_weights=[1, 20]",
        "--out", str(tmp_path / "r"),
    )  # fmt: skip
    assert cfg["preset"] == "cpu" and cfg["data"]["path"] == str(images)
    assert cfg["train"]["epochs"] == 3 and cfg["train"]["max_steps"] == 7
    assert cfg["train"]["time_budget"] is None
    assert cfg["train"]["batch_size"] == 4 and cfg["loss"]["kernel_weights"] == [1.0, 20.0]
    assert cfg["model"]["projector"] == "1024-2048"  # from the preset
    assert f"# run folder: {tmp_path / 'r'}" in text


def test_dry_run_of_an_fp16_config_works_without_a_gpu(capsys, images):
    """The config is checked, not the hardware: a config for a GPU can be read and printed on
    a laptop (training it there is a one-line error when it starts)."""
    cfg, _ = dry_run(capsys, "--preset", "cpu", "--data", str(images),
                     "--set", "train.precision=fp16")  # fmt: skip
    assert cfg["train"]["precision"] == "fp16"


def test_a_config_file_sits_between_preset_and_flags(capsys, images, tmp_path):
    own = tmp_path / "own.yaml"
    own.write_text(f"data:\n  path: {images}\ntrain:\n  batch_size: 2\n  epochs: 9\n")
    cfg, _ = dry_run(capsys, "--preset", "cpu", "--config", str(own), "--epochs", "4")
    assert cfg["train"]["batch_size"] == 2 and cfg["train"]["epochs"] == 4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "train.batchsize=3"], "unknown config key train.batchsize; valid keys"),
        (["--set", "train.batch_size=many"], "train.batch_size must be an integer"),
        (["--preset", "huge"], "unknown preset 'huge'; choose one of"),
        (["--data", "/no/such/folder"], "data.path /no/such/folder is not a folder"),
        (["--resume"], "--resume needs --out"),
        (["--set", "loss.name=byol"], "choose one of sfrik"),
        (["--time-budget", "5m", "--max-steps", "9"], "drop --max-steps / --epochs"),
        (["--time-budget", "tomorrow"], "is not a duration"),
    ],
)
def test_mistakes_are_one_line_errors(capsys, images, argv, message):
    base = ["--preset", "cpu", "--data", str(images)]
    assert train_main([*base, *argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_train_script_runs_and_resumes(images, tmp_path):
    """The script as users run it: a short run, then --resume with only --out."""
    out = tmp_path / "run"
    common = [
        "--set", "model.projector=32-64", "--set", "data.load_size=16",
        "--set", "train.batch_size=8", "--set", "data.num_workers=0",
        "--set", f"data.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--preset", "cpu"]
    run = subprocess.run(
        [*cmd, "--data", str(images), "--out", str(out), "--max-steps", "2", *common],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "kernels-community" not in run.stderr  # no third-party import noise in the log
    # stderr is a pipe, not a terminal: log lines instead of a carriage-return progress bar.
    assert "\r" not in run.stderr and "step 2/2 (epoch 0): loss " in run.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    again = subprocess.run(
        [*cmd[:2], "--resume", "--out", str(out), "--max-steps", "3"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    twice = subprocess.run(
        [*cmd, "--data", str(images), "--out", str(out), *common], capture_output=True, text=True
    )
    assert twice.returncode == 2 and "already holds a run; pass --resume" in twice.stderr


def test_ctrl_c_in_a_terminal_saves_a_checkpoint_and_exits_130(images, tmp_path):
    """SIGINT to the whole process group, decoding worker included, as a terminal sends it."""
    import os
    import signal
    import time

    out = tmp_path / "run"
    cmd = [
        sys.executable, str(ROOT / "scripts" / "train.py"), "--preset", "cpu",
        "--data", str(images), "--out", str(out), "--set", "model.projector=32-64",
        "--set", "data.load_size=16", "--set", "train.batch_size=4", "--set", "data.cache=none",
        "--set", "data.num_workers=1", "--set", "train.log_every=1", "--max-steps", "1000",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint saved. Continue with --resume" in err
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert (out / "checkpoints" / f"step_{max(steps):08d}").is_dir()
