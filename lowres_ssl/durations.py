"""Durations as users write them (``15m``, ``1h30m``) and as the kit prints them."""

from __future__ import annotations

import math
import re

from lowres_ssl.errors import UserError

_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m|h|d)")


def parse_budget(value: str | float | int) -> float:
    """``"15m"``, ``"2h"``, ``"1h30m"``, ``"90s"``, ``"900"`` or 900 → seconds (> 0)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            parts = _PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise UserError(
                    f"train.time_budget {value!r} is not a duration; write e.g. 15m, 2h, 1h30m, "
                    "90s or a number of seconds"
                ) from None
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not (math.isfinite(seconds) and seconds > 0):
        raise UserError(f"train.time_budget must be a positive duration, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"15 min"``, ``"4 min 41 s"``, ``"2 h 5 min"``."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        m, r = divmod(s, 60)
        return f"{m} min" + (f" {r} s" if r else "")
    h, r = divmod(s, 3600)
    return f"{h} h" + (f" {r // 60} min" if r // 60 else "")


__all__ = ["format_duration", "parse_budget"]
