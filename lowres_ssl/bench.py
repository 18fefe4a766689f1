"""What the benchmark scripts share (``scripts/bench_*``): the machine their reports name, the
fresh process each measured case runs in, the peak-memory reader, the markdown report writer,
and the rig that runs one real training step of a :class:`lowres_ssl.memory.Setting`, built by
the pre-training task as a run builds it.

Figures are only comparable on the same machine, and CPU timings only on a quiet one, so every
report names the processor, the GPU, the versions and the load before the run. A peak is only a
case's own in a process of its own (the allocator keeps what earlier cases freed, and the RSS
high-water mark never falls), so the scripts run each case in a fresh one:
:func:`run_fresh_process` in the parent, :func:`send_result_to_parent` in the child.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowres_ssl.config import Config, from_dict
from lowres_ssl.device import PeakMemoryReader, available_cores
from lowres_ssl.files import write_text_atomic

KIB = 1024
GIB = 2**30


# --------------------------------------------------------------------------------------------
# Fresh processes: one per measured case


@dataclass(frozen=True)
class ChildRun:
    """What one child process of a benchmark gave back (see :func:`run_fresh_process`)."""

    result: dict[str, Any] | None  # the last JSON object it printed; None where it printed none
    returncode: int | None  # None: killed at the timeout
    stderr_tail: str  # its last line on stderr ("" where it wrote none)
    wall_s: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    @property
    def killed(self) -> bool:
        """Ended by SIGKILL, which on Linux is most often the kernel's out-of-memory killer."""
        return self.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)

    @property
    def failure(self) -> str:
        """Empty when the child exited 0 with a result; otherwise one line saying why not."""
        if self.timed_out:
            return f"timed out after {self.wall_s:.0f} s"
        if self.returncode == 0 and self.result is not None:
            return ""
        return self.stderr_tail or f"exit {self.returncode} without a result"


def run_fresh_process(
    script: str | os.PathLike[str],
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
) -> ChildRun:
    """Run ``python script *args`` in a new process (this interpreter, the environment plus
    ``env``) and collect what it sent with :func:`send_result_to_parent`. A child still
    running after ``timeout_s`` is killed."""
    command = [sys.executable, os.fspath(script), *args]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as expired:
        return ChildRun(None, None, _last_line(expired.stderr), time.perf_counter() - start)
    wall = time.perf_counter() - start
    return ChildRun(_last_json_object(done.stdout), done.returncode, _last_line(done.stderr), wall)


def send_result_to_parent(result: Mapping[str, Any]) -> None:
    """The child's side of :func:`run_fresh_process`: ``result`` as one JSON line on stdout."""
    print(json.dumps(result), flush=True)


def _text(output: str | bytes | None) -> str:
    # TimeoutExpired carries bytes even when the process was run with text=True
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def _last_line(output: str | bytes | None) -> str:
    lines = _text(output).strip().splitlines()
    return lines[-1].strip() if lines else ""


def _last_json_object(output: str) -> dict[str, Any] | None:
    # the child's libraries may print too (warnings, progress): the result is its last object
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


# --------------------------------------------------------------------------------------------
# Peak memory


def meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB (empty where there is no /proc)."""
    try:
        with open("/proc/meminfo") as f:
            return {line.split(":")[0]: int(line.split()[1]) for line in f}
    except OSError:
        return {}


def set_mmap_threshold(nbytes: int) -> bool:
    """glibc: allocations of at least ``nbytes`` get their own mmap, returned to the OS when
    freed, so that the RSS follows the live tensors. (The default threshold is dynamic: it
    rises to the size of freed blocks, up to 32 MiB, after which freed tensors stay in the heap
    and peaks of identical runs varied by ±30 %.) False where ``mallopt`` is unavailable."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt(-3, nbytes) == 1  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


# --------------------------------------------------------------------------------------------
# Reports: the machine, the load, markdown tables, the file


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def busy(load: float | None) -> bool:
    """Whether a 1-minute load average means other work competes for this process's cores."""
    return load is not None and load > 0.5 * available_cores()


