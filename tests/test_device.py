"""CPU threads under ``accelerate launch``: one process uses the cores unless the user said."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lowres_ssl import device
from lowres_ssl.device import available_cores, use_the_cores

PROBE = textwrap.dedent(
    """
    import torch
    from lowres_ssl.device import use_the_cores
    note = use_the_cores(1)
    print(torch.get_num_threads(), note is not None)
    """
)


def launch(tmp_path, omp: str | None) -> tuple[int, bool]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    out = subprocess.run([*cmd, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    threads, noted = out.stdout.split()[-2:]
    return int(threads), noted == "True"


needs_cores = pytest.mark.skipif(
    available_cores() < 2 or not sys.platform.startswith("linux"),
    reason="needs 2+ cores and Linux's /proc",
)


@needs_cores
def test_accelerate_launch_one_process_uses_the_cores(tmp_path):
    assert launch(tmp_path, None) == (available_cores(), True)


@needs_cores
def test_a_thread_count_the_user_set_is_kept(tmp_path):
    assert launch(tmp_path, "1") == (1, False)


def test_plain_python_and_several_processes_are_left_alone(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
    assert use_the_cores(1) is None  # plain python with OMP_NUM_THREADS=1: the user's
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    monkeypatch.setattr(device, "_launcher_environment", lambda pid: {})
    assert use_the_cores(2) is None  # several processes share the cores: one thread each
    assert torch.get_num_threads() == before


def test_without_proc_the_thread_count_is_kept_with_a_hint(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    monkeypatch.setattr(device, "available_cores", lambda: 4)
    monkeypatch.setattr(device, "_launcher_environment", lambda pid: None)
    note = use_the_cores(1)
    assert note is not None and "OMP_NUM_THREADS=4" in note
    assert torch.get_num_threads() == before


def test_process_age_counts_from_the_start_of_the_process():
    """A time budget counts the interpreter's start and the imports: a process that slept 1 s
    before asking is at least 1 s old (and younger than the test's timeout)."""
    import subprocess
    import sys

    code = (
        "import time; time.sleep(1.0); "
        "from lowres_ssl.device import process_age_s; print(process_age_s())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    age = float(out.stdout)
    assert 1.0 <= age < 60
