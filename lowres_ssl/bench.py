"""What the benchmark reports say about the machine they ran on (shared by ``scripts/bench_*``).

Figures are only comparable on the same machine, and CPU timings only on a quiet one, so every
report names the processor, the GPU, the versions and the load before the run.
"""

from __future__ import annotations

import os
import platform

import torch

from lowres_ssl.device import available_cores


def meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB (empty where there is no /proc)."""
    try:
        with open("/proc/meminfo") as f:
            return {line.split(":")[0]: int(line.split()[1]) for line in f}
    except OSError:
        return {}


def proc_status_bytes(key: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak since the last :func:`reset_peak_rss`)
    of this process, from ``/proc/self/status`` (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current RSS. (``ru_maxrss`` is no use in a benchmark's child
    process: Linux carries it over ``fork`` + ``exec``, so the child reports its parent's
    peak if that was higher.)"""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


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


def load_lines(before: float | None) -> list[str]:
    """The 1-minute load average before the run (during it, it counts the run itself): other
    work on the machine skews the timings."""
    if before is None:
        return []
    cores = available_cores()
    lines = [f"- Load average (1 min) before the run: {before:.2f} on {cores} cores"]
    if before > 0.5 * cores:
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
    if device == "cuda":
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
