"""Presets: YAML files in ``presets/`` that fix a run's settings for one size of card.

A preset is a partial config (see :mod:`lowres_ssl.config`) plus two keys of its own:
``description`` (one line) and ``vram_gib`` (the card it is made for; 0 for the CPU).
``--preset auto`` picks the largest preset whose ``vram_gib`` fits the GPU it finds, and
``cpu`` where there is none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lowres_ssl.config import load_yaml
from lowres_ssl.errors import UserError

PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"
META_KEYS = ("description", "vram_gib")


def available() -> dict[str, Path]:
    """Preset name → file, smallest card first (``cpu``, ``4gb``, …)."""
    if not PRESET_DIR.is_dir():
        return {}
    files = sorted(PRESET_DIR.glob("*.yaml"))
    sizes = {p: float(load_yaml(p).get("vram_gib", 0) or 0) for p in files}
    return {p.stem: p for p in sorted(files, key=lambda p: (sizes[p], p.stem))}


def load_preset(name: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(name, config values, meta) of a preset given by name, by ``auto``, or as a YAML path."""
    if name == "auto":
        name = choose_auto()
    path = Path(name).expanduser()
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        presets = available()
        if name not in presets:
            raise UserError(
                f"unknown preset {name!r}; choose one of {', '.join(presets) or '(none found)'}, "
                "auto, or a path to a YAML file"
            )
        path = presets[name]
    values = load_yaml(path)
    meta = {k: values.pop(k) for k in META_KEYS if k in values}
    return path.stem, values, meta


def device_vram_gib() -> float | None:
    """Memory of the current CUDA device in GiB (an emulated card's, where
    ``LOWRES_SSL_GPU_GIB`` is set), or None without one."""
    if not torch.cuda.is_available():
        return None
    from lowres_ssl.device import card_memory_gib

    return card_memory_gib(torch.cuda.current_device())


def card_sizes() -> dict[str, float]:
    """Preset name → the card it is made for, in GiB (0 for the CPU), smallest first."""
    return {
        name: float(load_yaml(path).get("vram_gib", 0) or 0) for name, path in available().items()
    }


def next_smaller(name: str | None) -> str | None:
    """The largest GPU preset made for a smaller card than preset ``name``'s, if any."""
    sizes = card_sizes()
    mine = sizes.get(name or "")
    below = [(gib, other) for other, gib in sizes.items() if mine and 0 < gib < mine]
    return max(below)[1] if below else None


def choose_auto(vram_gib: float | None = None) -> str:
    """The preset for a card of ``vram_gib`` (default: the one found): the largest preset whose
    ``vram_gib`` is at most the card's nominal size (cards report a little under their label,
    so 8 % of slack: a "4 GB" card shows 3.8 GiB); ``cpu`` without a GPU."""
    vram_gib = device_vram_gib() if vram_gib is None else vram_gib
    if not vram_gib:
        return "cpu"
    fits = [(gib, name) for name, gib in card_sizes().items() if 0 < gib <= vram_gib * 1.08]
    best = max(fits, key=lambda fit: fit[0])[1] if fits else None  # ties: first by name
    if best is None:
        sizes = ", ".join(available())
        raise UserError(
            f"no preset fits a GPU of {vram_gib:.1f} GiB (presets: {sizes}); "
            "pass --preset cpu, or a smaller train.batch_size with --set"
        )
    return best
