"""--autofit on the CPU with the fp16 loss scaler and an out-of-memory injected where a card would
raise one: a failed trial leaves no scaled gradients behind, thrown-away probe steps do not
count, BatchNorm models stop at a micro-batch of 2, several processes are one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from lowres_ssl.engine.autofit import PROBE_SKIPS, autofit
from lowres_ssl.engine.steps import StepResult, embedding_cache_step, one_pass_step
from lowres_ssl.errors import UserError
from lowres_ssl.losses import SFRIKLoss
from tests.engine.test_distributed_training import _free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def scaled():
    """An Accelerator on the CPU with the fp16 loss scaler Accelerate would make on a GPU
    (it makes none on the CPU): its optimizers get it at ``prepare``."""
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    yield accelerator
    AcceleratorState._reset_state(reset_partial_state=True)


class SmallCardSGD(torch.optim.SGD):
    """SGD that notes the gradient norm it is handed and, while ``fail``, runs out of memory
    at the start of its update (where allocating the optimizer state does on a card)."""

    def __init__(self, params):
        super().__init__(params, lr=0.01, momentum=0.9)
        self.fail, self.norms = False, []

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))))
        if self.fail:
            raise torch.cuda.OutOfMemoryError("injected")
        return super().step(closure)


def mlp(q: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, q))


def views_of(generator: torch.Generator, n: int = 12) -> list[torch.Tensor]:
    return [torch.randn(n, 3, 4, 4, generator=generator) for _ in range(2)]


def test_a_trial_that_ran_out_of_memory_in_the_update_leaves_no_scaled_gradients(scaled):
    """GradScaler.step unscales, then the inner step runs out of memory and update() never
    runs: the next trial skipped the unscaling and handed the optimizer gradients still
    multiplied by 2^16. Every update must see gradients of the same size."""
    model = mlp()
    optimizer = SmallCardSGD(model.parameters())
    model, prepared = scaled.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(0)

    def make_step(micro):
        optimizer.fail = micro > 4
        return one_pass_step

    micro = autofit(
        make_step, model, SFRIKLoss(lam=1.0), lambda: views_of(generator),
        accelerator=scaled, optimizer=prepared, batch_size=12, micro_batch_size=12,
    )  # fmt: skip
    assert micro == 4
    assert len(optimizer.norms) == 4  # trials 12 and 8 fail in the update, 4 takes two steps
    smallest = min(optimizer.norms)
    assert max(optimizer.norms) < 100 * smallest, optimizer.norms  # 2^16 where it was stale
    assert scaled.scaler.get_scale() == 2.0**16  # the probe leaves the scale as it was


class ScriptedSteps:
    """A step that reports what ``outcomes`` says (applied, thrown away) and counts calls."""

    def __init__(self, *outcomes: StepResult):
        self.outcomes, self.calls = list(outcomes), 0

    def __call__(self, model, objective, views, **kwargs) -> StepResult:
        self.calls += 1
        return self.outcomes.pop(0) if self.outcomes else StepResult(1.0, {}, True)


def fit_with(steps: ScriptedSteps, accelerator) -> int:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    return autofit(
        lambda micro: steps, model, nn.Identity(), lambda: None,
        accelerator=accelerator, optimizer=optimizer, batch_size=8, micro_batch_size=8,
    )  # fmt: skip


def test_thrown_away_probe_steps_do_not_count_as_fitting(scaled):
    """A step whose update was skipped (fp16 overflow while the scaler finds its scale) has not
    allocated the optimizer state: the trial takes real steps until two were applied."""
    skipped = StepResult(1.0, {}, True, scaler_skipped=True)
    steps = ScriptedSteps(skipped, skipped, skipped, StepResult(1.0, {}, True))
    assert fit_with(steps, scaled) == 8 and steps.calls == 5


def test_a_probe_whose_loss_stays_non_finite_is_one_line_not_a_fit(scaled):
    steps = ScriptedSteps(*[StepResult(float("nan"), {}, False)] * (PROBE_SKIPS + 5))
    with pytest.raises(UserError, match=r"probe steps in a row thrown away.*not finite"):
        fit_with(steps, scaled)
    assert steps.calls == PROBE_SKIPS + 1


def test_a_model_with_batchnorm_stops_at_a_micro_batch_of_two(scaled):
    """BatchNorm1d refuses one value per channel in training: a micro-batch of 1 was a
    ValueError traceback; the search stops at 2 with the one-line "does not fit"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.BatchNorm1d(32), nn.Linear(32, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    tried = []

    def make_step(micro):
        tried.append(micro)

        def step(*args, **kwargs):
            if micro > 1:  # only a micro-batch of 1 would fit, and BatchNorm1d refuses it
                raise torch.cuda.OutOfMemoryError("injected")
            return embedding_cache_step(*args, micro_batch_size=micro, **kwargs)

        return step

    with pytest.raises(UserError, match="even a micro-batch of 2 runs out of memory"):
        autofit(
            make_step, model, SFRIKLoss(lam=1.0), lambda: views_of(generator),
            accelerator=scaled, optimizer=optimizer, batch_size=12, micro_batch_size=12,
        )  # fmt: skip
    assert tried == [12, 8, 4, 2]
    assert fit_with(ScriptedSteps(), scaled) == 8  # a model without BatchNorm may go to 1


TWO_RANKS = """
import os, sys, torch
rank = int(sys.argv[1])
os.environ.update(RANK=sys.argv[1], WORLD_SIZE="2", LOCAL_RANK=sys.argv[1], LOCAL_WORLD_SIZE="2",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], GLOO_SOCKET_IFNAME="lo")
torch.set_num_threads(1)
from accelerate import Accelerator
from lowres_ssl.engine.autofit import autofit
from lowres_ssl.engine.steps import one_pass_step
from lowres_ssl.errors import UserError
from lowres_ssl.losses import SFRIKLoss
from tests.engine.test_autofit import mlp, views_of
accelerator = Accelerator(cpu=True)
model = mlp()
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
model, optimizer = accelerator.prepare(model, optimizer)
generator = torch.Generator().manual_seed(rank)

def make_step(micro):
    def step(*args, **kwargs):
        if rank == 1 and micro > 4:  # one card is smaller, or busier
            raise torch.cuda.OutOfMemoryError("injected")
        return one_pass_step(*args, **kwargs)
    return step

try:
    micro = autofit(make_step, model, SFRIKLoss(lam=1.0), lambda: views_of(generator),
                    accelerator=accelerator, optimizer=optimizer, batch_size=12,
                    micro_batch_size=12)
    print("fitted", micro)
except UserError as err:
    print("refused", str(err).splitlines()[0])
"""


def test_several_processes_are_refused_in_one_line_on_every_rank(tmp_path):
    """An out-of-memory on one rank left the others in a collective (a hang under NCCL), and
    the ranks could settle on different micro-batches: every rank refuses at once instead."""
    port = str(_free_port())
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(script)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    ranks = [
        subprocess.Popen([*command, str(rank), port], cwd=ROOT, env=env, **pipes)
        for rank in range(2)
    ]
    outputs = []
    try:
        for p in ranks:
            out, err = p.communicate(timeout=120)
            outputs.append((out.strip().splitlines() or [err[-300:]])[-1])
    finally:
        for p in ranks:
            p.kill()
    assert len(outputs) == 2, outputs
    assert all(o.startswith("refused --autofit runs on one process") for o in outputs), outputs
