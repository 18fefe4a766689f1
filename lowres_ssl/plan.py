"""The plan of a run: the requested config made concrete, once, for a machine.

:func:`resolve` is the one function that turns what was asked (a preset, a config file, flags,
``--set``: a :class:`~lowres_ssl.config.Config` that may hold ``auto`` and the task's
``None``) and a :class:`Machine` into a :class:`Plan`: a config with nothing left to choose,
its memory estimate, and the lines that say how. ``--dry-run``, ``--preset auto``, the run
itself (:func:`lowres_ssl.engine.train`), fine-tuning and the benchmarks all call it; the run
folder's ``config.yaml`` is the plan's config. What it decides, in order:

1. the task's defaults where the request says ``None`` (optimizer, schedule, epochs, recipe);
2. on ``--resume``, every ``auto`` takes the value the run resolved it to when it started;
3. ``data.load_size: auto`` from the images (:func:`lowres_ssl.data.sizes.choose_view_size`:
   small images keep their size, photos get ``photos.data.load_size``, 128 px unless set), and
   on photos (views over 64 px) the config's ``photos`` overlay, with its section for long
   runs (``photos.long``) where the run will see enough images (:mod:`lowres_ssl.length`);
4. ``train.precision`` as Accelerate will run it (the launcher's ``--mixed_precision``
   included), ``data.cache``, ``loss.mmd_path``;
5. ``train.micro_batch_size: auto`` → the largest micro-batch whose estimated peak
   (:mod:`lowres_ssl.memory`) stays within 90 % of the card (the whole batch where it fits;
   on the CPU, within half of the RAM); a config whose estimate is over the whole card is a
   one-line error naming the micro-batch (and the preset) that would fit.

A :class:`Machine` can be described without having it (an 8 GB CUDA card, planned on a
laptop), so the tests plan GPU runs. ``--autofit`` only lowers the micro-batch afterwards.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lowres_ssl.config import (
    LONG,
    TASK_KEYS,
    Config,
    from_dict,
    merge,
    to_dict,
    validate,
    with_photos,
)
from lowres_ssl.data.sizes import SMALL_MAX
from lowres_ssl.device import card_memory_gib, cpu_has_native_bf16, cuda_mixed_precision, ram_gib
from lowres_ssl.errors import UserError
from lowres_ssl.length import Choice, LongRule
from lowres_ssl.memory import (
    GIB,
    HEADROOM,
    Estimate,
    Setting,
    certain_bytes,
    estimate,
    fit_micro_batch,
)

log = logging.getLogger("lowres_ssl")

#: The view side of photos where ``photos.data.load_size`` is not set (smaller photos keep
#: theirs).
PHOTO_SIZE = 128
#: ``train.precision`` → Accelerate's ``mixed_precision``.
ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


# ---------------------------------------------------------------------------------------------
# The machine


@dataclass(frozen=True)
class Machine:
    """What a run is planned for: a CUDA card or the CPU, its memory, the processes the
    launcher starts, and the mixed precision each ``train.precision: auto`` gets there.

    ``launcher_precision``: what ``accelerate launch --mixed_precision`` (or ``accelerate
    config``) asked for (``no``: nothing); ``native_precision``: auto's choice without the
    launcher (bf16 on GPUs of compute capability ≥ 8.0, fp16 below; on the CPU bf16 where it
    computes bf16 natively, else fp32). ``here``: False for a described machine (a preset's
    card planned on a machine without one)."""

    kind: str  # cuda or cpu
    memory_gib: float  # the card's (an emulated card's, LOWRES_SSL_GPU_GIB) or the RAM
    processes: int = 1
    launcher_precision: str = "no"
    native_precision: str = "fp32"
    found: str = ""  # what it is, in words
    here: bool = True

    @property
    def cuda(self) -> bool:
        return self.kind == "cuda"

    @classmethod
    def this_one(cls) -> Machine:
        """This machine, as the launcher set it up (``WORLD_SIZE``,
        ``ACCELERATE_MIXED_PRECISION``)."""
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if torch.cuda.is_available():
            index = _this_process_card()
            gib = card_memory_gib(index)
            native = cuda_mixed_precision(torch.device("cuda", index))
            found = f"{torch.cuda.get_device_name(index)} ({gib:.1f} GiB)"
            return cls("cuda", gib, processes, launcher, native, found)
        native = "bf16" if cpu_has_native_bf16() else "fp32"
        return cls("cpu", ram_gib(), processes, launcher, native, no_gpu_reason())

    @classmethod
    def card(cls, gib: float, **kw: Any) -> Machine:
        """A described CUDA card of ``gib`` GiB (bf16, as every card of compute capability
        ≥ 8.0; ``native_precision="fp16"`` for older ones)."""
        kw.setdefault("native_precision", "bf16")
        kw.setdefault("found", f"a {gib:g} GiB CUDA card")
        kw.setdefault("here", False)
        return cls("cuda", gib, **kw)

    def with_processes(self, processes: int) -> Machine:
        return dataclasses.replace(self, processes=processes)


def _this_process_card() -> int:
    """The index of the card this process will train on: under a launcher its local rank's
    (Accelerate gives each process that one), else the current device. Read before Accelerate
    starts, without touching another process's card."""
    local = os.environ.get("LOCAL_RANK")
    if local is not None and local.isdigit() and int(local) < torch.cuda.device_count():
        return int(local)
    return torch.cuda.current_device()


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


