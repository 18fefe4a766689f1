"""Run a function in W processes on the gloo backend (CPU, loopback only) and collect results."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, fn: Callable, world: int, folder: str, args: tuple) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world
    )
    try:
        torch.save(fn(rank, world, *args), Path(folder) / f"result{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world: int, *args: Any) -> list[Any]:
    """``[fn(rank, world, *args) for each rank]``, each rank in its own gloo process.

    ``fn`` must be a module-level function (it is pickled into spawned processes); its result
    is saved with torch.save, so return tensors, numbers and containers of them.
    """
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(
            _worker, args=(fn, world, folder, args), nprocs=world, start_method="spawn"
        )
        return [torch.load(Path(folder) / f"result{r}.pt", weights_only=True) for r in range(world)]
