"""``metrics.jsonl`` (one JSON object per logged step and per epoch) and TensorBoard events.

Each line has ``kind`` ("step" or "epoch") and ``step``. On resume, lines after the checkpoint's
step are dropped first, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from lowres_ssl.files import write_text_atomic

log = logging.getLogger("lowres_ssl")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or Infinity
    return value


class MetricsLog:
    """Appends to ``run/metrics.jsonl``; mirrors scalars to TensorBoard when it is installed."""

    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the optional `tensorboard` extra is not installed
                log.debug("tensorboard is not installed; metrics go to metrics.jsonl only")
            else:
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop the lines logged after ``step`` (they are about to be trained again)."""
        if not (self.enabled and self.path.exists()):
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut short when the run was killed
                continue
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **{k: _clean(v) for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