def precision_for(setting: str, machine: Machine) -> str:
    """``train.precision`` as the run on ``machine`` trains it: bf16, fp16 or fp32.

    ``auto``: the launcher's choice, else the machine's native one. The launcher exports
    ``no`` when nothing was asked for, so ``no`` from it counts as no choice."""
    if setting != "auto":
        return setting
    if machine.launcher_precision not in ("no", ""):
        return {"no": "fp32"}.get(machine.launcher_precision, machine.launcher_precision)
    return machine.native_precision


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Plan:
    """A resolved config (no ``auto``, no task default left), the machine it is for, the
    notes that say what was chosen and why (the run logs them) and the memory estimate."""

    cfg: Config
    machine: Machine
    notes: list[str] = field(default_factory=list)
    cached_images: int = 0  # decoded images kept on the card
    known: Estimate | None = None  # the estimate, where resolving made it
    length: Choice | None = None  # the rule for long runs on photos, where it was decided

    @functools.cached_property
    def estimate(self) -> Estimate:
        """The estimated peak memory (made on demand where resolving did not need it: a set
        micro-batch on the CPU, which a run there does not check)."""
        if self.known is not None:
            return self.known
        return estimate(setting_for(self.cfg, self.machine, cached_images=self.cached_images))

    @property
    def lines(self) -> list[str]:
        """What a dry run prints under the config: the notes, then the memory breakdown."""
        return [*self.notes, *self.estimate.lines()]

    @property
    def mixed_precision(self) -> str:
        """Accelerate's name of the precision (``no``, ``bf16``, ``fp16``)."""
        return ACCELERATE_PRECISION[self.cfg.train.precision]

    def hardware_problem(self) -> str | None:
        """Why this machine cannot train the plan (None: it can). A config for another
        machine can be read and planned here; training it here is this one line."""
        if self.cfg.train.precision == "fp16" and not self.machine.cuda:
            return (
                "fp16 mixed precision needs a CUDA GPU; on the CPU use train.precision=fp32 "
                "(or bf16)"
            )
        return None


