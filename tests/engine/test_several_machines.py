"""Several machines, shown on one: every process of a launch must see the run folder the main
process locked (a one-line error on every process where one does not), and two
``accelerate launch`` launchers on 127.0.0.1, killed and resumed, train exactly as one machine.

``accelerate launch`` reaches gloo on CPUs only through ``--multi_gpu`` (torchrun): with
``--cpu``, or with neither where it sees fewer than two GPUs, it starts each machine's script
as a lone process that trains alone (docs/training.md#several-machines).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from lowres_ssl import run_layout
from lowres_ssl.config import dump_yaml
from lowres_ssl.engine import run_folder
from lowres_ssl.errors import UserError
from lowres_ssl.tasks import train
from tests.engine.test_distributed_training import _as_launched, _free_port
from tests.tiny import losses, tiny

ROOT = Path(__file__).resolve().parents[2]
#: The most one launch may take on 2 CPU cores (about 30 s); past it the test fails, not hangs.
LAUNCH_TIMEOUT_S = 300
UNSEEN = "cannot see the run folder of the main process"


# ---------------------------------------------------------------------------------------------
# The check itself: two gloo processes


def _enter(rank: int, world: int, port: int, launches: list[list[str]], results: str) -> None:
    """Process ``rank`` enters :func:`run_folder.exclusive` on its own folder of each launch
    in turn; writes what each raised ("" for nothing) to ``results/rank{rank}.json``."""
    _as_launched(rank, world, port)
    from accelerate import Accelerator

    accelerator, raised = Accelerator(cpu=True), []
    for folders in launches:
        try:
            with run_folder.exclusive(Path(folders[rank]), accelerator):
                raised.append("")
        except UserError as err:
            raised.append(str(err))
    Path(results, f"rank{rank}.json").write_text(json.dumps(raised))
    # Both ranks meet, then close gloo: a rank that exits with the group open can abort in
    # gloo's teardown ("terminate called without an active exception", SIGABRT; seen once in CI).
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


def test_every_process_must_see_the_folder_of_the_main_process(tmp_path):
    """Two processes that share the folder pass and leave no token. A machine with its own copy
    of the run at its path does not see the main's folder: both processes raise the same line,
    naming the process, where it looked and the fix (one spawn for both: 10-20 s on 2 cores)."""
    shared = tmp_path / "runs" / "x"
    copies = [tmp_path / f"machine{m}" / "runs" / "x" for m in range(2)]
    for copy in copies:  # a copy of one run on each machine
        copy.mkdir(parents=True)
        (copy / run_layout.CONFIG_FILE).write_text("seed: 0\n")
    launches = [[str(shared)] * 2, [str(c) for c in copies]]
    mp.start_processes(_enter, args=(2, _free_port(), launches, str(tmp_path)), nprocs=2,
                       start_method="spawn")  # fmt: skip
    raised = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    assert [r[0] for r in raised] == ["", ""]
    assert sorted(p.name for p in shared.parent.iterdir()) == [".x.lock"]  # no folder, no token
    line = raised[0][1]
    assert raised[1][1] == line
    assert "\n" not in line and UNSEEN in line
    assert "process 1 on " in line and f"(at {copies[1]})" in line and str(copies[0]) in line
    assert "every machine mounts at the same path" in line
    assert sorted(p.name for p in copies[0].parent.iterdir()) == [".x.lock", "x"]  # no token


def test_one_process_checks_nothing(tmp_path, monkeypatch):
    """No token file and no collective for one process."""

    def fail(*args):
        raise AssertionError("one process checked the folder")

    monkeypatch.setattr(run_folder, "_write_token", fail)
    monkeypatch.setattr(run_folder, "check_seen_by_every_process", fail)
    run = tmp_path / "runs" / "x"
    with run_folder.exclusive(run, SimpleNamespace(num_processes=1, is_main_process=True)):
        pass
    with run_folder.exclusive(run):
        pass
    assert [p.name for p in run.parent.iterdir()] == [".x.lock"]


# ---------------------------------------------------------------------------------------------
# Two launchers


class Launches:
    """``accelerate launch`` of train.py with two processes in all, on the CPU over loopback,
    one thread each, without the user's accelerate config; launch NAME logs to
    ``logs/NAME.log``, machine r of two works in ``machine{r}/``."""

    def __init__(self, tmp_path: Path) -> None:
        self.root, self.logs = tmp_path, tmp_path / "logs"
        self.logs.mkdir()
        self.env = {
            **os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
            "CUDA_VISIBLE_DEVICES": "", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT),
        }  # fmt: skip

    def one_machine(self, args: list[str], name: str) -> list[subprocess.Popen]:
        where = ["--num_machines", "1", "--main_process_port", str(_free_port())]
        return [self._start(where, args, self.root / name, name)]

    def two_machines(self, args: list[str], name: str) -> list[subprocess.Popen]:
        port = str(_free_port())
        launches = []
        for rank in range(2):
            where = ["--num_machines", "2", "--machine_rank", str(rank)]
            where += ["--main_process_ip", "127.0.0.1", "--main_process_port", port]
            cwd, log = self.root / f"machine{rank}", f"{name}-machine{rank}"
            launches.append(self._start(where, args, cwd, log))
        return launches

    def _start(self, where: list[str], args: list[str], cwd: Path, name: str):
        # --multi_gpu is torchrun, the launcher that starts gloo processes on CPUs too.
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--multi_gpu"]
        launcher += ["--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no"]
        cwd.mkdir(exist_ok=True)
        with open(self.logs / f"{name}.log", "w") as log:  # the child has its own descriptor
            return subprocess.Popen(
                [*launcher, *where, str(ROOT / "scripts" / "train.py"), *args], cwd=cwd,
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def finish(self, launches: list[subprocess.Popen]) -> list[int]:
        """The launchers' exit codes; past the timeout they are killed and the test fails."""
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        try:
            return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in launches]
        except subprocess.TimeoutExpired:
            kill(launches)
            pytest.fail(f"a launch ran past {LAUNCH_TIMEOUT_S} s (a hang?)\n{self.tails()}")

    def wait_for_checkpoint(self, run: Path, launches: list[subprocess.Popen]) -> None:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while run_layout.latest(run) is None:
            if time.monotonic() > deadline or any(p.poll() is not None for p in launches):
                kill(launches)
                pytest.fail(f"no checkpoint appeared in {run}\n{self.tails()}")
            time.sleep(0.05)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()

    def tails(self) -> str:
        logs = sorted(self.logs.glob("*.log"))
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in logs)