def load_lines(before: float | None) -> list[str]:
    """The 1-minute load average before the run (during it, it counts the run itself): other
    work on the machine skews the timings."""
    if before is None:
        return []
    cores = available_cores()
    lines = [f"- Load average (1 min) before the run: {before:.2f} on {cores} cores"]
    if busy(before):
        lines.append(
            f"- **Warning**: the machine was busy before the run started (load {before:.2f} on "
            f"{cores} cores): CPU timings are unreliable (threads wait for each other's cores)."
        )
    return lines


def machine_lines(device: str) -> list[str]:
    """Markdown bullet lines naming the CPU, the GPU (for ``device == "cuda"``) and versions."""
    ram = meminfo().get("MemTotal", 0) / 2**20
    lines = [
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores ({available_cores()} usable, torch "
        f"threads: {torch.get_num_threads()}), {ram:.1f} GiB RAM",
    ]
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(0)
        lines.append(
            f"- GPU: {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability "
            f"{props.major}.{props.minor}; CUDA {torch.version.cuda}; float32 matmul precision "
            f"{torch.get_float32_matmul_precision()!r} (TF32 "
            f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'})"
        )
    lines.append(
        f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.platform()}"
    )
    return lines


def markdown_row(cells: Iterable[object]) -> str:
    """One row of a markdown table (a ``|`` inside a cell is escaped)."""
    return "| " + " | ".join(str(cell).replace("|", r"\|") for cell in cells) + " |"


def markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[object]], align: str = ""
) -> list[str]:
    """The lines of a markdown table. ``align``: one letter per column, ``l`` (left, the
    default) or ``r`` (right: numbers). A shorter row (an error in place of the figures) is
    padded with empty cells; a longer one is an error."""
    align = align or "l" * len(header)
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align {align!r}: one of l or r for each of {len(header)} columns")
    lines = [markdown_row(header), "|" + "".join("---:|" if a == "r" else "---|" for a in align)]
    for row in rows:
        if len(row) > len(header):
            raise ValueError(f"a row of {len(row)} cells in a table of {len(header)}: {row}")
        lines.append(markdown_row([*row, *[""] * (len(header) - len(row))]))
    return lines


def _report_text(report: str | Sequence[str]) -> str:
    text = report if isinstance(report, str) else "\n".join(report)
    return text.rstrip("\n") + "\n"


def save_report(report: str | Sequence[str], output: Path) -> Path:
    """Write a markdown report (text, or its lines) to ``output`` without printing it (its
    folder made, one newline at the end). A benchmark saves its report after every case, so
    that a run killed part-way keeps what it measured; the rename means a kill mid-write
    leaves the previous version, never half of one."""
    output.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(output, _report_text(report))


def write_report(report: str | Sequence[str], output: Path) -> Path:
    """Print a markdown report (text, or its lines) and write it to ``output`` (its folder
    made, one newline at the end); the path written goes to stderr."""
    print(_report_text(report), end="", flush=True)
    save_report(report, output)
    print(f"wrote {output}", file=sys.stderr, flush=True)
    return output


# --------------------------------------------------------------------------------------------
# One real training step


@dataclass
class StepRig:
    """One real training step of a setting, ready to run: the pre-training task's own step,
    model, optimizer (prepared by Accelerate), objective and augmentation, built from
    ``config`` as a run builds them, on a random uint8 batch."""

    setting: Any  # lowres_ssl.memory.Setting
    config: Config  # the pre-training config the parts were built from (:func:`config_of`)
    accelerator: Any
    model: torch.nn.Module
    optimizer: Any
    objective: torch.nn.Module
    augment: torch.nn.Module
    images: torch.Tensor
    generator: torch.Generator
    step: Callable

    def __post_init__(self) -> None:
        self.memory = PeakMemoryReader(self.accelerator.device)

    @property
    def cuda(self) -> bool:
        return self.accelerator.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def run(self, *, held_views: bool = False) -> float:
        """One step (augmentation included); its wall time in seconds. ``held_views``: the
        whole batch's views computed first and kept, instead of per micro-batch."""
        self.sync()
        start = time.perf_counter()
        views = self.augment.plan(self.images, generator=self.generator)
        if held_views:
            views = views.take(None, 2)
        self.step(self.model, self.objective, views, accelerator=self.accelerator,
                  optimizer=self.optimizer)  # fmt: skip
        self.sync()
        return time.perf_counter() - start

    def reset_peak(self) -> float:
        """Start counting the peak; returns the memory in use now (GiB): the RSS on the CPU,
        what is allocated on CUDA (whose peak below counts from zero, all of it)."""
        return self.memory.start() / GIB

    def peak(self) -> dict[str, float]:
        """The peak since :meth:`reset_peak`: CUDA allocated and reserved, or the CPU's RSS."""
        peak = self.memory.read()
        if peak.reserved is not None:
            return {"allocated_gib": peak.peak / GIB, "reserved_gib": peak.reserved / GIB}
        return {"rss_gib": peak.peak / GIB}


