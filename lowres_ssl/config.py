"""The typed configuration of a run: sections of dataclasses, YAML in and out, overrides.

A run's configuration is resolved in layers, each overriding the one before::

    defaults below  <  preset (presets/NAME.yaml)  <  --config FILE.yaml  <  flags  <  --set k=v

and validated before anything heavy starts: an unknown key, a wrong type, a value out of range
or a missing folder is a one-line :class:`~lowres_ssl.errors.UserError` naming the key or path
and the valid choices. The resolved configuration is written to the run folder as
``config.yaml``; ``--config runs/NAME/config.yaml`` reproduces that run.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lowres_ssl.errors import UserError


@dataclass
class ViewsConfig:
    """The views of a training step: two, or multi-crop (``docs/training.md#multi-crop-views``)."""

    layout: str = "swav"  # swav: the large views are the anchors; obow: the whole image first
    large: int = 2  # large views at the view size (obow: crops besides the whole image)
    small: int = 0  # small crops (at small_size)
    small_size: int | None = None  # px; None: half the view size
    large_scale: list[float] | None = None  # crop area; None: the recipe's, (0.14, 1) with crops
    small_scale: list[float] = field(default_factory=lambda: [0.05, 0.14])

    @property
    def small_crops(self) -> int:
        """The number of small crops."""
        return self.small

    def small_side(self, view_size: int) -> int:
        """The small crops' side at views of ``view_size`` px: ``small_size``, or half."""
        return self.small_size or max(8, view_size // 2)

    @property
    def count(self) -> int:
        """Every view of a step: the whole image (obow), the large views, the small crops."""
        return (self.layout == "obow") + self.large + self.small


@dataclass
class DataConfig:
    """Where the images come from and how they become views (see ``lowres_ssl.data``)."""

    path: str = "digits"  # a folder of images, or digits / cifar10 / cifar100 / stl10
    split: str = "train"  # for a dataset name
    load_size: int | str = "auto"  # side of the decoded square (px); auto: from the images
    # (small images keep their size; photos get photos.data.load_size, 128 px unless set)
    image_size: int | None = None  # side of the views; None = load_size
    cache: str = "auto"  # auto, none, disk, gpu
    cache_dir: str | None = None  # None = $LOWRES_SSL_CACHE or ~/.cache/lowres_ssl
    num_workers: int | None = None  # decoding processes; None = cores - 1 (at most 8)
    min_size: int = 16  # skip images whose shorter side is smaller (px)
    max_pixels: int = 178_956_970  # skip larger images (decompression bombs)
    recipe: str | None = None  # augmentation: vicreg, auh, cifar, supervised; None: the task's
    views: ViewsConfig = field(default_factory=ViewsConfig)

    @property
    def view_size(self) -> int:
        """The side of the views (``load_size`` must be resolved: see ``lowres_ssl.plan``)."""
        size = self.image_size or self.load_size
        if not isinstance(size, int):
            raise ValueError("data.load_size is still 'auto': resolve it first (lowres_ssl.plan)")
        return size


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # resnet18, resnet34, resnet50
    projector: str = "2048-2048-8192"  # Linear-BN-ReLU widths; the last one is q
    grad_checkpointing: bool = False  # recompute each ResNet stage in backward
    channels_last: bool = True  # memory format on GPU (ignored on CPU)


@dataclass
class LossConfig:
    name: str = "sfrik"  # sfrik, vicreg, barlow_twins, uniformity, simclr
    lam: float | None = None  # SFRIK's λ; None: follows q as the official recipes (q/4000 to 8192)
    kernel_weights: list[float] = field(default_factory=lambda: [1.0, 40.0, 40.0])  # b_1..b_L
    mmd_path: str = "auto"  # auto, dense, blocked, moments
    reg_small: bool = False  # multi-crop: the regulariser on every view, not the anchors only
    options: dict[str, Any] = field(default_factory=dict)  # other keyword arguments
    # Experimental (docs/benchmarks/photos.md): SFRIK's MMD over the batch and the last
    # `memory` embeddings of earlier steps; memory_momentum: None fills it with the online
    # encoder's, a number m in [0, 1) with a momentum encoder's (MoCo v2). One process, one pass.
    memory: int = 0
    memory_momentum: float | None = None


@dataclass
class OptimConfig:
    """``None``: the task's default (pre-training: LARS, weight decay 1e-6, 10 warm-up epochs,
    cosine to 0.001 of the peak; fine-tuning: SGD, none, none, to 0)."""

    name: str | None = None  # lars, adamw, sgd
    base_lr: float = 1.2  # the learning rate is base_lr × global batch / 256
    weight_decay: float | None = None
    momentum: float = 0.9  # LARS
    eta: float = 0.001  # LARS trust coefficient
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW
    state_bits: int = 8  # 8 (bitsandbytes) or 32
    warmup_epochs: float | None = None  # linear warm-up, scaled down for short runs
    final_lr_ratio: float | None = None  # cosine decay to this fraction of the peak


@dataclass
class TrainConfig:
    epochs: int | None = None  # None: the task's (pre-training 100, fine-tuning 20)
    max_steps: int | None = None  # stop after this many optimizer steps in all
    batch_size: int = 256  # per process; the regulariser sees all processes' batches
    micro_batch_size: int | str | None = None  # what the card holds at once (the embedding
    # cache): a number, auto (fitted to the card by the memory estimator) or None (the batch)
    accumulate_steps: int = 1  # plain gradient accumulation: another objective (docs/training.md)
    precision: str = "auto"  # auto (bf16 / fp16 / fp32 by device), bf16, fp16, fp32
    seed: int = 0
    log_every: int = 10  # steps between metrics.jsonl lines
    checkpoint_every: int | None = None  # steps between checkpoints (also at each epoch's
    # end); None: the task's (pre-training 500, fine-tuning 1000)
    keep_checkpoints: int = 2  # the last K are kept
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    time_budget: str | float | None = None  # 15m, 2h, 90s or seconds: the total steps fit it
    # (then epochs and max_steps do not bound the run)


@dataclass
class EvalConfig:
    """The online kNN monitor (see ``lowres_ssl.eval.monitor``)."""

    train: str | None = None  # labeled folder or dataset[:split]; None: the training data
    test: str | None = None  # None: the test split of a dataset name (cifar10 → cifar10:test)
    every_epochs: int | None = None  # None: 1 where a test set is known, else off; 0: off
    k: int = 200  # neighbours (k = 20 is reported too)
    image_size: int | None = None  # None: the training view size
    batch_size: int = 256  # images per forward pass
    max_train_images: int | None = None  # an evenly spaced subset of the train set (None: all)
    max_test_images: int | None = None
    untrained: bool = False  # also the kNN of the backbone before its first step (the baseline)


@dataclass
class FinetuneConfig:
    """Supervised fine-tuning (``scripts/finetune.py``); unused by pre-training."""

    checkpoint: str | None = None  # the pre-trained weights: run folder, checkpoint or file
    random_init: bool = False  # the same architecture from scratch (the baseline)
    val: str | None = None  # labeled folder or dataset:split, validated every epoch
    backbone_lr: float = 0.01  # per 256 images (scaled by the global batch)
    head_lr: float = 0.2  # per 256 images
    freeze_backbone: bool = False  # train the head only (a linear probe with augmentation)
    train_fraction: float | None = None  # a class-balanced subset of the training folder
    per_class: int | None = None  # or this many images per class
    label_smoothing: float = 0.0
    val_every_epochs: int = 1


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    preset: str | None = None  # the preset it started from (for the record)
    #: Keys that apply where the views are photos (over 64 px), as a partial config, e.g.
    #: ``{"loss": {"name": "simclr"}, "data": {"load_size": 96}}``; resolved by
    #: :func:`lowres_ssl.plan.resolve` (a key set outside it wins for every image size).
    photos: dict[str, Any] = field(default_factory=dict)


#: The keys whose None is the task's default (``Task.defaults``, applied by
#: :func:`lowres_ssl.plan.resolve`).
TASK_KEYS = (
    "data.recipe", "optim.name", "optim.weight_decay", "optim.warmup_epochs",
    "optim.final_lr_ratio", "train.epochs", "train.checkpoint_every",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# dict <-> dataclasses, with one-line errors


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [_type_name(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(parts) + " or null"
    if origin is list:
        inner = typing.get_args(tp)[0]
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
        return f"a list of {plural.get(inner, 'values')}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` checked against the annotation ``tp`` (ints are accepted as floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except UserError:
                continue
        raise UserError(f"config key {key} must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {key} must be {_type_name(tp)}, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key {key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise UserError(f"config key {key} must be {_type_name(tp)}, got {value!r}")


def _resolve_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = _resolve_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            where = f" in {prefix.rstrip('.')}" if prefix else ""
            raise UserError(
                f"unknown config key {prefix}{key}; valid keys{where}: {', '.join(names)}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise UserError(f"config key {prefix}{key} must be a section (a mapping)")
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, tp)
    return cls(**kwargs)


def from_dict(values: dict[str, Any]) -> Config:
    """A :class:`Config` from nested dicts (missing keys take their defaults; the keys of
    earlier versions are read as :func:`upgrade` maps them)."""
    values = upgrade(values or {})
    _check_photos(values.get("photos") or {})
    return _build(Config, values, "")


#: The ``photos`` overlay's section for long runs (``photos.long``, :mod:`lowres_ssl.length`):
#: config keys that apply on photos where the run sees at least ``min_images`` images (a time
#: budget counted at ``images_per_s``), besides the overlay's own.
LONG = "long"
#: The rule's own keys in ``photos.long`` (the rest are config keys).
LONG_RULE = ("min_images", "images_per_s")


def long_keys(rule: dict[str, Any]) -> dict[str, Any]:
    """The config keys of a ``photos.long`` section (less the rule's own)."""
    return {k: v for k, v in rule.items() if k not in LONG_RULE}


def _check_photos(photos: dict[str, Any]) -> None:
    """The ``photos`` overlay's keys are config keys; so are its ``long`` section's, besides
    the rule's own (both required, positive); ``long: null`` is no rule."""
    _build(Config, {k: v for k, v in photos.items() if k != LONG}, "photos.")
    if photos.get(LONG) is None:
        return
    rule = photos[LONG]
    if not isinstance(rule, dict):
        raise UserError(f"config key photos.{LONG} must be a section (a mapping)")
    _build(Config, long_keys(rule), f"photos.{LONG}.")
    for key, tp in zip(LONG_RULE, (int, float), strict=True):
        if key not in rule:
            raise UserError(
                f"config key photos.{LONG}.{key} is missing: the rule for long runs needs "
                f"both {' and '.join(LONG_RULE)}"
            )
        _positive(f"photos.{LONG}.{key}", _coerce(f"photos.{LONG}.{key}", rule[key], tp))


#: Keys of earlier versions, read by :func:`upgrade`: (section, old key, the key it set on
#: photos, that key's old default). The old key applied where its key was ``auto`` (or None).
_PHOTO_KEYS = (
    (("data",), "photo_size", "load_size", "auto"),
    (("data", "views"), "photo_small", "small", "auto"),
    (("data", "views"), "photo_large_scale", "large_scale", None),
    (("loss",), "photo_name", "name", "sfrik"),
)
#: What ``auto`` meant for small images where these keys held it.
_SMALL_IMAGE_VALUES = {("data", "views", "small"): 0, ("loss", "name"): "sfrik"}


def upgrade(values: dict[str, Any]) -> dict[str, Any]:
    """A config written by an earlier version in today's keys: the ``photo_*`` twins
    (``data.photo_size``, ``data.views.photo_small``, ``data.views.photo_large_scale``,
    ``loss.photo_name``) move into the ``photos`` overlay where their key was ``auto``, that
    key takes its small-image value, and ``data.recipe: auto`` becomes the task's default
    (None). A current config comes out unchanged."""
    out = copy.deepcopy(values)
    photos = copy.deepcopy(out.get("photos") or {})
    for path, old, key, old_default in _PHOTO_KEYS:
        section = _section(out, path)
        if section is None or old not in section:
            continue
        value = section.pop(old)
        if section.get(key, old_default) in ("auto", None):
            _section(photos, path, create=True).setdefault(key, value)
    for (*path, key), value in _SMALL_IMAGE_VALUES.items():
        section = _section(out, tuple(path))
        if section is not None and section.get(key) == "auto":
            section[key] = value
    data = _section(out, ("data",))
    if data is not None and data.get("recipe") == "auto":
        data["recipe"] = None
    if photos:
        out["photos"] = photos
    return out


def _section(values: dict[str, Any], path: tuple[str, ...], create: bool = False):
    """The nested dict at ``path`` (None where it is missing or not a dict)."""
    node = values
    for key in path:
        if not isinstance(node.get(key), dict):
            if not create or key in node:
                return None
            node[key] = {}
        node = node[key]
    return node


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"section.key": value}`` (``options`` is a value)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "options":
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts merged key by key; ``override`` wins (sections merge, values replace)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "options":
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def layer(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` layered on ``base`` (:func:`merge`, both read as :func:`upgrade` maps them),
    where a key ``over`` sets outside its ``photos`` section also leaves ``base``'s photos
    overlay: what a later layer (a config file, a flag, ``--set``) says holds for every image
    size, the preset's photo keys included."""
    base, over = upgrade(base), upgrade(over)
    later = {k: v for k, v in over.items() if k != "photos"}
    photos = _photos_without(base.get("photos") or {}, later)
    out = merge(base, over)
    photos = merge(photos, over.get("photos") or {})
    if photos:
        out["photos"] = photos
    else:
        out.pop("photos", None)
    return out


def _photos_without(photos: dict[str, Any], keys: dict[str, Any]) -> dict[str, Any]:
    """The ``photos`` overlay less every key ``keys`` sets, its ``long`` section's included;
    where ``keys`` chooses the loss (``loss.name``) the section goes whole (it is a loss with
    its settings, chosen for long runs: a loss chosen later holds at every length), and where
    no config key of it is left, too."""
    out = _without(photos, keys)
    rule = out.pop(LONG, None)
    if isinstance(rule, dict) and "name" not in (keys.get("loss") or {}):
        rest = _without(rule, keys)
        if set(rest) - set(LONG_RULE):
            out[LONG] = rest
    elif rule is not None and not isinstance(rule, dict):
        out[LONG] = rule  # not a section: from_dict says so
    return out


def _without(overlay: dict[str, Any], keys: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` less every key ``keys`` sets (sections recursed; ``options`` is a value)."""
    out = {}
    for key, value in overlay.items():
        if key not in keys:
            out[key] = value
        elif isinstance(value, dict) and isinstance(keys[key], dict) and key != "options":
            rest = _without(value, keys[key])
            if rest:
                out[key] = rest
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file as nested dicts; a missing file or bad YAML is a one-line error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"config file {path} is not valid YAML{where}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of sections, not {values!r}")
    return values


def parse_set(assignments: list[str]) -> dict[str, Any]:
    """``["train.batch_size=128", "loss.kernel_weights=[1, 20, 20]"]`` as nested dicts; values
    are parsed as YAML (so numbers, lists, null and true/false come out typed)."""
    out: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set expects key=value (e.g. train.batch_size=128), got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {part} is a value, not a section")
        node[parts[-1]] = value
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Validation


def _choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        raise UserError(f"config key {key} is {value!r}; choose one of {', '.join(choices)}")


def _positive(key: str, value: float | int | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise UserError(f"config key {key} must be {bound}, got {value}")


def _positive_or_auto(key: str, value: int | str | None, *, allow_zero: bool = False) -> None:
    if isinstance(value, str):
        if value != "auto":
            kind = "an integer >= 0" if allow_zero else "a positive integer"
            raise UserError(f"config key {key} must be {kind} or auto, got {value!r}")
        return
    _positive(key, value, allow_zero=allow_zero)


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def _validate_sides(d: DataConfig) -> None:
    for key in ("load_size", "image_size"):
        side = getattr(d, key)
        if isinstance(side, int) and side > MAX_VIEW_SIDE:
            raise UserError(
                f"config key data.{key} is {side} px; views are at most {MAX_VIEW_SIDE} px "
                "(a low-resolution kit: photos train at 96–128 px)"
            )


#: Limits that catch a slip of the keyboard before it asks for hundreds of GB: the largest
#: view side and projector width a run may have.
MAX_VIEW_SIDE = 1024
MAX_PROJECTOR_WIDTH = 131_072


def _check_memory(lo: LossConfig, t: TrainConfig) -> None:
    """The experimental memory (``loss.memory``) where it can work: SFRIK, one pass."""
    _positive("loss.memory", lo.memory, allow_zero=True)
    if not lo.memory:
        return
    if lo.name != "sfrik":
        raise UserError(f"config key loss.memory needs loss.name=sfrik, got {lo.name}")
    m = lo.memory_momentum
    if m is not None and not 0 <= m < 1:
        raise UserError(f"config key loss.memory_momentum must be in [0, 1) or null, got {m}")
    micro = t.micro_batch_size
    if t.accumulate_steps > 1 or micro == "auto" or (micro and micro < t.batch_size):
        raise UserError(
            "config key loss.memory is experimental and runs the whole batch in one pass; "
            "set train.micro_batch_size=null and train.accumulate_steps=1, or loss.memory=0"
        )


def validate(cfg: Config) -> Config:
    """Check choices, ranges and the data path, of ``cfg`` and of ``cfg`` with its ``photos``
    overlay applied; return ``cfg`` (raises :class:`UserError`)."""
    _validate(cfg)
    if not cfg.photos:
        return cfg
    for long in (False, True) if LONG in cfg.photos else (False,):
        try:
            _validate(with_photos(cfg, long=long))
        except UserError as err:  # the base is valid: the overlay's key is wrong
            where = f"photos.{LONG}." if long else "photos."
            raise UserError(str(err).replace("config key ", f"config key {where}", 1)) from None
    return cfg


def config_at_size(values: dict[str, Any], load_size: int) -> Config:
    """The config of ``values`` for views of ``load_size`` px (a benchmark's, a plan for
    images not at hand), validated."""
    return validate(from_dict(layer(values, {"data": {"load_size": load_size}})))


def with_photos(cfg: Config, *, long: bool = False) -> Config:
    """``cfg`` with its ``photos`` overlay applied (and emptied): the config on photos;
    ``long``: with the overlay's ``long`` section on top (its config keys), the config of a
    long run on photos."""
    values = to_dict(cfg)
    photos = dict(values.pop("photos"))
    rule = photos.pop(LONG, None) or {}
    values = merge(values, photos)
    if long:
        values = merge(values, long_keys(rule))
    return from_dict(values)


def _validate(cfg: Config) -> None:
    from lowres_ssl.augment import RECIPES
    from lowres_ssl.data import CACHE_CHOICES, DATASETS, dataset_spec
    from lowres_ssl.losses import OBJECTIVES
    from lowres_ssl.models import check_backbone_name, projector_out_dim
    from lowres_ssl.models.projector import parse_projector_spec
    from lowres_ssl.optim import OPTIMIZERS

    d, m, lo, o, t = cfg.data, cfg.model, cfg.loss, cfg.optim, cfg.train
    _choice("data.cache", d.cache, CACHE_CHOICES)
    if d.recipe is not None:
        _choice("data.recipe", d.recipe, list(RECIPES))
    _positive_or_auto("data.load_size", d.load_size)
    for key in ("min_size", "max_pixels"):
        _positive(f"data.{key}", getattr(d, key))
    _positive("data.image_size", d.image_size)
    _validate_sides(d)
    _positive("data.num_workers", d.num_workers, allow_zero=True)
    _validate_views(d.views)
    if (named := dataset_spec(d.path)) is not None:
        if d.split not in DATASETS[named[0]]:
            _choice("data.split", d.split, DATASETS[named[0]])
    elif not Path(d.path).expanduser().is_dir():
        names = ", ".join(DATASETS)
        raise UserError(
            f"data.path {d.path} is not a folder; pass a folder of images or one of {names}"
        )
    if not isinstance(m.backbone, str):
        raise UserError(f"model.backbone must be a name, got {m.backbone!r}")
    check_backbone_name(m.backbone)
    projector_out_dim(m.projector)
    if max(parse_projector_spec(m.projector)) > MAX_PROJECTOR_WIDTH:
        raise UserError(
            f"config key model.projector {m.projector!r} has a layer wider than "
            f"{MAX_PROJECTOR_WIDTH:,} (q = 32,768 is the largest preset's)"
        )
    _choice("loss.name", lo.name, list(OBJECTIVES))
    _choice("loss.mmd_path", lo.mmd_path, ("auto", "dense", "blocked", "moments"))
    _positive("loss.lam", lo.lam)
    if any(w < 0 for w in lo.kernel_weights) or not lo.kernel_weights:
        raise UserError("config key loss.kernel_weights must be non-negative b_1..b_L")
    _check_memory(lo, t)
    if o.name is not None:
        _choice("optim.name", o.name, list(OPTIMIZERS))
    _positive("optim.base_lr", o.base_lr)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.warmup_epochs", o.warmup_epochs, allow_zero=True)
    _positive("optim.final_lr_ratio", o.final_lr_ratio, allow_zero=True)
    if o.state_bits not in (8, 32):
        raise UserError(f"config key optim.state_bits must be 8 or 32, got {o.state_bits}")
    if len(o.betas) != 2:
        raise UserError(f"config key optim.betas must be two numbers, got {o.betas}")
    _choice("train.precision", t.precision, PRECISIONS)
    from lowres_ssl.losses import objective_from_settings

    # Loss settings that cannot work. The hardware (fp16 needs a GPU) is checked when training
    # starts, so that a config for another machine can be read and --dry-run here.
    objective_from_settings(
        lo.name, lam=lo.lam,
        kernel_weights=lo.kernel_weights, mmd_path=lo.mmd_path, options=lo.options,
    )  # fmt: skip
    for key in ("epochs", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
        _positive(f"train.{key}", getattr(t, key))
    _positive("train.max_steps", t.max_steps)
    _positive_or_auto("train.micro_batch_size", t.micro_batch_size)
    _positive("train.accumulate_steps", t.accumulate_steps)
    micro = t.micro_batch_size
    if t.accumulate_steps > 1 and (micro == "auto" or (micro and micro < t.batch_size)):
        raise UserError(
            "config keys train.micro_batch_size and train.accumulate_steps are two ways to fit a "
            "batch on the card; set one (micro_batch_size keeps the whole batch's objective)"
        )
    _positive("train.max_bad_steps", t.max_bad_steps)
    if t.time_budget is not None:
        from lowres_ssl.durations import parse_budget

        parse_budget(t.time_budget)
    _validate_eval(cfg)
    _validate_finetune(cfg)


def _validate_views(v: ViewsConfig) -> None:
    from lowres_ssl.losses import LAYOUTS

    _choice("data.views.layout", v.layout, LAYOUTS)
    _positive("data.views.large", v.large, allow_zero=True)
    _positive("data.views.small", v.small, allow_zero=True)
    _positive("data.views.small_size", v.small_size)
    for key in ("large_scale", "small_scale"):
        scale = getattr(v, key)
        if scale is not None and (len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1):
            raise UserError(
                f"config key data.views.{key} must be [low, high] with 0 < low <= high <= 1, "
                f"got {scale}"
            )
    if v.layout == "swav" and v.large < 1:
        raise UserError(
            "config key data.views.large must be >= 1 with layout swav: the large views are "
            "the anchors the others are compared with"
        )
    smallest = {"swav": v.large, "obow": 1 + v.large}[v.layout]
    if smallest + v.small < 2:
        raise UserError(
            f"data.views with layout {v.layout}, large {v.large} and small {v.small} make fewer "
            "than two views; add large views or small crops"
        )


def _validate_finetune(cfg: Config) -> None:
    f = cfg.finetune
    for key in ("backbone_lr", "head_lr"):
        _positive(f"finetune.{key}", getattr(f, key), allow_zero=True)
    _positive("finetune.per_class", f.per_class)
    _positive("finetune.val_every_epochs", f.val_every_epochs, allow_zero=True)
    if f.train_fraction is not None and not 0 < f.train_fraction <= 1:
        raise UserError(
            f"config key finetune.train_fraction must be in (0, 1], got {f.train_fraction}"
        )
    if f.train_fraction is not None and f.per_class is not None:
        raise UserError(
            "config keys finetune.train_fraction and finetune.per_class both pick a subset; set one"
        )
    if not 0 <= f.label_smoothing < 1:
        raise UserError(
            f"config key finetune.label_smoothing must be in [0, 1), got {f.label_smoothing}"
        )


def _validate_eval(cfg: Config) -> None:
    from lowres_ssl.data import DATASETS, dataset_spec

    e = cfg.eval
    _positive("eval.every_epochs", e.every_epochs, allow_zero=True)
    for key in ("k", "image_size", "batch_size", "max_train_images", "max_test_images"):
        _positive(f"eval.{key}", getattr(e, key))
    for key in ("train", "test"):
        spec = getattr(e, key)
        if spec is None or Path(spec).expanduser().is_dir():
            continue
        if (named := dataset_spec(spec)) is None:
            raise UserError(
                f"config key eval.{key}: {spec} is not a folder; pass a labeled folder "
                f"(root/<class>/<image>) or a dataset name with a split (e.g. cifar10:test)"
            )
        name, split = named
        if split and split not in DATASETS[name]:
            _choice(f"eval.{key} split", split, DATASETS[name])
    if e.every_epochs and e.test is None and dataset_spec(cfg.data.path) is None:
        raise UserError(
            "config key eval.every_epochs is set but there is no test set: set eval.test to a "
            "labeled folder (and eval.train, if the training folder has no class subfolders)"
        )
