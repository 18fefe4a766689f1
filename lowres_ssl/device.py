"""The device a run trains on: mixed precision for it, CPU threads, and peak memory for the logs."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lowres_ssl.errors import UserError

#: Accelerate's mixed-precision names → the dtype the network runs in.
MIXED_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cuda_mixed_precision(device: torch.device | int | None = None) -> str:
    """bf16 on GPUs of compute capability ≥ 8.0, fp16 (with loss scaling) below."""
    return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"


#: ``1`` makes ``train.precision: auto`` use bf16 on any CPU, ``0`` keeps fp32 on every CPU;
#: unset, it follows :func:`cpu_has_native_bf16`.
CPU_BF16_VARIABLE = "LOWRES_SSL_CPU_BF16"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (x86's AVX512-BF16 or AMX), where bf16
    autocast makes a ResNet step about 1.5× faster than fp32 (docs/training.md, "Precision").
    Without those instructions bf16 is emulated and no faster. ``LOWRES_SSL_CPU_BF16=0`` or
    ``1`` overrides the check."""
    forced = os.environ.get(CPU_BF16_VARIABLE, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise UserError(f"{CPU_BF16_VARIABLE}={forced!r}: use 1 (bf16 on the CPU) or 0 (fp32)")
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def _launcher_environment(pid: int) -> dict[str, str] | None:
    """The environment process ``pid`` was started with (Linux's ``/proc``), else None."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs}


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def use_the_cores(world: int) -> str | None:
    """One process training on the CPU: undo ``accelerate launch``'s ``OMP_NUM_THREADS=1``.

    ``accelerate launch`` exports ``OMP_NUM_THREADS=1`` to its processes whenever the user has
    not set it (and it does not pass ``--cpu``): right for several processes sharing the cores,
    but one process then trains on one core (25 img/s where plain ``python`` gets 45, ``cpu``
    preset on 2 cores). A thread count the user set is kept: the launcher's own environment
    (``/proc/<launcher>/environ``) tells the two apart. Returns the line to log, or None.
    """
    if world != 1 or os.environ.get("OMP_NUM_THREADS") != "1":
        return None
    if "ACCELERATE_DYNAMO_BACKEND" not in os.environ:  # not started by accelerate launch
        return None
    cores = available_cores()
    if cores <= 1:
        return None
    launcher = _launcher_environment(os.getppid())
    if launcher is None:  # cannot tell whether the user asked for one thread: keep it, say so
        return (
            f"training on 1 of {cores} CPU cores (OMP_NUM_THREADS=1, which accelerate launch "
            f"sets when it is unset): set OMP_NUM_THREADS={cores}, or run with plain python"
        )
    if "OMP_NUM_THREADS" in launcher:  # the user's own choice
        return None
    torch.set_num_threads(cores)
    return f"one process on the CPU: using its {cores} cores (accelerate launch had set 1 thread)"


#: Set to a number of GiB to emulate a smaller CUDA card on a larger one: every automatic
#: choice (``--preset auto``, ``micro_batch_size: auto``) sizes for the memory such a card
#: reports, and :func:`emulate_card` caps the allocator at what such a card could hold
#: (``docs/training.md``, "An emulated card"). For benchmarks and tests.
CARD_ENV = "LOWRES_SSL_GPU_GIB"

#: What a card sold as N GB reports to CUDA, as a share of N GiB: the driver keeps the rest
#: (an "8 GB" card reports 7.6–7.8 GiB, a "12 GB" one about 11.7 GiB).
REPORTED_SHARE = 0.97

#: What the CUDA context takes outside PyTorch's allocator (driver, cuBLAS/cuDNN handles and
#: workspaces, lazily loaded kernels): typical CUDA 12 figures, 0.3–0.6 GiB. The estimator
#: counts it, and an emulated card leaves at least this much outside its allocator.
CUDA_CONTEXT_BYTES = 600 * 2**20


def canonical_device(device: torch.device | str | int) -> torch.device:
    """``device`` with its index made explicit, so that two names of one device compare equal.

    ``torch.device("cuda")`` (what Accelerate's ``accelerator.device`` is on one GPU) and
    ``cuda:0`` (what a tensor moved there reports) are different objects that ``==`` calls
    unequal, as are ``cpu`` and ``cpu:0``. Here an accelerator without an index gets the
    current one, an integer is that CUDA card, and the CPU (and ``meta``) has no index.
    Compare devices only through :func:`same_device` (``tests/test_layers.py`` checks it).
    """
    if isinstance(device, int):
        return torch.device("cuda", device)
    d = torch.device(device)
    if d.type in ("cpu", "meta"):
        return torch.device(d.type)
    if d.index is not None:
        return d
    if d.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    current = getattr(getattr(torch, d.type, None), "current_device", None)
    return torch.device(d.type, current() if current is not None else 0)


def same_device(a: torch.device | str | int, b: torch.device | str | int) -> bool:
    """Whether ``a`` and ``b`` name the same device (``cuda`` and ``cuda:0`` on card 0 do)."""
    return canonical_device(a) == canonical_device(b)


def cuda_index(device: torch.device | str | int | None = None) -> int:
    """The index of a CUDA ``device`` (None: the current card)."""
    d = canonical_device("cuda" if device is None else device)
    if d.type != "cuda":
        raise ValueError(f"{d} is not a CUDA device")
    return d.index  # type: ignore[return-value]


def _emulated_gib(total_gib: float) -> float | None:
    """The nominal size of the emulated card (``LOWRES_SSL_GPU_GIB``), or None."""
    wanted = os.environ.get(CARD_ENV)
    if not wanted:
        return None
    try:
        gib = float(wanted)
    except ValueError:
        raise UserError(
            f"{CARD_ENV}={wanted!r}: give the emulated card size in GiB, e.g. 8"
        ) from None
    if not 0 < gib * REPORTED_SHARE <= total_gib:
        raise UserError(
            f"{CARD_ENV}={wanted}: must be above 0 and at most the card's {total_gib:.1f} GiB"
        )
    return gib


def card_memory_gib(device: torch.device | str | int | None = None) -> float:
    """The CUDA card's memory in GiB, as the kit sizes runs for it: what the card reports
    (``total_memory``), or where ``LOWRES_SSL_GPU_GIB`` is set, what a card of that nominal
    size reports (:data:`REPORTED_SHARE` of it). Reads only; :func:`emulate_card` caps."""
    index = cuda_index(device)
    total = torch.cuda.get_device_properties(index).total_memory / 2**30
    nominal = _emulated_gib(total)
    return total if nominal is None else nominal * REPORTED_SHARE


def emulate_card(device: torch.device | str | int | None = None) -> str | None:
    """Where ``LOWRES_SSL_GPU_GIB`` is set, cap the allocator of ``device`` at what the
    emulated card could hold, and return the line to log (None where it is not set).

    The cap is the memory such a card reports (:func:`card_memory_gib`) less the CUDA context,
    which lives outside the allocator on a real card too: this process's context as measured
    on the card (used memory the allocator does not hold), and at least
    :data:`CUDA_CONTEXT_BYTES` (cuBLAS and cuDNN add to it later). Call it once per process,
    after the process's card is chosen (``Accelerator()`` sets it under ``accelerate
    launch``) and before training allocates; ``device`` must name that card, with or without
    an index.
    """
    if not os.environ.get(CARD_ENV):
        return None
    index = cuda_index(device)
    free, total = torch.cuda.mem_get_info(index)  # creates this process's context on it
    measured = max(0, total - free - torch.cuda.memory_reserved(index))
    context = max(measured, CUDA_CONTEXT_BYTES)
    reported = card_memory_gib(index)
    cap = reported * 2**30 - context
    if cap <= 0:
        raise UserError(
            f"{CARD_ENV}={os.environ[CARD_ENV]}: an emulated card of {reported:.2f} GiB has no "
            f"room beside the CUDA context ({context / 2**30:.2f} GiB); emulate a larger one"
        )
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), index)
    return (
        f"emulated {os.environ[CARD_ENV]} GB card on cuda:{index}: reports {reported:.2f} GiB; "
        f"allocator capped at {cap / 2**30:.2f} GiB, the CUDA context's {context / 2**30:.2f} "
        f"GiB outside it (measured {measured / 2**30:.2f})"
    )


def synchronize(device: torch.device | str) -> None:
    """Wait until the work queued on ``device`` is done: CUDA runs kernels after the Python
    that launched them has moved on, so a clock read between two of these measures the work
    in between, and nothing else (the CPU runs in order: nothing to wait for)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def process_age_s() -> float:
    """Seconds since this process started (Linux ``/proc``; 0.0 where it cannot be read): a
    time budget counts the interpreter's start and the imports too."""
    try:
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(stat[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def ram_gib() -> float:
    """The machine's total RAM in GiB (8 where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 8.0


def proc_status_kib() -> dict[str, int]:
    """The ``Vm…`` figures of this process (VmRSS, VmHWM, VmData…) in KiB, from
    ``/proc/self/status`` (empty where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            return {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith("Vm")}
    except OSError:
        return {}


@dataclass(frozen=True)
class MemoryPeak:
    """The memory of this process over a stretch of a benchmark, in bytes."""

    baseline: int  # in use when the count started: the RSS (CPU) or allocated (CUDA)
    peak: int  # the highest since: the RSS high-water mark, or the allocator's peak
    reserved: int | None  # CUDA: the allocator's peak reservation (None on the CPU)
    method: str  # how it was read: "VmHWM", "ru_maxrss" or "cuda"

    @property
    def growth(self) -> int:
        """What the stretch added over the baseline."""
        return self.peak - self.baseline


class PeakMemoryReader:
    """The peak memory of this process from :meth:`start` on: the CPU's resident set, or the
    CUDA caching allocator's figures for ``device``.

    CPU: writing 5 to ``/proc/self/clear_refs`` resets the high-water mark VmHWM to the current
    RSS. Where that is impossible the fallback is ``ru_maxrss``, which never resets and which a
    child inherits from its parent (exec keeps it): the baseline is then the high-water mark so
    far, and the growth reads low (zero while the peak stays below the old mark).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.baseline = 0
        self.method = ""

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def start(self) -> int:
        """Start counting here; returns the baseline, the bytes in use now."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method, self.baseline = "cuda", torch.cuda.memory_allocated(self.device)
        elif _reset_rss_high_water_mark():
            self.method, self.baseline = "VmHWM", proc_status_kib()["VmRSS"] * 1024
        else:
            self.method, self.baseline = "ru_maxrss", _max_rss_bytes()
        return self.baseline

    def read(self) -> MemoryPeak:
        """The peak since :meth:`start`."""
        if not self.method:
            raise RuntimeError("PeakMemoryReader.read() before start()")
        if self.cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            reserved = torch.cuda.max_memory_reserved(self.device)
            return MemoryPeak(self.baseline, peak, reserved, self.method)
        if self.method == "VmHWM":
            return MemoryPeak(self.baseline, proc_status_kib()["VmHWM"] * 1024, None, self.method)
        return MemoryPeak(self.baseline, _max_rss_bytes(), None, self.method)


def _reset_rss_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return "VmHWM" in proc_status_kib()


def _max_rss_bytes() -> int:
    import resource  # POSIX only

    # ru_maxrss is in KiB on Linux, in bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_memory_gib(device: torch.device) -> dict[str, float]:
    """The process's peak so far (what a run reports): on a GPU the caching allocator's peaks
    (allocated, reserved), on the CPU the peak resident set, in GiB. For the peak over a
    stretch of work, :class:`PeakMemoryReader`."""
    if device.type == "cuda":
        return {
            "gpu_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "gpu_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    try:
        return {"cpu_rss_gib": _max_rss_bytes() / 2**30}
    except ImportError:  # no resource module (Windows)
        return {}


__all__ = [
    "CARD_ENV",
    "CPU_BF16_VARIABLE",
    "CUDA_CONTEXT_BYTES",
    "MIXED_DTYPES",
    "REPORTED_SHARE",
    "MemoryPeak",
    "PeakMemoryReader",
    "available_cores",
    "canonical_device",
    "card_memory_gib",
    "cpu_has_native_bf16",
    "cuda_index",
    "cuda_mixed_precision",
    "emulate_card",
    "peak_memory_gib",
    "proc_status_kib",
    "ram_gib",
    "same_device",
    "synchronize",
    "use_the_cores",
]
