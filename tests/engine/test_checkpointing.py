"""Checkpoints: when they are written, the last K kept, atomic names, what resume restores."""

import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from lowres_ssl import run_layout
from lowres_ssl.data import SkipLog
from lowres_ssl.engine.checkpointing import Checkpointer
from lowres_ssl.errors import UserError

from .fakes import done, state


@pytest.fixture
def prepared():
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    yield accelerator, model, optimizer
    AcceleratorState._reset_state(reset_partial_state=True)


def checkpointer(accelerator, run, rng, images=64):
    return Checkpointer(accelerator, run, every=2, keep=2, aug_rng=rng, images=images,
                        skips=lambda: SkipLog())  # fmt: skip


def test_every_n_steps_and_at_epoch_ends_the_last_k_kept_and_resume_restores(tmp_path, prepared):
    accelerator, model, _ = prepared
    run = tmp_path / "run"
    rng = torch.Generator().manual_seed(5)
    saver, s = checkpointer(accelerator, run, rng), state()
    for _ in range(5):
        s.count_step(done())
        saver.after_step(s, done())
    assert [p.name for p in run_layout.checkpoints(run)] == ["step_00000002", "step_00000004"]
    assert saver.unsaved(s)
    s.count_epoch()
    saver.after_epoch(s)
    assert not saver.unsaved(s)
    assert [p.name for p in run_layout.checkpoints(run)] == ["step_00000004", "step_00000005"]
    assert not list((run / "checkpoints").glob(".tmp-*"))  # written aside, then renamed
    assert (run / run_layout.SKIPPED_FILE).is_file() and len(s.timings["checkpoint"]) == 3
    saved = json.loads((run_layout.latest(run) / run_layout.STATE_FILE).read_text())
    assert saved["step"] == 5 and saved["epoch"] == 1 and saved["extra"]["images"] == 64
    expected = torch.rand(3, generator=rng)  # what the saved generator draws next

    fresh = torch.Generator().manual_seed(99)
    with torch.no_grad():
        model.weight.zero_()
    progress = checkpointer(accelerator, run, fresh).resume(run_layout.latest(run))
    assert (progress.step, progress.epoch) == (5, 1)
    assert not torch.all(model.weight == 0)  # the weights came back
    assert torch.equal(torch.rand(3, generator=fresh), expected)  # it continues from there


def test_resume_with_another_number_of_images_is_refused(tmp_path, prepared):
    accelerator, _, _ = prepared
    run = tmp_path / "run"
    saver, s = checkpointer(accelerator, run, torch.Generator()), state()
    s.count_step(done())
    saver.save(s)
    with pytest.raises(UserError, match="the image set has changed"):
        checkpointer(accelerator, run, torch.Generator(), images=65).resume(run_layout.latest(run))
