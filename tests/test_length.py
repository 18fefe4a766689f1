"""The plan's rule for long runs on photos (``photos.long``, :mod:`lowres_ssl.length`): the
``cpu`` preset trains SimCLR on photos in a short run and SFRIK (the Gaussian's degree weights,
q = 8,192) from 120,000 images seen; the run's length counted from epochs, steps or a time
budget; decided once (the dry run's line, the run folder's config, kept on resume); a key set
later holds at every length; a rule that cannot work is a one-line error."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from lowres_ssl import config, plan, presets
from lowres_ssl.cli import train_main
from lowres_ssl.config import TrainConfig, from_dict, load_yaml, parse_set, validate
from lowres_ssl.errors import UserError
from lowres_ssl.length import Choice, Length, LongRule, planned_length
from lowres_ssl.plan import Machine
from lowres_ssl.tasks import Pretraining

HERE = Machine("cpu", 16.0, native_precision="fp32", found="a test CPU")
GAUSSIAN = [10.0, 20.0, 26.7, 26.7, 21.3, 14.2]


def photos(root, count=6):
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.jpg")
    return str(root)


def cpu_plan(data: str, *sets: str, machine: Machine = HERE) -> plan.Plan:
    """The cpu preset's plan for ``data`` with ``--set``s, as the command line makes it."""
    _, preset, _ = presets.load_preset("cpu")
    request = Pretraining().request([parse_set([f"data.path={data}", *sets])], preset=preset)
    return plan.resolve(request, machine, defaults=Pretraining.defaults)


def count(n: int):
    return lambda: n


@pytest.mark.parametrize(
    ("train", "processes", "images", "how"),
    [
        ({"epochs": 1, "max_steps": 1000, "batch_size": 32}, 1, 281 * 32, "1 epoch of 32"),
        ({"epochs": 20, "max_steps": 100, "batch_size": 32}, 1, 3200, "100 steps of 32"),
        ({"epochs": 20, "batch_size": 32}, 2, 20 * 140 * 64, "20 epochs of 64"),
        ({"epochs": 1, "max_steps": 100, "time_budget": "1h"}, 1, 172_800, "1 h budget at 48"),
        ({"time_budget": 600, "batch_size": 8}, 4, 28_800, "10 min budget"),
    ],
)
def test_the_length_is_counted_as_the_run_will_train(train, processes, images, how):
    """Epochs over 9,000 images (the last partial batch dropped), capped by max_steps; a time
    budget at the rule's rate, whatever the epochs, steps or processes (the rate is measured
    per run)."""
    length = planned_length(TrainConfig(**train), processes, count(9000), images_per_s=48)
    assert length.images == images and how in length.how


def test_a_budgeted_run_does_not_count_the_images():
    def no_count():
        raise AssertionError("a time budget needs no count of the images")

    assert planned_length(TrainConfig(time_budget="30m"), 1, no_count, 48).images == 86_400


def test_the_cpu_preset_on_photos_trains_simclr_short_and_sfrik_long(tmp_path):
    data = photos(tmp_path / "photos")
    short = cpu_plan(data)  # the preset's own 100 steps: 3,200 images at most
    assert (short.cfg.loss.name, short.cfg.model.projector) == ("simclr", "1024-2048")
    assert any("a short run" in line and "under 120,000" in line for line in short.notes)
    long = cpu_plan(data, "train.time_budget=1h")  # 172,800 images at 48 images/s
    assert (long.cfg.loss.name, long.cfg.model.projector) == ("sfrik", "1024-8192")
    assert long.cfg.loss.kernel_weights == GAUSSIAN
    assert long.cfg.data.views.large_scale == [0.25, 1.0]  # the photos overlay as well
    assert any("a long run: about 172,800 images" in line for line in long.notes)
    assert long.cfg.photos == {} and plan.unresolved(long.cfg) == []
    # 30 minutes: 86,400 images, short; 45 minutes: 129,600, long
    assert cpu_plan(data, "train.time_budget=30m").cfg.loss.name == "simclr"
    assert cpu_plan(data, "train.time_budget=45m").cfg.loss.name == "sfrik"


