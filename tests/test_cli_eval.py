"""scripts/evaluate.py, export.py and plot.py front ends: what they print and write, and
one-line errors (exit 2, no traceback) for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowres_ssl.cli_results import evaluate_main, export_main, plot_main
from lowres_ssl.config import from_dict
from lowres_ssl.tasks import train
from tests.eval.test_features import labeled_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("labeled")
    train_dir = labeled_folder(root / "train", per_class=10, seed=1)
    test_dir = labeled_folder(root / "test", per_class=4, seed=2, bad=False)
    return train_dir, test_dir


@pytest.fixture(scope="module")
def run(sets, tmp_path_factory):
    """A tiny finished run on the train folder, with the online monitor on the test folder."""
    train_dir, test_dir = sets
    out = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = from_dict(
        {
            "data": {"path": str(train_dir), "load_size": 16, "cache": "none", "num_workers": 0},
            "model": {"backbone": "resnet18", "projector": "32-64"},
            "optim": {"base_lr": 0.3, "warmup_epochs": 0.5},
            "train": {"epochs": 1, "batch_size": 8, "precision": "fp32", "log_every": 1},
            "eval": {"test": str(test_dir)},
        }
    )
    train(cfg, out, progress_bar=False)
    return out


def cli(main, capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_online_monitor_writes_knn_records(run):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in lines if r["kind"] == "knn"]
    assert len(knn) == 1 and knn[0]["step"] == 3  # 30 images, batches of 8: 3 steps
    assert knn[0]["n_train"] == 30 and knn[0]["n_test"] == 12 and knn[0]["k"] == 200
    assert 0 <= knn[0]["knn_top1"] <= knn[0]["knn_top5"] <= 1
    assert json.loads((run / "summary.json").read_text())["knn_top1"] == knn[0]["knn_top1"]


def test_evaluate_knn_then_linear_on_a_run_folder(run, sets, tmp_path, capsys):
    train_dir, test_dir = sets
    common = ["--checkpoint", run, "--train", train_dir, "--test", test_dir,
              "--cache-dir", tmp_path]  # fmt: skip
    code, out, err = cli(evaluate_main, capsys, "knn", *common)
    assert code == 0, err
    human, last = out.strip().splitlines()
    result = json.loads(last)
    assert human.startswith(f"kNN top-1 {result['knn_top1']:.3f} (k=200), top-5 ")
    assert "30 train / 12 test images" in human
    assert {"knn_top1", "knn_top5", "k", "knn20_top1", "n_train", "n_test", "checkpoint"} <= set(
        result
    )
    assert result["n_train"] == 30 and result["skipped_train"] == 1  # the broken file
    # The monitor's value at the end of training is the one of the final backbone.
    record = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["kind"] == "knn" and record["knn_top1"] == pytest.approx(result["knn_top1"])
    assert json.loads((run / "eval_knn.json").read_text()) == result

    code, out, err = cli(evaluate_main, capsys, "linear", *common)
    assert code == 0, err
    linear = json.loads(out.strip().splitlines()[-1])
    assert {"top1", "top5", "weight_decay"} <= set(linear)
    assert linear["feature_s"] == 0  # both sets from the feature cache
    assert (run / "eval_linear.json").is_file()

    code, out, err = cli(evaluate_main, capsys, "knn", *common, "--random-init")
    assert code == 0, err
    random = json.loads(out.strip().splitlines()[-1])
    assert random["random_init"] and random["feature_s"] > 0  # other weights: extracted
    assert json.loads((run / "eval_knn_random.json").read_text()) == random
    assert json.loads((run / "eval_knn.json").read_text()) == result  # not overwritten


def test_evaluate_script_at_random_init_without_a_checkpoint(sets, tmp_path):
    train_dir, test_dir = sets
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "knn", "--random-init",
         "--backbone", "resnet18", "--size", "16", "--train", str(train_dir),
         "--test", str(test_dir), "--cache-dir", str(tmp_path), "--k", "5"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["k"] == 5 and "knn20_top1" in result and result["checkpoint"] is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--checkpoint", "/no/such/run"], "--checkpoint /no/such/run does not exist"),
        (["--checkpoint", "{bad}"], "is not a readable weights file"),
        (["--checkpoint", "{run}", "--test", "{other}"], "has classes the train set lacks (fox)"),
        (["--checkpoint", "{run}", "--train", "/no/dir"], "/no/dir is not a folder"),
        (["--random-init", "--backbone", "resnet18"], "needs --size"),
        ([], "pass --checkpoint"),
        (["--checkpoint", "{run}", "--size", "0"], "--size must be > 0"),
    ],
)
def test_evaluate_mistakes_are_one_line_errors(run, sets, tmp_path, capsys, argv, message):
    train_dir, test_dir = sets
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not weights")
    other = labeled_folder(tmp_path / "other", classes=("cat", "fox"), per_class=1, bad=False)
    names = {"{run}": str(run), "{bad}": str(bad), "{other}": str(other)}
    argv = [names.get(a, a) for a in argv]
    base = ["--train", str(train_dir), "--test", str(test_dir), "--cache-dir", str(tmp_path)]
    code, out, err = cli(evaluate_main, capsys, "knn", *base, *argv)
    assert code == 2 and out == "" and "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after the progress bars of what was done before
    assert last.startswith("error: ") and message in last, err


def test_export_for_torchvision_prints_how_to_load_it(run, tmp_path, capsys):
    out = tmp_path / "resnet18.pth"
    code, text, err = cli(export_main, capsys, "--checkpoint", run, "--out", out)
    assert code == 0, err
    assert "exported resnet18 (CIFAR stem, 16 px, 512 features)" in text
    assert "model.maxpool = torch.nn.Identity()" in text
    assert json.loads((tmp_path / "resnet18.json").read_text())["stem"] == "cifar"
    import torchvision

    expected = {k for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")}
    assert set(torch.load(out, weights_only=True)) == expected  # torchvision's keys, no head
    code, _, err = cli(export_main, capsys, "--checkpoint", run, "--out", tmp_path / "x.bin",
                       "--format", "safetensors")  # fmt: skip
    assert code == 2 and "a safetensors export is a .safetensors file" in err


def test_plot_writes_a_png_of_one_run_or_reports_a_missing_one(run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "curves.png"
    code, text, err = cli(plot_main, capsys, run, "--out", out)
    assert code == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and text.strip() == f"wrote {out}"
    code, _, err = cli(plot_main, capsys, tmp_path / "nothing", "--out", out)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
