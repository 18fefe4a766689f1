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


# ---------------------------------------------------------------------------------------------
# Devices by name, and the emulated card, with torch.cuda mocked at its boundary


def test_two_names_of_one_device_are_the_same_device(monkeypatch):
    from lowres_ssl.device import canonical_device, cuda_index, same_device

    assert torch.device("cpu") != torch.device("cpu:0")  # what == says (and cuda vs cuda:0)
    assert same_device("cpu", "cpu:0") and same_device(torch.zeros(1).device, "cpu:0")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert canonical_device("cuda") == torch.device("cuda", 1) == canonical_device(1)
    assert same_device(torch.device("cuda"), "cuda:1") and not same_device("cuda", "cuda:0")
    assert not same_device("cpu", "cuda:1")
    assert cuda_index(None) == cuda_index(torch.device("cuda")) == 1
    assert cuda_index("cuda:3") == 3


class FakeCard:
    """``torch.cuda`` as far as the emulated card uses it: a card of ``total_gib`` whose
    context takes ``context_gib``, and torch 2.14's ``set_per_process_memory_fraction``, which
    refuses a device without an index (``_get_device_index`` without ``optional=True``)."""

    def __init__(self, monkeypatch, total_gib=80.0, context_gib=0.5, current=0):
        from torch._utils import _get_device_index

        self.total, self.context, self.caps = int(total_gib * 2**30), context_gib, []

        def set_fraction(fraction, device=None):
            index = current if device is None else _get_device_index(device)
            self.caps.append((fraction * self.total / 2**30, index))

        props = type("Props", (), {"total_memory": self.total})
        free = self.total - int(context_gib * 2**30)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: props)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=None: (free, self.total))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index=None: 0)
        monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)


def test_the_card_size_reads_accelerates_device_and_caps_nothing(monkeypatch):
    """``card_memory_gib(torch.device("cuda"))`` called torch's cap with Accelerate's device,
    which torch refuses without an index: every run with LOWRES_SSL_GPU_GIB set died at setup.
    It reads only now; an "8 GB" card reports 97 % of 8 GiB, as real ones do."""
    card = FakeCard(monkeypatch)
    monkeypatch.setenv(device.CARD_ENV, "8")
    assert device.card_memory_gib(torch.device("cuda")) == pytest.approx(8 * 0.97)
    assert card.caps == []
    monkeypatch.delenv(device.CARD_ENV)
    assert device.card_memory_gib(torch.device("cuda")) == pytest.approx(80.0)


@pytest.mark.parametrize(("context_gib", "outside_gib"), [(0.3, 600 / 1024), (0.9, 0.9)])
def test_an_emulated_card_leaves_the_context_outside_its_allocator(
    monkeypatch, context_gib, outside_gib
):
    """The allocator gets what the card reports less the CUDA context: the context measured
    on the card, at least CUDA_CONTEXT_BYTES (600 MiB; cuBLAS and cuDNN add to it later)."""
    card = FakeCard(monkeypatch, context_gib=context_gib)
    monkeypatch.setenv(device.CARD_ENV, "8")
    note = device.emulate_card(torch.device("cuda"))
    assert card.caps == [(pytest.approx(8 * 0.97 - outside_gib), 0)]
    assert note is not None and "allocator capped at" in note
    monkeypatch.delenv(device.CARD_ENV)
    assert device.emulate_card(torch.device("cuda")) is None and len(card.caps) == 1


def test_each_process_caps_its_own_card(monkeypatch):
    """Under ``accelerate launch`` with several GPUs, each rank caps the card Accelerate chose
    for it (the current one), not card 0."""
    card = FakeCard(monkeypatch, current=1)
    monkeypatch.setenv(device.CARD_ENV, "12")
    device.emulate_card(torch.device("cuda"))
    device.emulate_card("cuda:1")
    assert [index for _, index in card.caps] == [1, 1]


@pytest.mark.parametrize("value", ["eight", "0", "100"])
def test_a_bad_emulated_size_is_one_line(monkeypatch, value):
    FakeCard(monkeypatch)
    monkeypatch.setenv(device.CARD_ENV, value)
    with pytest.raises(device.UserError, match=device.CARD_ENV):
        device.emulate_card(torch.device("cuda"))
