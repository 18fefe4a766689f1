"""A config made concrete for the machine a run starts on: the view size from the images, the
micro-batch from the card, and a check that the result fits, all before training starts.

- ``data.load_size: auto`` → :func:`lowres_ssl.data.sizes.choose_view_size` (small images keep
  their size, photos get the preset's ``data.photo_size``);
- ``train.micro_batch_size: auto`` → the largest micro-batch whose estimated peak
  (:mod:`lowres_ssl.memory`) stays within 90 % of the card (the whole batch where it fits; on
  the CPU, within half of the RAM);
- a config whose estimate is over the whole card is a one-line error naming the micro-batch
  (and the preset) that would fit; between 90 % and 100 % a warning.

On ``--resume`` the values the run started with are kept (``auto`` stands for them).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from lowres_ssl.config import Config
from lowres_ssl.device import cpu_has_native_bf16
from lowres_ssl.errors import UserError
from lowres_ssl.memory import GIB, HEADROOM, Estimate, Setting, estimate, fit_micro_batch

log = logging.getLogger("lowres_ssl")


def _replace(cfg: Config, section: str, **values: Any) -> Config:
    return dataclasses.replace(
        cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)}
    )


def keep_saved(cfg: Config, saved: dict[str, Any]) -> Config:
    """On resume: every ``auto`` of ``cfg`` takes the value the run resolved it to."""
    data = saved.get("data", {})
    if cfg.data.load_size == "auto" and isinstance(data.get("load_size"), int):
        cfg = _replace(cfg, "data", load_size=data["load_size"])
    if cfg.data.recipe == "auto" and data.get("recipe", "auto") != "auto":
        cfg = _replace(cfg, "data", recipe=data["recipe"])
    small = data.get("views", {}).get("small", "auto")
    if cfg.data.views.small == "auto" and isinstance(small, int):
        cfg = _replace(cfg, "data", views=dataclasses.replace(cfg.data.views, small=small))
    loss = saved.get("loss", {}).get("name", "auto")
    if cfg.loss.name == "auto" and loss != "auto":
        cfg = _replace(cfg, "loss", name=loss)
    micro = saved.get("train", {}).get("micro_batch_size", "auto")
    if cfg.train.micro_batch_size == "auto" and micro != "auto":
        cfg = _replace(cfg, "train", micro_batch_size=micro)
    return cfg


def resolve_view_size(cfg: Config) -> tuple[Config, str | None]:
    """``data.load_size: auto`` chosen from the images, and ``data.recipe: auto``,
    ``data.views.small: auto`` and ``loss.name: auto`` from the view size (up to 64 px:
    ``cifar``, no small crops, SFRIK; above, photos: ``vicreg``, ``data.views.photo_small`` crops
    and ``loss.photo_name``); (config, the line saying so)."""
    from lowres_ssl.data.sizes import SMALL_MAX, choose_view_size

    note = None
    if cfg.data.load_size == "auto":
        choice = choose_view_size(cfg.data.path, cfg.data.photo_size)
        cfg = _replace(cfg, "data", load_size=choice.size)
        note = f"data: {choice}"
    photos = cfg.data.view_size > SMALL_MAX
    if cfg.data.recipe == "auto":
        cfg = _replace(cfg, "data", recipe="vicreg" if photos else "cifar")
    if cfg.loss.name == "auto":
        cfg = _replace(cfg, "loss", name=cfg.loss.name_for(cfg.data.view_size))
    views = cfg.data.views
    if views.small == "auto":
        small = views.crops_for(cfg.data.view_size)
        cfg = _replace(cfg, "data", views=dataclasses.replace(views, small=small))
    return cfg, note


def card_gib(device: torch.device) -> float:
    """The memory the run may use: the CUDA card's (or the emulated card's, see
    :func:`lowres_ssl.device.card_memory_gib`), or the CPU's total RAM."""
    from lowres_ssl.device import card_memory_gib, ram_gib

    return card_memory_gib(device) if device.type == "cuda" else ram_gib()