def resolve(
    request: Config,
    machine: Machine,
    *,
    defaults: dict[str, Any] | None = None,
    saved: dict[str, Any] | None = None,
) -> Plan:
    """``request`` made concrete for ``machine`` (see the module's doc for the order).

    ``defaults``: the task's own values where ``request`` says None (a partial config, e.g.
    ``Pretraining.defaults``); ``saved``: on ``--resume``, the run folder's config, whose
    resolved values every ``auto`` keeps."""
    notes: list[str] = []
    cfg = with_defaults(request, defaults or {})
    if saved:
        cfg = keep_saved(cfg, saved)
    count = functools.cache(functools.partial(image_count, cfg))  # a folder is scanned once
    cfg, note = resolve_views(cfg)
    if note:
        notes.append(note)
    cfg, length = resolve_length(cfg, machine.processes, count)
    if length:
        notes.append(length.line)
    validate(cfg)  # what the sizing below builds (the kernel, the objective) can be built
    cfg = _replace(cfg, "train", precision=precision_for(cfg.train.precision, machine))
    cfg = _replace(cfg, "data", cache=cache_for(cfg, machine, count))
    cfg = _replace(cfg, "loss", mmd_path=mmd_path_for(cfg, machine))
    cached = images_on_card(cfg, machine, count)
    cfg, est, note = resolve_micro_batch(cfg, machine, cached_images=cached)
    if note:
        notes.append(note)
    if not machine.here:
        notes.append(f"sized for {machine.found}; this machine does not have it")
    return Plan(validate(cfg), machine, notes, cached, est, length)


def unresolved(cfg: Config) -> list[str]:
    """The keys of ``cfg`` still ``auto`` or None-for-the-task (empty for a plan's config)."""

    def walk(values: dict[str, Any], prefix: str):
        for key, value in values.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and key not in ("options", "photos"):
                yield from walk(value, f"{name}.")
            elif (
                value == "auto"
                or (value is None and name in TASK_KEYS)
                or (key == "photos" and value)
            ):
                yield name

    return list(walk(to_dict(cfg), ""))


def _replace(cfg: Config, section: str, **values: Any) -> Config:
    return dataclasses.replace(
        cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)}
    )


def with_defaults(cfg: Config, defaults: dict[str, Any]) -> Config:
    """``cfg`` with ``defaults`` (a partial config) where it says None; the defaults'
    ``photos`` keys join the overlay where ``cfg`` says None for that key (a value set for
    every image size wins over a task's photo default)."""
    values = to_dict(cfg)
    own_photos = values.pop("photos")
    photos = _where_none(defaults.get("photos") or {}, values)
    filled = _fill_none(values, {k: v for k, v in defaults.items() if k != "photos"})
    filled["photos"] = merge(photos, own_photos)
    return from_dict(filled)


