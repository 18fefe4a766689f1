"""The plan: a config made concrete for a machine by one function — the view size from the
images, the photos overlay, the precision, the micro-batch from the card, the one-line errors
and warnings, --preset auto, --autofit; old configs read into today's keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lowres_ssl import config, plan, presets
from lowres_ssl.cli import train_main, train_parser
from lowres_ssl.config import from_dict, parse_set, validate
from lowres_ssl.data.sizes import choose_view_size, size_for_side
from lowres_ssl.engine.run_folder import config_differences
from lowres_ssl.errors import UserError
from lowres_ssl.plan import Machine
from lowres_ssl.tasks import Pretraining


def CARD(gib: float) -> Machine:
    return Machine.card(gib)


def folder(root, sides, count=6):
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        w, h = sides
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.jpg")
    return root


@pytest.mark.parametrize(
    ("side", "size"),
    [(32, 32), (28, 32), (20, 24), (64, 64), (96, 96), (100, 96), (480, 128), (3000, 128)],
)
def test_the_view_size_follows_the_images(side, size):
    assert size_for_side(side, photo_size=128) == size


def test_small_images_and_photos_get_their_sizes(tmp_path):
    small = choose_view_size(str(folder(tmp_path / "small", (32, 32))), photo_size=128)
    assert small.size == 32 and small.median_side == 32 and "small images" in small.reason
    photos = choose_view_size(str(folder(tmp_path / "photos", (640, 480))), photo_size=96)
    assert photos.size == 96 and photos.median_side == 480 and "photo size" in photos.reason
    assert choose_view_size("cifar10", 128).size == 32
    assert choose_view_size("stl10", 128).size == 96


PRETRAINING = Pretraining.defaults
HERE = Machine("cpu", 16.0, native_precision="fp32", found="a test CPU")


def resolved(values, machine=HERE, defaults=PRETRAINING):
    return plan.resolve(validate(from_dict(values)), machine, defaults=defaults).cfg


def test_auto_sizes_resolve_and_a_set_size_is_kept(tmp_path):
    photos = str(folder(tmp_path / "photos", (640, 480)))
    cfg = resolved({"data": {"path": photos}, "photos": {"data": {"load_size": 112}}})
    assert (cfg.data.load_size, cfg.data.recipe) == (112, "vicreg")
    cfg, note = plan.resolve_views(validate(from_dict({"data": {"path": photos}})))
    assert cfg.data.load_size == plan.PHOTO_SIZE and "views of 128 px" in note
    cfg = resolved({"data": {"path": photos, "load_size": 48}})
    assert (cfg.data.load_size, cfg.data.recipe) == (48, "cifar")


def test_the_photos_overlay_applies_on_photos_only(tmp_path):
    photos = str(folder(tmp_path / "photos", (640, 480)))
    overlay = {"loss": {"name": "simclr"}, "data": {"views": {"large_scale": [0.25, 1.0]}}}
    on_photos = resolved({"data": {"path": photos}, "photos": overlay})
    assert on_photos.loss.name == "simclr" and on_photos.data.views.large_scale == [0.25, 1.0]
    small = resolved({"data": {"path": "cifar10"}, "photos": overlay})
    assert small.loss.name == "sfrik" and small.data.views.large_scale is None
    assert on_photos.photos == small.photos == {}  # resolved: nothing left to apply
    with pytest.raises(UserError, match=r"photos\.loss"):
        from_dict({"photos": {"loss": {"nme": "simclr"}}})
    with pytest.raises(UserError, match=r"loss\.name"):
        validate(from_dict({"photos": {"loss": {"name": "byol"}}}))


def test_a_key_set_after_the_preset_holds_for_photos_too(tmp_path):
    """--set loss.name=vicreg over the cpu preset (whose photos say simclr) trains VICReg on
    photos as well: a later layer's key leaves the earlier layers' photos overlay."""
    photos = str(folder(tmp_path / "photos", (640, 480)))
    _, preset, _ = presets.load_preset("cpu")
    cfg = Pretraining().request([{"data": {"path": photos}}], preset=preset)
    assert resolved(config.to_dict(cfg)).loss.name == "simclr"
    cfg = Pretraining().request([parse_set([f"data.path={photos}", "loss.name=vicreg"])],
                                preset=preset)  # fmt: skip
    assert resolved(config.to_dict(cfg)).loss.name == "vicreg"


#: The cpu preset as it was written before the photos overlay (its four photo_* twins).
OLD_CPU_PRESET = {
    "data": {"load_size": "auto", "photo_size": 96, "cache": "disk", "recipe": "auto",
             "views": {"photo_large_scale": [0.25, 1.0]}},
    "model": {"backbone": "resnet18", "projector": "1024-2048"},
    "loss": {"name": "auto", "photo_name": "simclr", "lam": 1.0},
    "optim": {"name": "lars", "base_lr": 1.2, "warmup_epochs": 1, "state_bits": 32},
    "train": {"epochs": 1, "max_steps": 100, "batch_size": 32, "log_every": 5,
              "checkpoint_every": 25},
    "eval": {"max_train_images": 5000, "max_test_images": 1000, "untrained": True},
}  # fmt: skip


@pytest.mark.parametrize("kind", ["photos", "small"])
def test_an_old_config_with_photo_keys_resolves_as_today(tmp_path, kind):
    """A config.yaml written before the photos overlay reads into the overlay and resolves to
    the same run as today's preset, and a run folder holding it can be resumed."""
    path = str(folder(tmp_path / "p", (640, 480))) if kind == "photos" else "cifar10"
    _, preset, _ = presets.load_preset("cpu")
    today = resolved(config.merge(preset, {"data": {"path": path}}))
    old = resolved(config.merge(OLD_CPU_PRESET, {"data": {"path": path}}))
    assert config.to_dict(old) == config.to_dict(today)
    assert today.loss.name == ("simclr" if kind == "photos" else "sfrik")
    # What that version wrote to config.yaml: the autos it resolved, the photo keys as they were.
    resolved_then = {"data": {"path": path, "load_size": today.data.load_size,
                              "recipe": today.data.recipe, "views": {"small": 0}},
                     "loss": {"name": today.loss.name}}  # fmt: skip
    saved = config.merge(OLD_CPU_PRESET, resolved_then)
    assert config_differences(saved, config.to_dict(today)) == []


