"""The training engine on CPU: the run folder, exact resume, failures, weights in and out."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lowres_ssl import run_layout
from lowres_ssl.config import Config, TrainConfig
from lowres_ssl.device import CPU_BF16_VARIABLE, cpu_has_native_bf16
from lowres_ssl.errors import UserError
from lowres_ssl.models import build_model
from lowres_ssl.plan import ACCELERATE_PRECISION, Machine, Plan, precision_for
from lowres_ssl.tasks import pretrain as pretrain_module
from lowres_ssl.tasks import train
from lowres_ssl.weights import load_init
from tests.tiny import assert_same_run, crash_at, interrupt_at, losses, tiny


def test_a_run_leaves_the_run_folder(folder, tmp_path):
    run = tmp_path / "run"
    cfg = tiny(folder, train={"epochs": 1}, data={"cache": "disk", "cache_dir": str(run.parent)})
    summary = train(cfg, run, progress_bar=False)
    names = sorted(p.name for p in run.iterdir() if p.name != "tensorboard")  # with the extra
    assert names == [
        "backbone.safetensors",
        "checkpoints",
        "config.yaml",
        "metrics.jsonl",
        "skipped_files.txt",
        "summary.json",
    ]
    assert summary["steps"] == 8 and summary["epochs"] == 1 and summary["images"] == 64
    assert json.loads((run / "summary.json").read_text())["steps"] == 8
    assert np.isfinite(summary["final_loss"]) and summary["images_per_s"] > 0
    # The bad file is listed once with its reason; the 64 good ones were trained on.
    listed = (run / "skipped_files.txt").read_text().splitlines()[1:]
    assert [line.split("\t")[0] for line in listed] == ["part0/broken.png"]
    assert summary["skipped_files"] == 1
    # Metrics: a line per step (log_every 1) and one for the epoch.
    kinds = [json.loads(x)["kind"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert kinds == ["step"] * 8 + ["epoch"]
    step = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss", "invariance", "mmd", "lr", "images_per_s"} <= set(step)
    # Checkpoints at steps 3 and 6 and at the end of the epoch (8); the last 2 kept.
    assert [p.name for p in run_layout.checkpoints(run)] == ["step_00000006", "step_00000008"]
    # The backbone: safetensors with the metadata to rebuild it.
    with safe_open(str(run / "backbone.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["backbone"] == "resnet18" and meta["image_size"] == "16"
    model = build_model("resnet18", "64-128", image_size=16)
    model.backbone.load_state_dict(load_file(str(run / "backbone.safetensors")))


@pytest.mark.parametrize("cache", ["none", "disk"])
def test_resume_after_ctrl_c_mid_epoch_repeats_the_same_steps(folder, tmp_path, cache):
    """Interrupted after step 5 (mid-epoch, off the checkpoint grid) and resumed, a run gives
    the same per-step losses and final weights as an uninterrupted one: same remaining
    batches, same augmentation, same 8-bit optimizer state. The online kNN monitor is on (the
    folder's two subfolders are its classes) and evaluates after each epoch in both."""
    sections = {
        "data": {"cache": cache, "cache_dir": str(tmp_path / "cache")},
        "eval": {"test": str(folder), "every_epochs": 1, "k": 5},
    }
    whole = tmp_path / "whole"
    train(tiny(folder, **sections), whole, progress_bar=False)

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(tiny(folder, **sections), cut, progress_bar=False, on_step=interrupt_at(5))
    assert run_layout.latest(cut).name == "step_00000005"
    assert max(losses(cut)) == 5
    train(tiny(folder, **sections), cut, resume=True, progress_bar=False)

    assert_same_run(whole, cut, 16)
    ka, kb = knn_records(whole), knn_records(cut)
    assert [r["step"] for r in ka] == [r["step"] for r in kb] == [8, 16]  # once per epoch
    assert [r["knn_top1"] for r in ka] == pytest.approx([r["knn_top1"] for r in kb])


def knn_records(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == "knn"]


def test_the_knn_monitor_does_not_change_training(folder, tmp_path):
    """The same run with the monitor on and off: equal per-step losses, bit for bit (it draws
    no random numbers, leaves BatchNorm statistics alone and restores train mode)."""
    on = tmp_path / "on"
    train(tiny(folder, eval={"test": str(folder), "k": 5}), on, progress_bar=False)
    off = tmp_path / "off"
    train(tiny(folder, eval={"every_epochs": 0}), off, progress_bar=False)
    assert losses(on) == losses(off)
    assert [r["step"] for r in knn_records(on)] == [8, 16] and knn_records(off) == []
    record = knn_records(on)[-1]
    assert record["n_train"] == 64 and record["n_test"] == 64 and record["eval_s"] > 0
    wa = load_file(str(on / "backbone.safetensors"))
    wb = load_file(str(off / "backbone.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_after_a_crash_starts_from_the_last_checkpoint(folder, tmp_path):
    whole = tmp_path / "whole"
    train(tiny(folder), whole, progress_bar=False)
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny(folder), crashed, progress_bar=False, on_step=crash_at(11))
    assert run_layout.latest(crashed).name == "step_00000009"  # 3, 6, 8 (epoch end), 9
    train(tiny(folder), crashed, resume=True, progress_bar=False)
    a, b = losses(whole), losses(crashed)
    assert sorted(b) == list(range(1, 17))  # steps 10 and 11 logged once, not twice
    assert all(abs(a[s] - b[s]) <= 1e-6 * abs(a[s]) for s in a)


def test_non_finite_losses_skip_steps_then_stop(folder, tmp_path, monkeypatch):
    make = pretrain_module.make_objective
    calls = {"n": 0}

    def flaky(cfg):
        objective = make(cfg)

        def forward(z1, z2):
            calls["n"] += 1
            loss = objective(z1, z2)
            return loss * float("nan") if calls["n"] in (2, 3) or calls["n"] >= 6 else loss

        forward.terms = {}
        return forward

    monkeypatch.setattr(pretrain_module, "make_objective", flaky)
    run = tmp_path / "run"
    with pytest.raises(UserError, match="3 non-finite losses in a row") as e:
        train(tiny(folder, train={"max_bad_steps": 3}), run, progress_bar=False)
    assert "\n" not in str(e.value) and "base_lr" in str(e.value)
    # Steps 2 and 3 were skipped and the run went on; 6, 7, 8 stopped it. The checkpoint of
    # step 6 (periodic; the parameters of step 5) is the last: the failure wrote none.
    assert sorted(losses(run)) == [1, 4, 5]
    assert run_layout.latest(run).name == "step_00000006"
    # ... kept whole and good: intact by its checksums, every weight finite, and a resume
    # (the objective healthy again) trains on from it.
    kept, passed = run_layout.latest_intact(run)
    assert kept == run_layout.latest(run) and passed == []
    weights = load_file(str(kept / "model.safetensors"))
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    monkeypatch.undo()
    summary = train(tiny(folder, train={"max_bad_steps": 3}), run, resume=True,
                    progress_bar=False)  # fmt: skip
    assert summary["steps"] == 16 and math.isfinite(summary["final_loss"])


def test_a_folder_holding_a_run_is_not_overwritten(folder, tmp_path):
    run = tmp_path / "run"
    train(tiny(folder, train={"max_steps": 2}), run, progress_bar=False)
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        train(tiny(folder, train={"max_steps": 2}), run, progress_bar=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and holds no run"):
        train(tiny(folder), other, progress_bar=False)
    with pytest.raises(UserError, match=r"another config \(model.projector: '64-128' → '64-256'"):
        train(tiny(folder, model={"projector": "64-256"}), run, resume=True, progress_bar=False)
    with pytest.raises(UserError, match="holds no run"):
        train(tiny(folder), tmp_path / "nothing", resume=True, progress_bar=False)


def test_resume_may_extend_a_finished_run(folder, tmp_path):
    run = tmp_path / "run"
    train(tiny(folder, train={"max_steps": 4}), run, progress_bar=False)
    summary = train(tiny(folder, train={"max_steps": 6}), run, resume=True, progress_bar=False)
    assert summary["steps"] == 6 and sorted(losses(run)) == [1, 2, 3, 4, 5, 6]


def test_init_loads_a_backbone_from_a_run_folder_or_file(folder, tmp_path):
    run = tmp_path / "run"
    train(tiny(folder, train={"max_steps": 2}), run, progress_bar=False)
    saved = load_file(str(run / "backbone.safetensors"))
    for source in (run, run / "backbone.safetensors", run_layout.latest(run)):
        model = build_model("resnet18", "64-256", image_size=16)  # another projector
        note = load_init(model, source)
        assert note.startswith("backbone")
        for k, v in model.backbone.state_dict().items():
            assert torch.equal(v, saved[k])
    wrong = build_model("resnet34", "64-128", image_size=16)
    with pytest.raises(UserError, match="backbone resnet18 in the file, resnet34 asked for"):
        load_init(wrong, run)
    (tmp_path / "weights.pt").write_bytes(b"pickle")
    with pytest.raises(UserError, match=r"--init .*weights\.pt is not a readable weights file"):
        load_init(wrong, tmp_path / "weights.pt")


def test_a_failed_start_leaves_no_run_folder(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not an image")
    run = tmp_path / "run"
    with pytest.raises(UserError, match="no usable image"):
        train(tiny(bad, data={"cache": "disk", "cache_dir": str(tmp_path)}), run)
    assert not run.exists()  # so the same command, fixed, can use the same --out


def test_out_of_memory_is_a_one_line_error_naming_what_to_try(folder, tmp_path, monkeypatch):
    def no_memory(cfg):
        def forward(z1, z2):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        return forward

    monkeypatch.setattr(pretrain_module, "make_objective", no_memory)
    cfg = tiny(folder)
    cfg.preset = "8gb"
    with pytest.raises(UserError) as e:
        train(cfg, tmp_path / "run", progress_bar=False)
    message = str(e.value)
    assert "\n" not in message and "preset 8gb at batch 8 per process (micro-batch 8)" in message
    assert "train.micro_batch_size=4" in message and "grad_checkpointing" in message


def resolve_precision(setting: str) -> str:
    """Accelerate's name of ``train.precision`` on this machine as a run plans it (fp16
    without CUDA: the run's one-line error)."""
    machine = Machine.this_one()
    chosen = precision_for(setting, machine)
    planned = Plan(Config(train=TrainConfig(precision=chosen)), machine)
    if problem := planned.hardware_problem():
        raise UserError(problem)
    return ACCELERATE_PRECISION[chosen]


def test_precision_auto_follows_the_launcher_then_the_device(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_precision("fp32") == "no"
    assert resolve_precision("bf16") == "bf16"
    expected = "no"
    if torch.cuda.is_available():
        expected = "bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16"
    assert resolve_precision("auto") == expected
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_...
    assert resolve_precision("auto") == "bf16"
    assert resolve_precision("fp32") == "no"  # the config wins
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    if torch.cuda.is_available():
        assert resolve_precision("auto") == "fp16"
    else:  # fp16 autocast needs CUDA: a one-line error, not a crash at the first step
        with pytest.raises(UserError, match="fp16 mixed precision needs a CUDA GPU"):
            resolve_precision("auto")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what the launcher exports by default
    assert resolve_precision("auto") == expected


def test_precision_auto_on_the_cpu_is_bf16_where_the_cpu_computes_it(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(CPU_BF16_VARIABLE)
    for avx512_bf16, amx, expected in [(True, False, "bf16"), (False, True, "bf16"),
                                       (False, False, "no")]:  # fmt: skip
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert cpu_has_native_bf16() is (expected == "bf16")
        assert resolve_precision("auto") == expected
        assert resolve_precision("fp32") == "no"  # the config wins
    monkeypatch.setenv(CPU_BF16_VARIABLE, "1")  # the user's override, both ways
    assert resolve_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setenv(CPU_BF16_VARIABLE, "0")
    assert resolve_precision("auto") == "no"
    monkeypatch.setenv(CPU_BF16_VARIABLE, "yes")
    with pytest.raises(UserError, match=r"LOWRES_SSL_CPU_BF16='yes': use 1 .* or 0"):
        resolve_precision("auto")


def test_tensorboard_events_when_installed(folder, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    train(tiny(folder, train={"max_steps": 2}), run, progress_bar=False)
    assert any((run / "tensorboard").iterdir())


def test_auto_sizes_are_resolved_recorded_and_kept_on_resume(folder, tmp_path):
    import yaml

    run = tmp_path / "run"
    auto = {"data": {"load_size": "auto", "recipe": "auto"}, "train": {"micro_batch_size": "auto"}}
    with pytest.raises(KeyboardInterrupt):
        train(tiny(folder, **auto), run, progress_bar=False, on_step=interrupt_at(3))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    # 18 × 20 images: small, trained at their size rounded to 8 px, the cifar recipe; on the
    # CPU the whole batch runs at once (it fits in RAM).
    assert saved["data"]["load_size"] == 16 and saved["data"]["recipe"] == "cifar"
    assert saved["train"]["micro_batch_size"] is None
    summary = train(tiny(folder, **auto), run, resume=True, progress_bar=False)
    assert summary["steps"] == 16
    uninterrupted = tmp_path / "whole"
    train(tiny(folder), uninterrupted, progress_bar=False)
    assert losses(run) == losses(uninterrupted)  # the same run as with the sizes given
