"""A run stopped from outside — SIGTERM or Ctrl-C, SIGKILL at any moment, before the first
checkpoint or before anything — loses nothing: a signal checkpoints at the next step boundary
and exits 128 + its number; after a kill ``--resume`` continues bit-identically; a run killed
before it wrote anything leaves no folder, or one that both ``--resume`` and a new start take."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowres_ssl import run_layout
from lowres_ssl.engine.stopping import Stopped
from lowres_ssl.tasks import train
from tests.tiny import assert_same_run, tiny

ROOT = Path(__file__).resolve().parents[2]


def signal_at(step: int, signum: int):
    def hook(progress, values):
        if progress.step == step:
            os.kill(os.getpid(), signum)  # as `kill` (SIGTERM) or a terminal (SIGINT) would

    return hook


@pytest.fixture(scope="module")
def whole(folder, tmp_path_factory):
    """The uninterrupted run every stopped one must equal."""
    run = tmp_path_factory.mktemp("whole") / "run"
    train(tiny(folder), run, progress_bar=False)
    return run


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_checkpoints_at_the_step_boundary(folder, whole, tmp_path, caplog, signum, code):
    cut = tmp_path / "cut"
    with pytest.raises(Stopped) as stop:
        train(tiny(folder), cut, progress_bar=False, on_step=signal_at(5, signum))
    assert stop.value.signum == signum and stop.value.exit_code == code
    assert run_layout.latest(cut).name == "step_00000005"  # off the every-3-steps rhythm
    said = [r.getMessage() for r in caplog.records if "stopped at step 5" in r.getMessage()]
    assert len(said) == 1 and f"--resume --out {cut}" in said[0]
    train(tiny(folder), cut, resume=True, progress_bar=False)
    assert_same_run(whole, cut, steps=16)


def test_the_command_exits_with_the_signals_code(monkeypatch, capsys):
    from lowres_ssl import cli

    def stopped(argv):
        raise Stopped(signal.SIGTERM)

    assert cli.exits_on_user_errors(stopped)(None) == 143


def spawn_training(
    folder: Path, run: Path, resume: bool = False, sections: dict | None = None
) -> subprocess.Popen:
    """A training of ``tiny(folder, **sections)`` in a child process, as a user's command
    runs it."""
    code = (
        "import sys; from pathlib import Path\n"
        "from tests.tiny import tiny\n"
        "from lowres_ssl.tasks import train\n"
        f"train(tiny(Path({str(folder)!r}), **{sections or {}!r}), Path({str(run)!r}), "
        f"resume={resume}, progress_bar=False)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.DEVNULL)


def kill_after_first_checkpoint(proc: subprocess.Popen, run: Path) -> None:
    """SIGKILL the child training into ``run`` once its first checkpoint exists."""
    deadline = time.monotonic() + 300
    while run_layout.latest(run) is None:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _kill_after(proc: subprocess.Popen, seconds: float) -> None:
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _continue(folder: Path, run: Path) -> None:
    """What a user does after a kill: --resume where a run was left, else start again."""
    if run.exists() and (run / run_layout.CONFIG_FILE).is_file():
        train(tiny(folder), run, resume=True, progress_bar=False)
    else:
        train(tiny(folder), run, progress_bar=False)


def test_killed_before_it_wrote_anything(folder, tmp_path):
    """SIGKILL in the first second (imports, setup): no folder, or one both ways continue."""
    run = tmp_path / "early"
    _kill_after(spawn_training(folder, run), 1.0)
    if run.exists():  # never a folder that --resume and a new start both refuse
        assert (run / run_layout.CONFIG_FILE).is_file() or not any(run.iterdir())
    train(tiny(folder, train={"max_steps": 2}), run, progress_bar=False, resume=run.exists())
    assert not list(run.parent.glob(f".{run.name}.new-*"))


def test_a_folder_left_without_its_config_is_taken(folder, tmp_path):
    """What an older version left when killed between making the folder and its config: an
    empty checkpoints folder. A new start takes it (nothing of a run is in it)."""
    run = tmp_path / "left"
    (run / run_layout.CHECKPOINTS_DIR).mkdir(parents=True)
    summary = train(tiny(folder, train={"max_steps": 2}), run, progress_bar=False)
    assert summary["steps"] == 2


def test_killed_after_the_first_checkpoint_resumes_exactly(folder, whole, tmp_path):
    run = tmp_path / "cut"
    kill_after_first_checkpoint(spawn_training(folder, run), run)
    _continue(folder, run)
    assert_same_run(whole, run, steps=16)


@pytest.mark.slow
def test_killed_at_random_moments_resumes_exactly(folder, whole, tmp_path):
    """Five runs, each SIGKILLed at random moments (setup, mid-step, mid-checkpoint) until it
    finishes: every one ends bit-identical to the uninterrupted run."""
    rng = random.Random(0)
    for attempt in range(5):
        run = tmp_path / f"run{attempt}"
        kills = 0
        while not (run / run_layout.SUMMARY_FILE).is_file() and kills < 6:
            resume = (run / run_layout.CONFIG_FILE).is_file()
            _kill_after(spawn_training(folder, run, resume=resume), rng.uniform(0.5, 12.0))
            kills += 1
        _continue(folder, run)
        assert_same_run(whole, run, steps=16)