def test_a_long_run_is_the_measured_variant(tmp_path):
    """The preset's long run is, key for key, the 60-minute run the study measured
    (``sfrik-expw-q8192``: the preset with three --set), so its numbers are the preset's."""
    data = photos(tmp_path / "photos")
    measured = ["loss.name=sfrik", "loss.kernel_weights=[10,20,26.7,26.7,21.3,14.2]"]
    measured.append("model.projector=1024-8192")
    study = cpu_plan(data, "train.time_budget=60m", *measured).cfg
    assert config.to_dict(cpu_plan(data, "train.time_budget=60m").cfg) == config.to_dict(study)


def test_the_threshold_is_counted_in_images_on_every_process(tmp_path):
    """119,999 images is short, 120,000 long; two processes see twice the images a step."""
    data = photos(tmp_path / "photos")
    rate = "photos.long.images_per_s=1"
    assert cpu_plan(data, rate, "train.time_budget=119999").cfg.loss.name == "simclr"
    assert cpu_plan(data, rate, "train.time_budget=120000").cfg.loss.name == "sfrik"
    # 10 steps of 2 images on each process: 20 images on one, 40 on two
    ten = ["photos.long.min_images=30", "train.batch_size=2", "train.epochs=100"]
    assert cpu_plan(data, *ten, "train.max_steps=10").cfg.loss.name == "simclr"
    two = HERE.with_processes(2)
    assert cpu_plan(data, *ten, "train.max_steps=10", machine=two).cfg.loss.name == "sfrik"
    # 100 epochs of 6 images: 600 images on one process or two (3 steps of 2, or 1 of 2 × 2)
    epochs = ["photos.long.min_images=500", "train.batch_size=2", "train.epochs=100"]
    epochs.append("train.max_steps=null")
    assert cpu_plan(data, *epochs).cfg.loss.name == "sfrik"
    assert cpu_plan(data, *epochs, machine=two).cfg.loss.name == "simclr"  # 400: 1 step of 4


def test_the_rule_is_turned_off_with_null(tmp_path):
    data = photos(tmp_path / "photos")
    off = cpu_plan(data, "train.time_budget=2h", "photos.long=null")
    assert (off.cfg.loss.name, off.cfg.model.projector) == ("simclr", "1024-2048")
    assert off.length is None and not any("photos.long" in line for line in off.notes)


def test_small_images_keep_sfrik_at_every_length():
    """The rule is part of the photos overlay: CIFAR-size images train the preset's SFRIK."""
    long = cpu_plan("cifar10", "train.time_budget=2h").cfg
    assert (long.loss.name, long.model.projector) == ("sfrik", "1024-2048")
    assert long.loss.kernel_weights == [1.0, 40.0, 40.0]


def test_a_key_set_later_holds_at_every_length(tmp_path):
    """--set model.projector overrides the rule's projector only; --set loss.name chooses the
    loss at every length, so the rule's whole section (a loss with its settings) steps aside."""
    data = photos(tmp_path / "photos")
    q4096 = cpu_plan(data, "train.time_budget=1h", "model.projector=1024-4096").cfg
    assert (q4096.loss.name, q4096.model.projector) == ("sfrik", "1024-4096")
    assert q4096.loss.kernel_weights == GAUSSIAN
    simclr = cpu_plan(data, "train.time_budget=1h", "loss.name=simclr")
    assert (simclr.cfg.loss.name, simclr.cfg.model.projector) == ("simclr", "1024-2048")
    assert not any("photos.long" in line for line in simclr.notes)
    sfrik = cpu_plan(data, "train.time_budget=1h", "loss.name=sfrik").cfg
    assert (sfrik.model.projector, sfrik.loss.kernel_weights) == ("1024-2048", [1.0, 40.0, 40.0])


def test_the_estimate_counts_the_long_runs_projector(tmp_path):
    """The memory estimate is of the plan's config: q = 8,192's projector and embeddings."""
    data = photos(tmp_path / "photos")
    short, long = cpu_plan(data), cpu_plan(data, "train.time_budget=1h")
    # the last layer 1024 → 8192 instead of 1024 → 2048 (no bias): 6,144 × 1,024 more fp32
    more = long.estimate.parts["weights"] - short.estimate.parts["weights"]
    assert more == 6144 * 1024 * 4
    assert long.estimate.total > short.estimate.total