def config_of(setting, precision: str = "no") -> Config:
    """The pre-training config of a :class:`lowres_ssl.memory.Setting`: the reverse of
    ``Setting.from_config`` on what a step depends on (backbone, projector, views, objective,
    optimizer, batch and micro-batch, checkpointing), with ``precision`` (Accelerate's name).
    The views are the SwAV layout; the recipe is ``cifar`` up to 64 px and ``vicreg`` above,
    as ``data.recipe: auto`` picks; SFRIK's kernel has the setting's degree."""
    from lowres_ssl.data.sizes import SMALL_MAX

    s = setting
    # SFRIK's default weights (1, 40, 40) to the setting's degree: only the degree costs memory
    weights = [1.0] + [40.0] * ((s.kernel_degree or 3) - 1)
    return from_dict({
        "data": {
            "load_size": s.load_size,
            "image_size": s.view_size,
            "recipe": "cifar" if s.view_size <= SMALL_MAX else "vicreg",
            "views": {"layout": "swav", "large": s.large_views, "small": s.small_views,
                      "small_size": s.small_size or None},
        },
        "model": {"backbone": s.backbone, "projector": s.projector,
                  "grad_checkpointing": s.checkpointing},
        "loss": {"name": s.loss, "mmd_path": s.mmd_path,
                 "kernel_weights": weights,
                 "reg_small": bool(s.small_views) and s.regularised_views == s.views},
        "optim": {"name": s.optimizer, "state_bits": s.state_bits, "weight_decay": 1e-6},
        "train": {"batch_size": s.batch_size,
                  "micro_batch_size": s.micro if s.micro < s.batch_size else None,
                  "precision": {"no": "fp32"}.get(precision, precision)},
    })  # fmt: skip


def step_rig(setting, *, load_side: int | None = None, seed: int = 0) -> StepRig:
    """A :class:`StepRig` for ``setting``, built by the pre-training task from
    :func:`config_of` (its model, optimizer, objective, augmentation and step, as a run
    builds them): on CUDA when ``setting.cuda`` (an emulated card, ``LOWRES_SSL_GPU_GIB``, is
    capped first), bf16/fp16 autocast when ``setting.mixed`` (fp32 on the CPU); images of
    ``load_side`` px (default the setting's ``load_size``)."""
    from accelerate import Accelerator

    from lowres_ssl.device import MIXED_DTYPES, cuda_mixed_precision, emulate_card
    from lowres_ssl.tasks.pretrain import Pretraining

    s = setting
    precision = "no"
    if s.cuda:
        emulate_card(0)
        precision = cuda_mixed_precision() if s.mixed else "no"
    cfg = config_of(s, precision)
    task = Pretraining()
    accelerator = Accelerator(mixed_precision=precision, cpu=not s.cuda)
    device = accelerator.device
    channels_last = s.cuda and cfg.model.channels_last
    torch.manual_seed(seed)
    model, _ = task.build_model(cfg, None, None, resuming=False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, _ = task.optimizer(cfg, model, s.batch_size)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    objective = task.objective(cfg)
    augment = task.augment(cfg, out_dtype=MIXED_DTYPES[precision], channels_last=channels_last).to(
        device
    )
    g = torch.Generator().manual_seed(seed + 1)
    side = load_side or s.load_size
    images = torch.randint(0, 256, (s.batch_size, 3, side, side), dtype=torch.uint8, generator=g)
    step = task.step_for(cfg, cfg.train.micro_batch_size)
    return StepRig(
        s, cfg, accelerator, model, optimizer, objective, augment, images.to(device), g, step
    )
