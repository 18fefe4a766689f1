"""A config made concrete for the machine: the view size from the images, the micro-batch
from the card, the one-line errors and warnings, --preset auto and --autofit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lowres_ssl import fit, presets
from lowres_ssl.cli import train_main, train_parser
from lowres_ssl.config import from_dict, validate
from lowres_ssl.data.sizes import choose_view_size, size_for_side
from lowres_ssl.errors import UserError

CUDA = torch.device("cuda")  # a device object only: nothing is allocated on it


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


def test_auto_sizes_resolve_and_a_set_size_is_kept(tmp_path):
    photos = str(folder(tmp_path / "photos", (640, 480)))
    cfg = validate(from_dict({"data": {"path": photos, "photo_size": 112}}))
    resolved, note = fit.resolve_view_size(cfg)
    assert (resolved.data.load_size, resolved.data.recipe) == (112, "vicreg")
    assert "views of 112 px" in note
    cfg = validate(from_dict({"data": {"path": photos, "load_size": 48}}))
    resolved, note = fit.resolve_view_size(cfg)
    assert (resolved.data.load_size, resolved.data.recipe, note) == (48, "cifar", None)


def test_the_loss_auto_is_the_photo_loss_on_photos_and_sfrik_on_small_images(tmp_path):
    photos = str(folder(tmp_path / "photos", (640, 480)))
    loss = {"name": "auto", "photo_name": "simclr"}
    on_photos, _ = fit.resolve_view_size(validate(from_dict({"data": {"path": photos},
                                                             "loss": loss})))  # fmt: skip
    assert on_photos.loss.name == "simclr"
    small = validate(from_dict({"data": {"path": "cifar10"}, "loss": loss}))
    assert fit.resolve_view_size(small)[0].loss.name == "sfrik"
    assert fit.keep_saved(small, {"loss": {"name": "vicreg"}}).loss.name == "vicreg"  # resume
    with pytest.raises(UserError, match=r"loss\.photo_name"):
        validate(from_dict({"loss": {"name": "auto", "photo_name": "byol"}}))


def gpu_config(**train):
    values = {"data": {"path": "cifar10", "load_size": 32}, "model": {"projector": "2048-16384"}}
    values["train"] = {"batch_size": 1024, **train}
    return validate(from_dict(values))


def test_auto_micro_batch_fits_the_card_and_keeps_the_batch():
    small, _, note = fit.resolve_micro_batch(gpu_config(micro_batch_size="auto"), CUDA, card=4)
    large, _, _ = fit.resolve_micro_batch(gpu_config(micro_batch_size="auto"), CUDA, card=48)
    assert small.train.batch_size == large.train.batch_size == 1024
    assert small.train.micro_batch_size < 1024 and large.train.micro_batch_size is None
    assert f"micro-batches of {small.train.micro_batch_size}" in note


def test_a_config_over_the_card_names_the_micro_batch_that_fits():
    with pytest.raises(UserError) as e:
        fit.resolve_micro_batch(gpu_config(), CUDA, card=4)
    message = str(e.value)
    assert "\n" not in message and "does not fit the 4.0 GiB card" in message
    fitted, _, _ = fit.resolve_micro_batch(gpu_config(micro_batch_size="auto"), CUDA, card=4)
    assert f"--set train.micro_batch_size={fitted.train.micro_batch_size} fits" in message


def test_resume_keeps_what_auto_resolved_to():
    cfg = validate(from_dict({"data": {"path": "cifar10"}, "train": {"micro_batch_size": "auto"}}))
    saved = {"data": {"load_size": 40, "recipe": "vicreg"}, "train": {"micro_batch_size": 64}}
    kept = fit.keep_saved(cfg, saved)
    assert (kept.data.load_size, kept.data.recipe, kept.train.micro_batch_size) == (
        40,
        "vicreg",
        64,
    )


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