def test_the_dry_run_says_why_and_the_run_keeps_the_loss_on_resume(capsys, tmp_path):
    """A run decided long trains SFRIK at q = 8,192 and its config.yaml says so; resumed with
    a longer or shorter length it keeps that loss (the rule is not decided again), and a short
    run resumed to a long length keeps SimCLR."""
    data = photos(tmp_path / "photos")
    common = ["--preset", "cpu", "--data", data, "--set", "train.batch_size=2"]
    common += ["--set", "train.precision=fp32", "--set", f"data.cache_dir={tmp_path / 'c'}"]
    common += ["--set", "eval.every_epochs=0", "--set", "eval.untrained=false"]
    # 2 steps of 2 images, against a threshold lowered to 4: long
    long_run = [*common, "--max-steps", "2", "--set", "photos.long.min_images=4"]
    long_run += ["--out", str(tmp_path / "long")]
    assert train_main([*long_run, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "# photos, a long run: about 4 images (2 steps of 2 images)" in printed
    assert yaml.safe_load(printed)["loss"]["name"] == "sfrik"
    assert train_main(long_run) == 0
    saved = load_yaml(tmp_path / "long" / "config.yaml")
    assert (saved["loss"]["name"], saved["model"]["projector"]) == ("sfrik", "1024-8192")
    resume = ["--resume", "--out", str(tmp_path / "long"), "--max-steps", "3"]
    assert train_main(resume) == 0
    assert load_yaml(tmp_path / "long" / "config.yaml")["loss"]["name"] == "sfrik"

    short_run = [*common, "--max-steps", "2", "--out", str(tmp_path / "short")]
    assert train_main(short_run) == 0
    capsys.readouterr()
    longer = ["--resume", "--out", str(tmp_path / "short"), "--time-budget", "2h", "--dry-run"]
    assert train_main(longer) == 0
    resumed = yaml.safe_load(capsys.readouterr().out)
    assert (resumed["loss"]["name"], resumed["model"]["projector"]) == ("simclr", "1024-2048")


@pytest.mark.parametrize(
    ("long", "message"),
    [
        ({"min_images": 10, "loss": {"name": "simclr"}}, r"photos\.long\.images_per_s is missing"),
        ({"min_images": 0, "images_per_s": 1}, r"photos\.long\.min_images must be > 0"),
        ({"min_images": "many", "images_per_s": 1}, r"photos\.long\.min_images must be"),
        ({"min_images": 1, "images_per_s": 1, "loss": {"nme": "x"}}, r"photos\.long\.loss\.nme"),
        ([1, 2], r"photos\.long must be a section"),
    ],
)
def test_a_rule_that_cannot_work_is_one_line(long, message):
    with pytest.raises(UserError, match=message):
        from_dict({"photos": {"long": long}})


def test_a_long_runs_value_that_cannot_work_names_its_key():
    values = {"photos": {"long": {"min_images": 1, "images_per_s": 1, "loss": {"name": "byol"}}}}
    with pytest.raises(UserError, match=r"config key photos\.long\.loss\.name"):
        validate(from_dict(values))


def test_the_rule_reads_its_section():
    rule = LongRule.of({"long": {"min_images": 5, "images_per_s": 2, "loss": {"name": "sfrik"}}})
    assert (rule.min_images, rule.images_per_s, rule.keys) == (5, 2.0, {"loss": {"name": "sfrik"}})
    assert LongRule.of({"loss": {"name": "simclr"}}) is None
    # a config with the rule written out and read back is the same config
    _, preset, _ = presets.load_preset("cpu")
    cfg = from_dict(preset)
    assert from_dict(yaml.safe_load(config.dump_yaml(cfg))) == cfg


def test_a_fitted_budget_is_checked_against_what_the_plan_counted():
    """The run's check (:mod:`lowres_ssl.engine.length_check`): silent where the images the
    budget fits fall on the plan's side of the threshold, one line with this machine's rate
    where not; a length in steps or epochs was counted exactly and is not checked."""
    rule = LongRule(120_000, 48.0, {})
    long = Choice(rule, Length(172_800, "a 1 h budget at 48 images/s", 3600.0), True)
    assert long.measured(130_000) is None
    slow = long.measured(68_400)  # 19 images/s: a 2-core CPU without bf16
    assert "under 120,000" in slow and "chose long" in slow
    assert slow.endswith("--set photos.long.images_per_s=19")
    short = Choice(rule, Length(86_400, "a 30 min budget at 48 images/s", 1800.0), False)
    assert short.measured(100_000) is None
    fast = short.measured(125_000)
    assert "at least 120,000" in fast and fast.endswith("images_per_s=69.4")
    exact = Choice(rule, Length(3_200, "100 steps of 32 images"), False)
    assert exact.measured(999_999) is None