def setting_for(
    cfg: Config, device: torch.device, *, processes: int = 1, cached_images: int = 0, mixed=None
) -> Setting:
    """The :class:`~lowres_ssl.memory.Setting` of ``cfg`` on ``device``."""
    if mixed is None:
        precision = cfg.train.precision
        cpu_auto = device.type != "cuda" and precision == "auto" and cpu_has_native_bf16()
        mixed = precision == "bf16" or cpu_auto or (device.type == "cuda" and precision != "fp32")
    return Setting.from_config(
        cfg, cuda=device.type == "cuda", mixed=mixed, processes=processes,
        cached_images=cached_images,
    )  # fmt: skip


def resolve_micro_batch(
    cfg: Config,
    device: torch.device,
    *,
    processes: int = 1,
    cached_images: int = 0,
    mixed: bool | None = None,
    card: float | None = None,
) -> tuple[Config, Estimate | None, str | None]:
    """The micro-batch for ``cfg`` on ``device``, its estimate and a line to log; raises a
    one-line :class:`UserError` when the config cannot fit. ``card``: GiB (default: the
    device's). On the CPU a set micro-batch is not checked (no estimate: it costs a second)."""
    cuda = device.type == "cuda"
    if not cuda and cfg.train.micro_batch_size != "auto" and card is None:
        return cfg, None, None
    card = card_gib(device) if card is None else card
    budget = card if cuda else 0.5 * card / HEADROOM  # the CPU: half of the RAM
    base = setting_for(cfg, device, processes=processes, cached_images=cached_images, mixed=mixed)
    where = f"the {card:.1f} GiB card" if cuda else f"{card:.0f} GiB of RAM"
    if cfg.train.micro_batch_size == "auto":
        fitted = fit_micro_batch(dataclasses.replace(base, micro_batch_size=None), budget)
        if fitted is None:
            raise UserError(_no_fit(cfg, base, where, budget))
        micro = fitted.setting.micro
        cfg = _replace(cfg, "train", micro_batch_size=micro if micro < base.batch_size else None)
        how = f"micro-batches of {micro}" if micro < base.batch_size else "the whole batch at once"
        return (
            cfg,
            fitted,
            (
                f"memory: batch {base.batch_size} in {how} on {where} "
                f"(estimated peak {fitted.total_gib:.2f} GiB)"
            ),
        )
    est = estimate(base)
    if est.total > budget * GIB:
        raise UserError(_no_fit(cfg, base, where, budget, est))
    note = None
    if not est.fits(budget):
        note = (
            f"memory: the estimated peak {est.total_gib:.2f} GiB is over {HEADROOM:.0%} of "
            f"{where}; if it runs out, --set train.micro_batch_size=auto"
        )
    return cfg, est, note


def _no_fit(cfg: Config, base: Setting, where: str, budget: float, est: Estimate | None = None):
    from lowres_ssl.presets import next_smaller

    fitted = fit_micro_batch(dataclasses.replace(base, micro_batch_size=None), budget)
    peak = f"estimated peak {est.total_gib:.2f} GiB" if est else "no micro-batch down to 8 fits"
    if fitted is not None:
        m = fitted.setting.micro
        fix = f"--set train.micro_batch_size={m} fits ({fitted.total_gib:.2f} GiB; same objective)"
    else:
        fix = "a smaller train.batch_size or model.projector, or model.grad_checkpointing=true"
    smaller = next_smaller(cfg.preset)
    also = f", or --preset {smaller}" if smaller else ""
    return f"the config does not fit {where} ({peak}): {fix}{also}"


# ---------------------------------------------------------------------------------------------
# The device a run is planned for (dry runs, --preset auto)


@dataclass(frozen=True)
class Target:
    """The device a run is sized for: this machine's GPU, or the card a GPU preset is made for
    when this machine has none (``here`` False), or the CPU."""

    device: torch.device
    card_gib: float
    found: str  # what this machine has, in words
    here: bool
    chosen_by_auto: bool = False
    warning: str | None = None  # a GPU preset and no GPU: say so before training


