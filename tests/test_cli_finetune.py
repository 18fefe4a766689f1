"""scripts/finetune.py and scripts/predict.py: layering, --dry-run, a real run, one-line errors."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from lowres_ssl.cli import finetune_main
from lowres_ssl.cli_results import predict_main
from lowres_ssl.weights import BackboneSpec, random_backbone, save_safetensors

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A labeled train and val folder (2 classes) and a 16 px ResNet-18 backbone file."""
    base = tmp_path_factory.mktemp("ft_cli")
    rng = np.random.default_rng(2)
    for split, n in (("train", 8), ("val", 3)):
        for c, name in enumerate(("cats", "dogs")):
            (base / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 100, (20, 20, 3))
                pixels[..., c] += 150
                Image.fromarray(pixels.astype(np.uint8)).save(base / split / name / f"{i}.png")
    spec = BackboneSpec("resnet18", 16, True, 512)
    weights = save_safetensors(random_backbone(spec).state_dict(), spec, base / "bb.safetensors")
    return base / "train", base / "val", weights


def test_dry_run_takes_the_cards_settings_and_the_checkpoints_architecture(sets, capsys):
    train_dir, val_dir, weights = sets
    argv = ["--checkpoint", str(weights), "--train", str(train_dir), "--val", str(val_dir),
            "--preset", "8gb", "--train-fraction", "0.5", "--dry-run"]  # fmt: skip
    assert finetune_main(argv) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["preset"] == "8gb"
    assert cfg["optim"]["name"] == "sgd" and cfg["optim"]["state_bits"] == 8
    assert cfg["train"]["batch_size"] == 256  # fine-tuning's batch, not the regulariser's 2048
    assert cfg["model"]["backbone"] == "resnet18" and cfg["data"]["load_size"] == 16
    assert cfg["data"]["recipe"] == "supervised" and cfg["eval"]["every_epochs"] == 0
    assert cfg["finetune"]["train_fraction"] == 0.5
    assert cfg["finetune"]["checkpoint"] == str(weights)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--train", "X"], "needs --checkpoint"),
        (["--random-init"], "needs --train"),
        (["--random-init", "--train", "{train}", "--train-fraction", "2"], "train_fraction"),
        (["--checkpoint", "{train}", "--train", "{train}"], "no backbone.safetensors"),
        (["--random-init", "--train", "{train}", "--time-budget", "soon"], "not a duration"),
        (["--random-init", "--train", "{train}", "--time-budget", "5m", "--epochs", "2"], "drop"),
    ],
)
def test_finetune_mistakes_are_one_line_errors(sets, capsys, argv, message):
    argv = [a.format(train=sets[0]) for a in argv]
    assert finetune_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_finetune_then_predict_scripts(sets, tmp_path):
    train_dir, val_dir, weights = sets
    out = tmp_path / "ft"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "finetune.py"), "--checkpoint", str(weights),
         "--train", str(train_dir), "--val", str(val_dir), "--preset", "cpu", "--epochs", "2",
         "--set", "train.batch_size=4", "--set", "data.num_workers=0", "--set",
         "data.cache=none", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "validation top-1" in run.stdout and (out / "classifier.safetensors").is_file()
    csv_path = tmp_path / "p.csv"
    pred = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "predict.py"), "--checkpoint", str(out),
         "--images", str(val_dir), "--out", str(csv_path), "--num-workers", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert pred.returncode == 0, pred.stderr
    assert "predictions for 6 images" in pred.stdout and "accuracy against" in pred.stdout
    rows = list(csv.reader(csv_path.open()))
    assert rows[0] == ["path", "class", "probability", "top2"] and len(rows) == 7


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--images", "{val}"], "pass --out predictions.csv, or --embeddings"),
        (["--images", "{val}", "--out", "a.csv", "--embeddings", "b.npy"], "or --embeddings"),
        (["--images", "{val}", "--embeddings", "b.txt"], "is a .npy"),
        (["--images", "{val}", "--out", "/no/such/dir/a.csv"], "does not exist"),
        (["--images", "/no/such/images", "--out", "a.csv"], "/no/such/images"),
    ],
)
def test_predict_mistakes_are_one_line_errors(sets, capsys, tmp_path, argv, message):
    argv = ["--checkpoint", str(sets[2]), *[a.format(val=sets[1]) for a in argv]]
    argv = [str(tmp_path / a) if a in ("a.csv", "b.npy", "b.txt") else a for a in argv]
    assert predict_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