def gpu_config(**train):
    values = {"data": {"path": "cifar10", "load_size": 32}, "model": {"projector": "2048-16384"}}
    values["train"] = {"batch_size": 1024, **train}
    return plan.with_defaults(validate(from_dict(values)), PRETRAINING)


def test_auto_micro_batch_fits_the_card_and_keeps_the_batch():
    small, _, note = plan.resolve_micro_batch(gpu_config(micro_batch_size="auto"), CARD(4))
    large, _, _ = plan.resolve_micro_batch(gpu_config(micro_batch_size="auto"), CARD(48))
    assert small.train.batch_size == large.train.batch_size == 1024
    assert small.train.micro_batch_size < 1024 and large.train.micro_batch_size is None
    assert f"micro-batches of {small.train.micro_batch_size}" in note


def test_a_config_over_the_card_names_the_micro_batch_that_fits():
    with pytest.raises(UserError) as e:
        plan.resolve_micro_batch(gpu_config(), CARD(4))
    message = str(e.value)
    assert "\n" not in message and "does not fit the 4.0 GiB card" in message
    fitted, _, _ = plan.resolve_micro_batch(gpu_config(micro_batch_size="auto"), CARD(4))
    assert f"--set train.micro_batch_size={fitted.train.micro_batch_size} fits" in message


def test_resume_keeps_what_auto_resolved_to():
    cfg = validate(from_dict({"data": {"path": "cifar10"}, "train": {"micro_batch_size": "auto"}}))
    saved = {"data": {"load_size": 40, "cache": "none"},
             "train": {"micro_batch_size": 64, "precision": "bf16"}}  # fmt: skip
    kept = plan.resolve(cfg, CARD(8), defaults=PRETRAINING, saved=saved).cfg
    assert (kept.data.load_size, kept.data.cache, kept.train.micro_batch_size) == (40, "none", 64)
    assert kept.train.precision == "bf16"


