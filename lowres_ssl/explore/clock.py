"""The time and the peak memory of each step of the explorer, for ``explore.json`` and the
benchmark. The peak is the process's resident set high-water mark, reset before each step
(:class:`lowres_ssl.device.PeakMemoryReader`), so each step reports its own."""

from __future__ import annotations

import contextlib
import time

from lowres_ssl.device import PeakMemoryReader


class StepClock:
    """``with clock.step("name"):`` records the seconds and the peak resident MiB of the
    block (where the high-water mark cannot be reset, the peak of the whole run so far)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_mib: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str):
        reader = PeakMemoryReader("cpu")
        reader.start()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - start
            self.peak_mib[name] = reader.read().peak / 2**20


__all__ = ["StepClock"]
