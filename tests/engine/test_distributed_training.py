"""Two CPU processes (gloo), as ``torchrun``/``accelerate launch`` start them: data-parallel
training with the global-batch regulariser, and an exact resume of a two-process run."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import load_file

from lowres_ssl.config import from_dict, to_dict
from lowres_ssl.eval import KNNMonitor, open_labeled
from lowres_ssl.weights import load_backbone
from tests.tiny import crash_at, losses, tiny


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_launched(rank: int, world: int, port: int) -> None:
    """The environment torchrun / accelerate launch give process ``rank``; one thread."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME="lo",
    )  # fmt: skip
    torch.set_num_threads(1)


def _rank(rank: int, world: int, port: int, values: dict, out: str, crash: int, resume: bool):
    _as_launched(rank, world, port)
    from lowres_ssl.tasks import train

    hook = crash_at(crash) if crash else None
    try:
        summary = train(from_dict(values), out, resume=resume, progress_bar=False, on_step=hook)
    except RuntimeError as err:
        if "simulated crash" not in str(err):
            raise
        return
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(summary, f)


def run_two(values: dict, out, *, crash: int = 0, resume: bool = False) -> None:
    mp.start_processes(
        _rank,
        args=(2, _free_port(), values, str(out), crash, resume),
        nprocs=2,
        start_method="spawn",
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(3)
    for i in range(32):  # two class folders, for the kNN monitor
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (18, 18, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"c{i % 2}" / f"{i}.png")
    return root


def test_two_processes_train_and_resume_exactly(folder, tmp_path):
    """4 images per process, 4 steps per epoch, 8 steps. The per-step losses are those of the
    global batch (the regulariser sees both processes' embeddings); a run crashed after step 5
    and resumed repeats the uninterrupted run's losses and final weights."""
    values = to_dict(tiny(folder, train={"batch_size": 4}, eval={"test": str(folder), "k": 5}))
    whole = tmp_path / "whole"
    run_two(values, whole)
    summaries = [json.loads((whole / f"rank{r}.json").read_text()) for r in range(2)]
    assert [s["processes"] for s in summaries] == [2, 2]
    assert summaries[0]["images"] == 8 * 2 * 4  # steps × processes × batch
    assert summaries[0]["final_loss"] == summaries[1]["final_loss"]  # one global loss
    assert sorted(p.name for p in (whole / "checkpoints").iterdir()) == [
        "step_00000006",
        "step_00000008",
    ]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {
        p.name for p in (whole / "checkpoints" / "step_00000008").iterdir()
    }

    # The monitor, its features computed by both processes on their shares, gives the value
    # of one process on the final backbone.
    record = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["kind"] == "knn" and record["step"] == 8
    backbone, _ = load_backbone(whole)
    sets = [open_labeled(str(folder), size=16, cache="none") for _ in range(2)]
    alone = KNNMonitor(*sets, every_epochs=1, k=5).run(backbone)
    assert (record["knn_top1"], record["knn_top5"]) == (alone["knn_top1"], alone["knn_top5"])
    assert record["n_train"] == alone["n_train"] == 32

    cut = tmp_path / "cut"
    run_two(values, cut, crash=5)
    assert sorted(losses(cut)) == [1, 2, 3, 4, 5]
    run_two(values, cut, resume=True)
    a, b = losses(whole), losses(cut)
    assert sorted(b) == list(range(1, 9))
    assert all(abs(a[s] - b[s]) <= 1e-6 * abs(a[s]) for s in a), (a, b)
    wa = load_file(str(whole / "backbone.safetensors"))
    wb = load_file(str(cut / "backbone.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7) for k in wa)


def _rank_budget(rank: int, world: int, port: int, values: dict, out: str):
    """A time-budgeted run whose two processes see different step times (2 and 3 s)."""
    _as_launched(rank, world, port)
    from lowres_ssl.tasks import train
    from tests.tasks.test_time_budget import Clock

    clock = Clock(2.0 + rank)
    summary = train(from_dict(values), out, progress_bar=False, on_step=clock.tick, clock=clock)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(summary, f)


def test_a_time_budget_with_two_processes_follows_the_main_clock(folder, tmp_path):
    """Each process measures its own clock; the main process's decides the warm-up's end and
    the total (and the re-fits), so both run the same steps and none waits for the other."""
    values = to_dict(
        tiny(folder, train={"batch_size": 4, "time_budget": "30s", "checkpoint_every": 1000})
    )
    out = tmp_path / "budget"
    mp.start_processes(
        _rank_budget, args=(2, _free_port(), values, str(out)), nprocs=2, start_method="spawn"
    )
    summaries = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    # The main process: 2 s steps, fitted after step 2 (4 s): 2 + (28.8 - 4) / 2 = 14 steps.
    assert [s["steps"] for s in summaries] == [14, 14]