def no_gpu_reason() -> str:
    """Why there is no CUDA GPU, in words."""
    if torch.version.cuda is None:
        found = "no CUDA GPU (this torch build has no CUDA)"
    else:
        found = "no CUDA GPU visible (no driver loaded, or CUDA_VISIBLE_DEVICES hides it)"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found += "; an Apple GPU (MPS), which the kit does not train on yet"
    return found


def target_device(cfg: Config, *, chosen_by_auto: bool = False) -> Target:
    """What a run of ``cfg`` would train on here (see :class:`Target`)."""
    from lowres_ssl.device import card_memory_gib, ram_gib
    from lowres_ssl.presets import card_sizes

    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        gib = card_memory_gib(index)
        found = f"{torch.cuda.get_device_name(index)} ({gib:.1f} GiB)"
        return Target(torch.device("cuda"), gib, found, True, chosen_by_auto)
    found = no_gpu_reason()
    nominal = card_sizes().get(cfg.preset or "", 0.0)
    if nominal:
        warning = (
            f"preset {cfg.preset} is made for a {nominal:g} GB GPU, and this machine has "
            f"{found}: it would train on the CPU, for days; --preset cpu is a quick CPU run"
        )
        return Target(torch.device("cuda"), nominal, found, False, chosen_by_auto, warning)
    return Target(torch.device("cpu"), ram_gib(), found, True, chosen_by_auto)


def images_on_card(cfg: Config, target: Target) -> int:
    """How many decoded images ``data.cache`` would keep on the card (the loader's rule: the
    whole set where it takes at most a quarter of the card's memory)."""
    from lowres_ssl.data import DATASETS
    from lowres_ssl.data.loader import fits_gpu_cache

    if target.device.type != "cuda" or cfg.data.cache not in ("gpu", "auto"):
        return 0
    name = cfg.data.path.lower()
    known = {"cifar10": 50_000, "cifar100": 50_000, "stl10": 105_000}
    if name in DATASETS and name in known:
        n = known[name]
    else:
        from lowres_ssl.data.folders import scan_folder

        n = len(scan_folder(cfg.data.path))
    size = cfg.data.load_size
    return n if fits_gpu_cache(n * 3 * size * size, target.card_gib * GIB) else 0


def plan(cfg: Config, target: Target) -> tuple[Config, Estimate | None, list[str]]:
    """``cfg`` resolved for ``target`` (view size, recipe, micro-batch), its estimate, and the
    lines that say how: the choices, then the memory breakdown."""
    lines = []
    cfg, note = resolve_view_size(cfg)
    if note:
        lines.append(note)
    cfg, est, note = resolve_micro_batch(
        cfg, target.device, cached_images=images_on_card(cfg, target), card=target.card_gib
    )
    if note:
        lines.append(note)
    if not target.here:
        lines.append(
            f"sized for the preset's {target.card_gib:g} GB card; this machine has {target.found}"
        )
    if est is not None:
        lines += est.lines()
    return cfg, est, lines


def auto_line(cfg: Config, target: Target, est: Estimate | None = None) -> str:
    """``--preset auto``'s one line: what it found, what it chose, the estimated peak
    (``est``: the plan's, when it has been made already)."""
    if est is None:
        _, est, _ = plan(cfg, target)
    s = est.setting
    how = f"micro-batches of {s.micro}" if s.micro < s.batch_size else "one pass"
    return (
        f"preset auto: found {target.found} → {cfg.preset}; estimated peak "
        f"{est.total_gib:.2f} GiB (batch {s.batch_size} in {how}, {s.view_size} px, q = {s.q:,})"
    )


__all__ = [
    "Target",
    "auto_line",
    "card_gib",
    "images_on_card",
    "keep_saved",
    "no_gpu_reason",
    "plan",
    "resolve_micro_batch",
    "resolve_view_size",
    "setting_for",
    "target_device",
]