def _fill_none(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    for key, value in defaults.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _fill_none(out[key], value)
        elif out.get(key) is None:
            out[key] = value
    return out


def _where_none(overlay: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``overlay`` whose value in ``values`` is None."""
    out = {}
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            if rest := _where_none(value, values[key]):
                out[key] = rest
        elif values.get(key) is None:
            out[key] = value
    return out


def keep_saved(cfg: Config, saved: dict[str, Any]) -> Config:
    """On resume: every ``auto`` of ``cfg`` takes the value the run resolved it to."""
    saved_cfg = from_dict(saved)
    kept = {
        ("data", "load_size"): saved_cfg.data.load_size,
        ("data", "cache"): saved_cfg.data.cache,
        ("loss", "mmd_path"): saved_cfg.loss.mmd_path,
        ("train", "precision"): saved_cfg.train.precision,
        ("train", "micro_batch_size"): saved_cfg.train.micro_batch_size,
    }
    for (section, key), value in kept.items():
        if getattr(getattr(cfg, section), key) == "auto" and value != "auto":
            cfg = _replace(cfg, section, **{key: value})
    return cfg


def resolve_views(cfg: Config) -> tuple[Config, str | None]:
    """``data.load_size: auto`` chosen from the images (photos: ``photos.data.load_size``,
    else :data:`PHOTO_SIZE`), and on photos (views over 64 px) the ``photos`` overlay applied;
    (config whose overlay keeps only its section for long runs, on photos, for
    :func:`resolve_length`; the line saying what the images are)."""
    from lowres_ssl.data.sizes import choose_view_size

    overlay = dict(cfg.photos)
    photo_size = (overlay.get("data") or {}).get("load_size", PHOTO_SIZE)
    note = None
    if cfg.data.load_size == "auto":
        choice = choose_view_size(cfg.data.path, photo_size)
        cfg = _replace(cfg, "data", load_size=choice.size)
        note = f"data: {choice}"
    if cfg.data.view_size <= SMALL_MAX:
        return dataclasses.replace(cfg, photos={}), note
    data = {k: v for k, v in (overlay.get("data") or {}).items() if k != "load_size"}
    cfg = with_photos(dataclasses.replace(cfg, photos={**overlay, "data": data}))
    long = {LONG: overlay[LONG]} if overlay.get(LONG) else {}
    return dataclasses.replace(cfg, photos=long), note


def resolve_length(
    cfg: Config, processes: int, count: Callable[[], int]
) -> tuple[Config, Choice | None]:
    """The overlay's section for long runs (left by :func:`resolve_views` on photos) applied
    where the run on ``processes`` processes sees enough images (:mod:`lowres_ssl.length`;
    ``count``: the images); (config with an empty overlay, the choice: None without a rule)."""
    rule = LongRule.of(cfg.photos)
    if rule is None:
        return dataclasses.replace(cfg, photos={}), None
    choice = rule.decide(cfg.train, processes, count)
    if choice.long:
        cfg = with_photos(cfg, long=True)
    return dataclasses.replace(cfg, photos={}), choice


def images_on_card(cfg: Config, machine: Machine, count: Callable[[], int] | None = None) -> int:
    """How many decoded images ``data.cache: gpu`` keeps on the card (the loader's rule: the
    whole set where it takes at most a quarter of the card's memory; 0 on the CPU).
    ``count``: the images of ``cfg.data`` (default :func:`image_count`)."""
    if not machine.cuda or cfg.data.cache != "gpu":
        return 0
    n = (count or functools.partial(image_count, cfg))()
    return n if _fits_card(n, cfg, machine) else 0


def image_count(cfg: Config) -> int:
    """The images of ``cfg.data``: a dataset's size, or the files of a folder."""
    from lowres_ssl.data.builtin import dataset_size

    known = dataset_size(cfg.data.path, cfg.data.split)
    if known is not None:
        return known
    from lowres_ssl.data.folders import scan_folder

    return len(scan_folder(cfg.data.path))


def _fits_card(n: int, cfg: Config, machine: Machine) -> bool:
    from lowres_ssl.data.loader import fits_gpu_cache

    return fits_gpu_cache(n * 3 * cfg.data.load_size**2, machine.memory_gib * GIB)


def cache_for(cfg: Config, machine: Machine, count: Callable[[], int] | None = None) -> str:
    """``data.cache``, ``auto`` resolved: on the card where the decoded set fits a quarter of
    it, else decoded once on the disk where half the free space holds it, else none.
    ``count``: the images of ``cfg.data`` (default :func:`image_count`)."""
    if cfg.data.cache != "auto":
        return cfg.data.cache
    count = count or functools.partial(image_count, cfg)
    if machine.cuda and _fits_card(count(), cfg, machine):
        return "gpu"
    from lowres_ssl.data.builtin import dataset_size
    from lowres_ssl.data.loader import room_on_disk

    if dataset_size(cfg.data.path, cfg.data.split) is not None:
        return "disk"  # a dataset by name is read into memory, whatever the cache says
    nbytes = count() * 3 * cfg.data.load_size**2
    return "disk" if room_on_disk(nbytes, cfg.data.cache_dir) else "none"


def mmd_path_for(cfg: Config, machine: Machine) -> str:
    """``loss.mmd_path``, ``auto`` resolved as the loss would for the gathered batch."""
    if cfg.loss.mmd_path != "auto":
        return cfg.loss.mmd_path
    from lowres_ssl.losses.kernels import SFRIKKernel
    from lowres_ssl.losses.mmd import choose_path
    from lowres_ssl.models import projector_out_dim

    n, q = cfg.train.batch_size * machine.processes, projector_out_dim(cfg.model.projector)
    try:
        kernel = SFRIKKernel(cfg.loss.kernel_weights)
    except ValueError:  # weights that cannot work: validation says so in one line
        return cfg.loss.mmd_path
    return choose_path(n, q, kernel)


# ---------------------------------------------------------------------------------------------
# The micro-batch


def setting_for(cfg: Config, machine: Machine, *, cached_images: int = 0) -> Setting:
    """The :class:`~lowres_ssl.memory.Setting` of a resolved ``cfg`` on ``machine``."""
    return Setting.from_config(
        cfg, cuda=machine.cuda, mixed=cfg.train.precision != "fp32",
        processes=machine.processes, cached_images=cached_images,
    )  # fmt: skip


def resolve_micro_batch(
    cfg: Config, machine: Machine, *, cached_images: int = 0
) -> tuple[Config, Estimate | None, str | None]:
    """The micro-batch for ``cfg`` on ``machine``, its estimate and a line to log; raises a
    one-line :class:`UserError` when the config cannot fit. On the CPU a set micro-batch is
    checked against what it holds for certain (:func:`~lowres_ssl.memory.certain_bytes`: the
    whole estimate runs the network, seconds a CPU run need not wait)."""
    cuda, card = machine.cuda, machine.memory_gib
    budget = card if cuda else 0.5 * card / HEADROOM  # the CPU: half of the RAM
    base = setting_for(cfg, machine, cached_images=cached_images)
    where = f"the {card:.1f} GiB card" if cuda else f"{card:.0f} GiB of RAM"
    if not cuda and cfg.train.micro_batch_size != "auto":
        if certain_bytes(base) > budget * GIB:
            raise UserError(_no_fit(cfg, base, where, budget))
        return cfg, None, None
    if cfg.train.micro_batch_size == "auto":
        fitted = fit_micro_batch(dataclasses.replace(base, micro_batch_size=None), budget)
        if fitted is None:
            raise UserError(_no_fit(cfg, base, where, budget))
        micro = fitted.setting.micro
        cfg = _replace(cfg, "train", micro_batch_size=micro if micro < base.batch_size else None)
        how = f"micro-batches of {micro}" if micro < base.batch_size else "the whole batch at once"
        line = (
            f"memory: batch {base.batch_size} in {how} on {where} "
            f"(estimated peak {fitted.total_gib:.2f} GiB)"
        )
        return cfg, fitted, line
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
# The machine a dry run plans for


def gpu_preset_warning(cfg: Config, machine: Machine) -> str | None:
    """The line for a GPU preset on a machine without a GPU (None: nothing to say)."""
    from lowres_ssl.presets import card_sizes

    nominal = card_sizes().get(cfg.preset or "", 0.0)
    if machine.cuda or not nominal:
        return None
    return (
        f"preset {cfg.preset} is made for a {nominal:g} GB GPU, and this machine has "
        f"{machine.found}: it would train on the CPU, for days; --preset cpu is a quick CPU run"
    )


def machine_for(cfg: Config) -> tuple[Machine, str | None]:
    """What a dry run of ``cfg`` plans for, and a warning: this machine; or, for a GPU preset
    on a machine without a GPU, the preset's card (what the preset is for), with the line
    that says a run here would take the CPU."""
    from lowres_ssl.presets import card_sizes

    machine = Machine.this_one()
    warning = gpu_preset_warning(cfg, machine)
    if warning is None:
        return machine, None
    nominal = card_sizes()[cfg.preset]
    card = Machine.card(
        nominal, processes=machine.processes, launcher_precision=machine.launcher_precision,
        found=f"the preset's {nominal:g} GB card",
    )  # fmt: skip
    return card, warning


def auto_line(plan: Plan) -> str:
    """``--preset auto``'s one line: what it found, what it chose, the estimated peak."""
    est, cfg = plan.estimate, plan.cfg
    s = est.setting
    how = f"micro-batches of {s.micro}" if s.micro < s.batch_size else "one pass"
    return (
        f"preset auto: found {plan.machine.found} → {cfg.preset}; estimated peak "
        f"{est.total_gib:.2f} GiB (batch {s.batch_size} in {how}, {s.view_size} px, q = {s.q:,})"
    )


__all__ = [
    "ACCELERATE_PRECISION",
    "PHOTO_SIZE",
    "Machine",
    "Plan",
    "auto_line",
    "cache_for",
    "gpu_preset_warning",
    "images_on_card",
    "keep_saved",
    "machine_for",
    "no_gpu_reason",
    "precision_for",
    "resolve",
    "resolve_length",
    "resolve_micro_batch",
    "resolve_views",
    "setting_for",
    "unresolved",
    "with_defaults",
]
