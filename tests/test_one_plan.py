"""One plan: ``--dry-run`` and the run resolve a config through the same function
(:func:`lowres_ssl.engine.setup.plan_run` → :func:`lowres_ssl.plan.resolve`) to the same
config, the launcher's processes and mixed precision change both alike, nothing is left
``auto``, and a task's own defaults hold from Python as from the command line."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from accelerate.state import AcceleratorState
from PIL import Image

from lowres_ssl import plan, presets
from lowres_ssl.cli import train_main
from lowres_ssl.config import from_dict, load_yaml
from lowres_ssl.engine import setup
from lowres_ssl.plan import Machine
from lowres_ssl.tasks import FineTuning, train
from tests.tiny import tiny

GPU_PRESETS = [name for name, gib in presets.card_sizes().items() if gib]


def images(root, side=32, count=8, classes=0):
    rng = np.random.default_rng(0)
    for i in range(count):
        where = root / f"c{i % classes}" if classes else root
        where.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(where / f"{i}.png")
    return root


def dry_run(capsys, argv) -> tuple[dict, str]:
    assert train_main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    return yaml.safe_load(out), out


class Planned(Exception):
    """Raised by the spy once the run has made its plan (a run this machine cannot make)."""


def stop_after_planning(monkeypatch) -> list:
    """Make the run stop right after :func:`setup.plan_run`; returns the list of its plans."""
    plans, real = [], setup.plan_run

    def spy(*args, **kwargs):
        plans.append(real(*args, **kwargs))
        raise Planned

    monkeypatch.setattr(setup, "plan_run", spy)
    return plans


def test_the_cpu_presets_run_writes_the_config_its_dry_run_printed(capsys, tmp_path):
    data = images(tmp_path / "images")
    argv = ["--preset", "cpu", "--data", str(data), "--out", str(tmp_path / "run")]
    argv += ["--max-steps", "2", "--set", "train.batch_size=4"]
    argv += ["--set", f"data.cache_dir={tmp_path / 'cache'}"]
    printed, _ = dry_run(capsys, argv)
    assert train_main(argv) == 0
    written = load_yaml(tmp_path / "run" / "config.yaml")
    assert written == printed
    assert plan.unresolved(from_dict(written)) == []


@pytest.mark.parametrize("name", GPU_PRESETS)
@pytest.mark.parametrize("data", ["cifar10", "photos"])
def test_a_gpu_presets_run_plans_what_its_dry_run_printed(capsys, monkeypatch, tmp_path, name,
                                                          data):  # fmt: skip
    """On a described card of the preset's size: the dry run's YAML is the plan the run
    makes before it starts (stopped there: this machine has no such card)."""
    gib = presets.card_sizes()[name]
    card = Machine.card(gib, here=True)
    monkeypatch.setattr(Machine, "this_one", classmethod(lambda cls: card))
    path = str(images(tmp_path / "p", side=160)) if data == "photos" else data
    argv = ["--preset", name, "--data", path, "--out", str(tmp_path / "run")]
    printed, out = dry_run(capsys, argv)
    assert "# estimated peak" in out and "sized for" not in out
    plans = stop_after_planning(monkeypatch)
    with pytest.raises(Planned):
        train_main(argv)
    (made,) = plans
    assert made.machine == card
    assert _dict(made) == printed
    assert plan.unresolved(made.cfg) == []
    assert made.cfg.train.precision == "bf16"


def _dict(made) -> dict:
    from lowres_ssl.config import to_dict

    return to_dict(made.cfg)


@pytest.mark.parametrize(("world", "launcher"), [("1", None), ("4", "bf16"), ("2", "fp16")])
def test_the_launchers_processes_and_precision_plan_the_dry_run_as_the_run(
    capsys, monkeypatch, tmp_path, world, launcher
):
    """``accelerate launch --num_processes N --mixed_precision P`` exports WORLD_SIZE and
    ACCELERATE_MIXED_PRECISION: the dry run plans the regulariser's gathered batch of N
    processes and precision P, as the run does (here on a described 8 GB card)."""
    monkeypatch.setenv("WORLD_SIZE", world)
    if launcher:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    else:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    real = Machine.this_one

    def card(cls):  # this machine's launcher variables, on an 8 GB card
        here = real()
        return Machine.card(8, processes=here.processes, launcher_precision=here.launcher_precision,
                            native_precision="bf16", here=True)  # fmt: skip

    monkeypatch.setattr(Machine, "this_one", classmethod(card))
    argv = ["--preset", "8gb", "--data", "cifar10", "--out", str(tmp_path / "run")]
    printed, out = dry_run(capsys, argv)
    peak = next(line for line in out.splitlines() if line.startswith("# estimated peak"))
    plans = stop_after_planning(monkeypatch)
    with pytest.raises(Planned):
        train_main(argv)
    (made,) = plans
    assert made.machine.processes == int(world)
    assert made.estimate.setting.processes == int(world)
    assert printed["train"]["precision"] == made.cfg.train.precision == (launcher or "bf16")
    assert _dict(made) == printed
    assert peak[2:] in made.lines  # the same estimate, printed


def test_the_launchers_precision_reaches_the_accelerator_on_the_cpu(monkeypatch, tmp_path):
    """A real run: ``train.precision: auto`` under ``--mixed_precision bf16`` trains bf16 and
    writes it to config.yaml (the plan's precision is the one Accelerate is given)."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setattr(plan, "cpu_has_native_bf16", lambda: False)
    data = images(tmp_path / "images")
    seen = []

    def on_step(progress, values):
        seen.append(str(AcceleratorState().mixed_precision))

    cfg = tiny(data, train={"precision": "auto", "max_steps": 1, "epochs": 1})
    AcceleratorState._reset_state(reset_partial_state=True)  # one state a process: a fresh one
    try:
        train(cfg, tmp_path / "run", on_step=on_step, progress_bar=False)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert load_yaml(tmp_path / "run" / "config.yaml")["train"]["precision"] == "bf16"
    assert seen == ["bf16"]


def test_fine_tuning_from_python_trains_with_fine_tunings_defaults(tmp_path):
    """``tasks.train(cfg, out, task=FineTuning())`` with a config that names no optimizer:
    fine-tuning's SGD, no warm-up, cosine to 0 and 20 epochs, its supervised augmentation —
    not pre-training's LARS with 10 warm-up epochs."""
    data = images(tmp_path / "labeled", count=8, classes=2)
    cfg = from_dict({
        "data": {"path": str(data), "load_size": 16, "cache": "none", "num_workers": 0},
        "finetune": {"random_init": True},
        "train": {"max_steps": 1, "batch_size": 4, "precision": "fp32"},
    })  # fmt: skip
    train(cfg, tmp_path / "run", task=FineTuning(), progress_bar=False)
    saved = load_yaml(tmp_path / "run" / "config.yaml")
    assert saved["optim"]["name"] == "sgd"
    assert (saved["optim"]["warmup_epochs"], saved["optim"]["final_lr_ratio"]) == (0.0, 0.0)
    assert saved["optim"]["weight_decay"] == 0.0
    assert (saved["train"]["epochs"], saved["data"]["recipe"]) == (20, "supervised")
    assert plan.unresolved(from_dict(saved)) == []
