"""Files that change under a run: images deleted, truncated or replaced by something else
mid-epoch are skipped and listed and the run goes on (the end line counts what was used);
the whole data folder gone (unmounted) is one line, the last checkpoint kept, and ``--resume``
continues once it is back."""

from __future__ import annotations

import logging
import shutil

import pytest

from lowres_ssl import run_layout
from lowres_ssl.errors import UserError
from lowres_ssl.tasks import train
from tests.tiny import assert_same_run, interrupt_at, tiny


@pytest.fixture
def images(folder, tmp_path):
    """A copy of the 64 images (and one corrupt file) this test may damage."""
    return shutil.copytree(folder, tmp_path / "images")


def at_step(step: int, action):
    def hook(progress, values):
        if progress.step == step:
            action()

    return hook


def test_images_that_change_mid_epoch_are_skipped_and_listed(images, tmp_path, caplog):
    files = sorted(images.rglob("img*.png"))
    deleted, truncated, replaced = files[40:45], files[45:48], files[48:50]

    def damage():
        for f in deleted:
            f.unlink()
        for f in truncated:
            f.write_bytes(f.read_bytes()[:60])
        for f in replaced:
            f.write_text("not an image any more")

    run = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="lowres_ssl")
    summary = train(tiny(images, train={"epochs": 2}), run, progress_bar=False,
                    on_step=at_step(2, damage))  # fmt: skip
    assert summary["steps"] > 2  # the run went on
    listed = (run / run_layout.SKIPPED_FILE).read_text()
    for f in [*deleted, *truncated, *replaced]:
        assert f.relative_to(images).as_posix() in listed
    assert "part0/broken.png" in listed
    changed = len(deleted) + len(truncated) + len(replaced)
    assert summary["skipped_files"] == 1 + changed
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("done:")]
    assert f"skipped {1 + changed} files" in done[0]
    assert f"; {64 - changed} used" in done[0]  # of the 64 images the run started with


def test_the_data_folder_gone_mid_run_is_one_line_and_resume_continues(images, tmp_path):
    away = tmp_path / "unmounted"
    run = tmp_path / "run"
    cfg = tiny(images, train={"epochs": 2})
    with pytest.raises(UserError, match="is gone") as e:
        train(cfg, run, progress_bar=False, on_step=at_step(4, lambda: images.rename(away)))
    text = str(e.value)
    assert "\n" not in text and str(images) in text and "--resume" in text
    assert run_layout.latest(run).name == "step_00000003"
    away.rename(images)  # mounted again
    summary = train(cfg, run, resume=True, progress_bar=False)
    assert summary["steps"] == 16 and summary["skipped_files"] == 1


def test_an_emptied_mount_point_is_the_folder_gone(images, tmp_path):
    """Unmounted, the mount point stays, empty."""
    run = tmp_path / "run"

    def unmount():
        for p in list(images.iterdir()):
            shutil.rmtree(p)

    with pytest.raises(UserError, match="is gone"):
        train(tiny(images), run, progress_bar=False, on_step=at_step(4, unmount))


def leave_one_image_in_batch(images, cfg, position: int) -> list[str]:
    """Break every file of epoch 0's batch ``position`` but one good image (as files damaged
    while the run is away would); the broken files' paths."""
    from lowres_ssl.data.loader import EpochOrder, open_images

    files = open_images(images, load_size=16, cache="none", progress=False).files
    order = EpochOrder(len(files), cfg.train.batch_size, seed=cfg.train.seed)
    names = [files.paths[i] for i in order.batches(0)[position].tolist()]
    good = [n for n in names if n != "part0/broken.png"]
    broken = good[1:]
    for name in broken:
        (images / name).write_text("damaged")
    return broken


def test_a_batch_left_with_one_image_is_skipped_and_resume_stays_exact(images, tmp_path, caplog):
    """Bad files that leave one image in a batch (BatchNorm and the losses need two): the
    batch is passed over with one line, the run goes on, and a resume after it continues at
    the next batch — the same steps as a run never stopped."""
    cfg = tiny(images)
    broken = leave_one_image_in_batch(images, cfg, position=3)
    caplog.set_level(logging.INFO, logger="lowres_ssl")
    whole = tmp_path / "whole"
    summary = train(cfg, whole, progress_bar=False)
    assert summary["steps"] == 15  # 8 + 8 batches, one of them skipped
    said = [r.getMessage() for r in caplog.records if "usable image" in r.getMessage()]
    assert said == ["batch 3 of the epoch has 1 usable image(s) (its other files are bad, "
                    "listed in skipped_files.txt): skipped"]  # fmt: skip
    listed = (whole / run_layout.SKIPPED_FILE).read_text()
    assert all(name in listed for name in broken)

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, cut, progress_bar=False, on_step=interrupt_at(5))  # after the skip
    assert run_layout.latest(cut).name == "step_00000005"
    train(cfg, cut, resume=True, progress_bar=False)
    assert_same_run(whole, cut, 15)