def test_a_gpu_preset_without_a_gpu_says_so(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_main(["--preset", "8gb", "--data", "cifar10", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# preset 8gb is made for a 8 GB GPU, and this machine has no CUDA GPU" in out
    assert "--preset cpu is a quick CPU run" in out
    assert "# sized for the preset's 8 GB card" in out


@pytest.mark.parametrize("name", list(presets.available()))
def test_every_preset_dry_runs_with_its_memory_breakdown(capsys, name):
    assert train_main(["--preset", name, "--data", "cifar10", "--dry-run"]) == 0
    out = capsys.readouterr().out
    cfg = yaml.safe_load(out)
    assert isinstance(cfg["data"]["load_size"], int)
    assert cfg["train"]["micro_batch_size"] != "auto"
    breakdown = [line for line in out.splitlines() if line.startswith("#   ")]
    assert any("activations" in line for line in breakdown)
    assert any(line.startswith("# estimated peak") for line in out.splitlines())


def test_preset_auto_dry_run_prints_what_it_found_and_chose(capsys):
    assert train_main(["--preset", "auto", "--data", "cifar10", "--dry-run"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("# preset auto:"))
    assert "→ cpu" in line and "estimated peak" in line  # this test machine has no GPU


def test_help_lists_the_presets():
    text = train_parser().format_help()
    for name in presets.available():
        assert f"  {name} " in text
    assert "--autofit" in text


# ---------------------------------------------------------------------------------------------
# --autofit, with an injected out-of-memory


def test_autofit_halves_the_micro_batch_until_it_fits_and_leaves_no_trace():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from lowres_ssl.augment import build_augment
    from lowres_ssl.engine.autofit import PROBE_SEED, autofit
    from lowres_ssl.engine.steps import embedding_cache_step
    from lowres_ssl.losses import SFRIKLoss
    from lowres_ssl.models import build_model
    from lowres_ssl.optim import build_optimizer

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = build_model("resnet18", "32-64", image_size=16)
    optimizer = build_optimizer("lars", model, lr=0.1, weight_decay=0.0, state_bits=32)
    model, optimizer = accelerator.prepare(model, optimizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tried = []

    def make_step(micro):
        tried.append(micro)

        def step(*args, **kwargs):
            if micro > 4:
                raise torch.cuda.OutOfMemoryError("injected")
            return embedding_cache_step(*args, micro_batch_size=micro, **kwargs)

        return step

    augment = build_augment("cifar", 16)
    rng = torch.get_rng_state()
    g = torch.Generator().manual_seed(PROBE_SEED)
    images = torch.randint(0, 256, (12, 3, 16, 16), generator=g).to(torch.uint8)
    micro = autofit(
        make_step, model, SFRIKLoss(lam=1.0), lambda: augment.plan(images, generator=g),
        accelerator=accelerator, optimizer=optimizer, batch_size=12, micro_batch_size=12,
    )  # fmt: skip
    assert micro == 4 and tried == [12, 8, 4]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights, BN statistics
    assert not optimizer.state_dict()["state"]  # no momentum left behind
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random numbers untouched
    AcceleratorState._reset_state(reset_partial_state=True)


def test_this_machine_under_a_launcher_is_read_from_its_own_card(monkeypatch):
    """Before Accelerate starts, each process reads the card its local rank will train on
    (torch.cuda mocked at its boundary), the launcher's process count and mixed precision."""
    read = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"card {i}")
    monkeypatch.setattr(plan, "card_memory_gib", lambda i: read.append(i) or 7.76)
    monkeypatch.setattr(plan, "cuda_mixed_precision", lambda device: "bf16")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    machine = Machine.this_one()
    assert read == [1] and machine.found == "card 1 (7.8 GiB)"
    assert machine.cuda and machine.processes == 2 and machine.memory_gib == 7.76
    assert plan.precision_for("auto", machine) == "fp16"  # the launcher's choice
    assert plan.precision_for("fp32", machine) == "fp32"  # the config's wins
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what the launcher exports unasked
    assert plan.precision_for("auto", Machine.this_one()) == "bf16"
    monkeypatch.delenv("LOCAL_RANK")
    Machine.this_one()
    assert read[-1] == 0  # no launcher: the current device