def kill(launches: list[subprocess.Popen]) -> None:
    """SIGKILL everything the launchers started, as when their machines die: each launcher's
    process group and its workers', whom torchrun starts in sessions of their own."""
    groups = set()
    for launcher in launches:
        try:
            tree = [launcher.pid] + [c.pid for c in psutil.Process(launcher.pid).children(True)]
        except psutil.NoSuchProcess:
            continue
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(pid))
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    for launcher in launches:
        launcher.wait(timeout=60)


def _config_file(tmp_path: Path, cfg) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(dump_yaml(cfg))
    return str(path)


@pytest.mark.slow
def test_two_machines_killed_and_resumed_train_as_one_machine(folder, tmp_path):
    """Machine 0 and machine 1 (own working folders, the run folder at one absolute path) are
    killed after the first checkpoint and resumed: the per-step losses and the backbone are
    bit for bit those of an uninterrupted one-machine run of two processes (about 70 s)."""
    cfg = tiny(folder, train={"batch_size": 4, "checkpoint_every": 3})  # 16 steps of 2 × 4
    args = ["--config", _config_file(tmp_path, cfg), "--out"]
    whole, cut = tmp_path / "whole", tmp_path / "shared" / "cut"
    launch = Launches(tmp_path)
    assert launch.finish(launch.one_machine([*args, str(whole)], "one")) == [0], launch.tails()

    killed = launch.two_machines([*args, str(cut)], "killed")
    launch.wait_for_checkpoint(cut, killed)
    kill(killed)
    assert not (cut / run_layout.SUMMARY_FILE).exists() and max(losses(cut)) < 16

    resumed = launch.two_machines([*args, str(cut), "--resume"], "resumed")
    assert launch.finish(resumed) == [0, 0], launch.tails()
    a, b = losses(whole), losses(cut)
    assert sorted(a) == list(range(1, 17)) and a == b  # bit for bit: the same floats
    wa = load_file(str(whole / run_layout.BACKBONE_FILE))
    wb = load_file(str(cut / run_layout.BACKBONE_FILE))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    summary = json.loads((cut / run_layout.SUMMARY_FILE).read_text())
    assert summary["processes"] == 2 and summary["steps"] == 16
    last = run_layout.latest(cut)
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in last.iterdir()}


def _one_line_on_both(launch: Launches, launches: list, name: str, where: Path) -> None:
    assert launch.finish(launches) == [1, 1], launch.tails()
    texts = [launch.log(f"{name}-machine{r}") for r in range(2)]
    errors = [[x for x in text.splitlines() if x.startswith("error: ")] for text in texts]
    assert errors[0] == errors[1] and len(errors[0]) == 1, launch.tails()
    assert UNSEEN in errors[0][0] and f"on {socket.gethostname()} (at {where})" in errors[0][0]
    assert not any("Traceback" in text for text in texts), launch.tails()


@pytest.mark.slow
def test_a_machine_without_the_run_folder_is_one_line_on_both(folder, tmp_path):
    """Machine 1 starts in another folder with a relative --out, which it resolves to a folder
    the main process does not use: a new run, and a --resume of machine 0's run (with --config
    and without), end on both machines with the same one line, no traceback and no hang
    (about 60 s)."""
    cfg = tiny(folder, train={"batch_size": 4, "max_steps": 2})
    args = ["--config", _config_file(tmp_path, cfg), "--out", "runs/x"]
    launch = Launches(tmp_path)
    machine0, machine1 = tmp_path / "machine0", tmp_path / "machine1"

    _one_line_on_both(launch, launch.two_machines(args, "new"), "new", machine1 / "runs" / "x")
    assert not (machine0 / "runs" / "x").exists()  # a failed start leaves no folder

    train(cfg, machine0 / "runs" / "x", progress_bar=False)  # machine 0's run, alone
    resumed = launch.two_machines([*args, "--resume"], "resume")
    _one_line_on_both(launch, resumed, "resume", machine1 / "runs" / "x")
    # Without --config each machine reads the run's own config.yaml, which machine 1 lacks:
    # it used to stop alone before the processes met, and leave machine 0 waiting for it.
    plain = launch.two_machines(["--out", "runs/x", "--resume"], "plain")
    _one_line_on_both(launch, plain, "plain", machine1 / "runs" / "x")
