"""The suite's standard tiny pre-training, and the helpers that stop its runs and compare them.

    train(tiny(folder, train={"epochs": 1}), run_dir, progress_bar=False)

``folder`` is a folder of images, such as the ``folder`` fixture of tests/engine/conftest.py
(64 images of 18 × 20 px in two subfolders, and one broken file).
"""

from __future__ import annotations

import json
import os
import signal

import torch
from safetensors.torch import load_file

from lowres_ssl.config import from_dict, merge


def tiny(folder, **sections):
    """8 steps per epoch of 8 images at 16 px; ResNet-18 with a 64-128 projector."""
    values = {
        "data": {"path": str(folder), "load_size": 16, "cache": "none", "num_workers": 0},
        "model": {"backbone": "resnet18", "projector": "64-128"},
        "optim": {"name": "lars", "base_lr": 0.3, "warmup_epochs": 0.5},
        "train": {
            "epochs": 2,
            "batch_size": 8,
            "precision": "fp32",
            "log_every": 1,
            "checkpoint_every": 3,
        },
    }
    return from_dict(merge(values, sections))


def losses(run_dir):
    """Step → loss, as the run folder's metrics logged them."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r["kind"] == "step"}


def assert_same_run(whole, cut, steps: int) -> None:
    """Two run folders logged the same per-step losses (1e-6) and ended with the same
    backbone."""
    a, b = losses(whole), losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    assert all(abs(a[s] - b[s]) <= 1e-6 * abs(a[s]) for s in a), (a, b)
    wa = load_file(str(whole / "backbone.safetensors"))
    wb = load_file(str(cut / "backbone.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7) for k in wa)


def interrupt_at(step):
    """An ``on_step`` hook that stops the run after ``step`` as Ctrl-C does."""

    def hook(progress, values):
        if progress.step == step:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: stop after this step

    return hook


def crash_at(step):
    """An ``on_step`` hook that fails at ``step`` as a crash would."""

    def hook(progress, values):
        if progress.step == step:
            raise RuntimeError("simulated crash")

    return hook
