"""How much memory a training step needs, part by part, and the micro-batch that fits a card.

One place for the memory model (``docs/design.md`` §7): ``--dry-run`` prints its breakdown,
``--preset auto`` and ``train.micro_batch_size: auto`` use it to choose, and
``scripts/bench_loss.py`` takes its loss rule from here. The parts of the peak of one step:

- **weights** (fp32 master copies, BatchNorm buffers), **gradients** (fp32), **optimizer
  state** by its bits (8-bit LARS: 1 byte per value plus one fp32 scale per 256, fp32 for
  tensors under 4,096 values; AdamW: two such states), and the step's transient (the LARS
  update of the largest tensor; on the CPU only what exceeds the activations, which backward
  has freed by then and the heap reuses);
- **mixed-precision weight copies**: autocast keeps a 16-bit copy of every weight it casts;
- **activations**: what autograd saves for backward, *counted, not guessed*: a forward of a
  tiny batch on the CPU under the run's precision, with ``saved_tensors_hooks`` summing the
  bytes of every distinct storage of the batch's size saved, per stage (the weights' 16-bit
  copies that autocast saves are counted above). Every view (multi-crop: the small crops
  counted at their own side) is held for one backward (the plain step, and pass 3 of the
  embedding cache on a micro-batch).
  With gradient checkpointing only the stages' inputs stay, plus the largest stage while it is
  recomputed. Backward adds the gradient of the largest activations (two of them);
- **loss**: the objective on the global batch in fp32 (embeddings, their normalised copies and
  gradients; SFRIK's Gram matrix whole on the dense path or a block at a time, by
  :mod:`lowres_ssl.losses.mmd`'s own rules); with the embedding cache, also the cached
  embeddings of the whole batch and their gradients;
- **views**: the uint8 batch on the device, the float32 copy the augmentation works on, and
  the views of what runs at once (the whole batch without the cache, a micro-batch with it);
- **image cache**: the decoded set kept on the GPU (``data.cache: gpu``/``auto`` where it fits);
- **CUDA context** (the driver, cuBLAS and cuDNN: outside PyTorch's allocator) and the caching
  allocator's slack (reserved above allocated). Both are assumptions until calibrated on a GPU;
  ``docs/benchmarks/presets.md`` says what was measured. On the CPU instead: the heap's and
  oneDNN's overhead, calibrated against the peak RSS of real steps.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lowres_ssl.device import CUDA_CONTEXT_BYTES

GIB = 2**30
MIB = 2**20

#: The caching allocator reserves more than it hands out (block rounding, fragmentation).
ALLOCATOR_SLACK = 0.10
#: On the CPU, glibc's heap and oneDNN's workspaces and caches: measured on a 2-core x86
#: machine (peak RSS growth of real steps against the parts above, ``tests/test_memory.py``).
CPU_SLACK = 0.15
CPU_RUNTIME_BYTES = 48 * MIB
#: A preset fits its card when the estimated peak stays within this fraction of it.
HEADROOM = 0.90
FLOAT = 4


# ---------------------------------------------------------------------------------------------
# The loss path


def loss_bytes(
    name: str,
    n: int,
    q: int,
    *,
    mmd_path: str = "auto",
    kernel_degree: int | None = 3,
    block_size: int | None = None,
    views: int = 2,
    regularised: int | None = None,
    positives: int | None = None,
) -> float:
    """Peak extra bytes of one call of the objective ``name`` on ``views`` views of ``n`` rows
    of width ``q`` (forward and backward, fp32), by the loss library's own path and block
    rules; ``regularised``: the views its batch statistics see (default all), ``positives``:
    SimCLR's (row view, positive view) blocks (default ``views − 1`` per anchor of two).

    All objectives: the embeddings' fp32, normalised or centred copies, ``cat`` and gradients,
    about 3.5·n·q floats per view. SFRIK (and ``uniformity``, the same MMD): the dense path
    keeps one n×n Gram matrix per regularised view for backward plus one working chunk; the
    blocked path holds about four blocks at a time; the moments path keeps q×q second moments.
    VICReg: two q×q covariances, about 2.25 q² floats per regularised view at the peak; Barlow
    Twins one q×q cross-correlation, about 3.7 q²; SimCLR: the (blocks·n) × (views·n)
    similarity matrix and its softmax (2n × 2n at two views).
    """
    from lowres_ssl.losses import mmd

    regularised = views if regularised is None else regularised
    positives = 2 * (views - 1) if positives is None else positives
    linear = 3.5 * views * n * q
    if name in ("sfrik", "uniformity"):
        path = mmd.path_for_degree(n, q, kernel_degree) if mmd_path == "auto" else mmd_path
        if path == "moments":
            return FLOAT * (linear + 3.0 * q * q)
        if path == "dense":
            return FLOAT * (linear + regularised * n * n + min(n * n, mmd.BLOCK_ENTRIES))
        rows = block_size or mmd.default_block_size(n)
        return FLOAT * (linear + 4.0 * rows * n)
    if name == "vicreg":
        return FLOAT * (linear + 2.25 * regularised * q * q)
    if name == "barlow_twins":
        return FLOAT * (linear + 3.7 * q * q)
    if name == "simclr":
        return FLOAT * (linear + 3.0 * (positives * n) * (views * n))
    raise ValueError(f"no memory rule for the objective {name!r}")


# ---------------------------------------------------------------------------------------------
# Activations, counted on the CPU


@dataclass(frozen=True)
class ActivationProfile:
    """Bytes autograd saves per image (one view), by part of the network.

    ``per_stage``: the stem, each stage (ResNet's ``layer1``..``layer4``, a library model's
    checkpointed units) and ``head`` (what follows the last stage: pool + projector);
    ``stage_inputs``: what checkpointing keeps of each stage (its input); ``largest``: the
    largest single saved tensor per image (backward holds a gradient of its size or two).
    """

    per_stage: dict[str, float]
    stage_inputs: float
    largest: float

    def per_image(self, checkpointing: bool) -> float:
        if not checkpointing:
            return sum(self.per_stage.values())
        stages = [v for k, v in self.per_stage.items() if k not in _OUTSIDE]
        outside = sum(v for k, v in self.per_stage.items() if k in _OUTSIDE)
        return outside + self.stage_inputs + max(stages, default=0.0)


_OUTSIDE = ("stem", "head")

#: The batch the activations are counted on: prime, so that a saved tensor whose leading size
#: is a multiple of it is an activation (weights are 2^k or 1,000 wide, not 7·k).
PROFILE_BATCH = 7


@contextmanager
def _counting(model: nn.Module, n: int) -> Iterator[dict]:
    """Sum the bytes of the distinct storages autograd saves for a batch of ``n``, tagged with
    the stage running when they were saved."""
    record: dict = {"n": n, "seen": set(), "bytes": {}, "largest": 0, "inputs": 0}
    current = ["stem"]
    hooks = []
    backbone = model.backbone

    def enter(name):
        def hook(module, args):
            current[0] = name
            record["inputs"] += args[0].untyped_storage().nbytes()

        return hook

    stages = backbone.stages()
    for name, stage in stages:
        hooks.append(stage.register_forward_pre_hook(enter(name)))
    hooks.append(stages[-1][1].register_forward_hook(lambda *_: current.__setitem__(0, "head")))

    def pack(t: torch.Tensor):
        # Activations only: a tensor whose leading size is the batch's, or a multiple of it
        # (tokens flattened into rows, as a Linear on (B, N, C) saves them: B·N rows). The
        # 16-bit weight copies autocast saves (and any other constant) are counted with the
        # weights: with a batch of 7, no weight's leading size is a multiple of it.
        if t.dim() == 0 or t.shape[0] % record["n"] or (t.is_leaf and t.requires_grad):
            return t
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in record["seen"]:
            record["seen"].add(key)
            size = storage.nbytes()
            record["bytes"][current[0]] = record["bytes"].get(current[0], 0) + size
            record["largest"] = max(record["largest"], size)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield record
    finally:
        for h in hooks:
            h.remove()


@functools.lru_cache(maxsize=32)
def activation_profile(
    backbone: str,
    projector: str,
    image_size: int,
    dtype: torch.dtype = torch.bfloat16,
    model_size: int | None = None,
) -> ActivationProfile:
    """Count the activations of ``backbone`` + ``projector`` at ``image_size`` px (CPU, a
    batch of :data:`PROFILE_BATCH` under autocast to ``dtype``, or fp32); cached per
    arguments. ``model_size``: the view size the model is built for (its stem), when the
    input is smaller — multi-crop's small crops run through the model of the large views
    (default ``image_size``).

    fp16 runs are counted under bf16: the same bytes per value.
    """
    from lowres_ssl.models import build_model

    with _fork_rng():
        torch.manual_seed(0)
        model = build_model(backbone, projector, image_size=model_size or image_size).train()
    n = PROFILE_BATCH
    x = torch.randn(n, 3, image_size, image_size)
    autocast = dtype in (torch.bfloat16, torch.float16)
    with (
        _counting(model, n) as record,
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
    ):
        model(x).float().sum()
    return ActivationProfile(
        per_stage={k: v / n for k, v in record["bytes"].items()},
        stage_inputs=record["inputs"] / n,
        largest=record["largest"] / n,
    )


@contextmanager
def _fork_rng() -> Iterator[None]:
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)


# ---------------------------------------------------------------------------------------------
# Parameters


@functools.lru_cache(maxsize=32)
def parameter_shapes(backbone: str, projector: str, image_size: int) -> tuple[tuple[int, ...], ...]:
    """Shapes of the model's parameters (built on the meta device: no memory, no time)."""
    from lowres_ssl.models import build_model

    with torch.device("meta"):
        model = build_model(backbone, projector, image_size=image_size)
    return tuple(tuple(p.shape) for p in model.parameters())


def optimizer_bytes(shapes: tuple[tuple[int, ...], ...], name: str, bits: int) -> float:
    """The optimizer's state: LARS one momentum, AdamW two moments, per value."""
    from lowres_ssl.optim import MIN_8BIT_SIZE

    states = 2 if name == "adamw" else 1
    total = 0.0
    for shape in shapes:
        n = math.prod(shape)
        if bits == 8 and n >= MIN_8BIT_SIZE:
            total += states * (n + FLOAT * math.ceil(n / 256))
        else:
            total += states * FLOAT * n
    return total


# ---------------------------------------------------------------------------------------------
# The estimate


@dataclass(frozen=True)
class Setting:
    """What the memory of a step depends on (a config's fields, resolved for a device)."""

    backbone: str = "resnet18"
    projector: str = "2048-2048-8192"
    view_size: int = 32
    load_size: int = 32
    batch_size: int = 256  # per process: the regulariser's batch
    micro_batch_size: int | None = None  # None: the whole batch at once
    processes: int = 1
    mixed: bool = True  # bf16/fp16 autocast (else fp32)
    checkpointing: bool = False
    optimizer: str = "lars"
    state_bits: int = 8
    loss: str = "sfrik"
    mmd_path: str = "auto"
    kernel_degree: int | None = 3
    cached_images: int = 0  # decoded images kept on the GPU
    cuda: bool = True
    large_views: int = 2  # views at view_size (OBoW's whole image included)
    small_views: int = 0  # small crops
    small_size: int = 0  # their side
    regularised_views: int = 2  # the views the objective's batch statistics see
    positive_blocks: int = 2  # SimCLR's (row view, positive view) blocks

    @property
    def views(self) -> int:
        return self.large_views + self.small_views

    @property
    def micro(self) -> int:
        return min(self.micro_batch_size or self.batch_size, self.batch_size)

    @property
    def q(self) -> int:
        from lowres_ssl.models import projector_out_dim

        return projector_out_dim(self.projector)

    @classmethod
    def from_config(
        cls,
        cfg,
        *,
        cuda: bool,
        mixed: bool,
        processes: int = 1,
        cached_images: int = 0,
        micro_batch_size: int | None = None,
    ) -> Setting:
        """The setting of a config (``micro_batch_size`` overrides the config's, e.g. ``auto``)."""
        from lowres_ssl.losses import SFRIKKernel, ViewLayout

        micro = micro_batch_size or cfg.train.micro_batch_size
        degree = None
        loss = cfg.loss.name
        if loss == "sfrik":
            degree = SFRIKKernel(list(cfg.loss.kernel_weights)).degree
        v = cfg.data.views
        crops = v.small
        layout = ViewLayout.of(v.layout, v.large, crops, reg_small=cfg.loss.reg_small)
        return cls(
            backbone=cfg.model.backbone,
            projector=str(cfg.model.projector),
            view_size=cfg.data.view_size,
            load_size=cfg.data.load_size,
            batch_size=cfg.train.batch_size,
            micro_batch_size=micro if isinstance(micro, int) else None,
            processes=processes,
            mixed=mixed,
            checkpointing=cfg.model.grad_checkpointing,
            optimizer=cfg.optim.name,
            state_bits=cfg.optim.state_bits,
            loss=loss,
            mmd_path=cfg.loss.mmd_path,
            kernel_degree=degree,
            cached_images=cached_images,
            cuda=cuda,
            large_views=layout.count - crops,
            small_views=crops,
            small_size=v.small_side(cfg.data.view_size),
            regularised_views=len(layout.regularised),
            positive_blocks=len(layout.positives()),
        )


@dataclass(frozen=True)
class Estimate:
    """The estimated peak of one training step, in bytes per part (see the module doc)."""

    setting: Setting
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    def fits(self, card_gib: float) -> bool:
        return self.total <= HEADROOM * card_gib * GIB

    def lines(self) -> list[str]:
        """The breakdown as aligned text lines, largest part first."""
        s = self.setting
        head = (
            f"estimated peak {self.total_gib:.2f} GiB: {s.backbone} at {s.view_size} px"
            + (f" + {s.small_views} crops of {s.small_size} px" if s.small_views else "")
            + f", batch {s.batch_size}"
            + (f" in micro-batches of {s.micro}" if s.micro < s.batch_size else "")
            + f", q = {s.q:,}, {'mixed precision' if s.mixed else 'fp32'}"
            + (", checkpointing" if s.checkpointing else "")
            + f", {s.state_bits}-bit {s.optimizer}"
        )
        rows = sorted(self.parts.items(), key=lambda kv: -kv[1])
        width = max(len(k) for k in self.parts)
        return [head] + [f"  {k:<{width}}  {v / GIB:7.3f} GiB" for k, v in rows]


def estimate(setting: Setting) -> Estimate:
    """The peak of one training step of ``setting`` (a real step: every view, the loss on the
    global batch, backward, the optimizer with its state)."""
    s = setting
    shapes = parameter_shapes(s.backbone, s.projector, s.view_size)
    n_params = sum(math.prod(shape) for shape in shapes)
    largest_param = max(math.prod(shape) for shape in shapes)
    dtype = torch.bfloat16 if s.mixed else torch.float32
    profile = activation_profile(s.backbone, s.projector, s.view_size, dtype)
    m, batch, q = s.micro, s.batch_size, s.q
    cache = m < batch
    out_bytes = 2 if s.mixed else 4
    parts: dict[str, float] = {
        "weights": FLOAT * n_params,
        "gradients": FLOAT * n_params,
        "optimizer state": optimizer_bytes(shapes, s.optimizer, s.state_bits),
        "optimizer step": 2 * FLOAT * largest_param,
    }
    if s.mixed:
        parts["16-bit weight copies"] = 2 * n_params
    # Every view of a micro-batch is held for one backward; the small crops run in one pass.
    act = s.large_views * m * profile.per_image(s.checkpointing)
    largest = m * profile.largest
    if s.small_views:
        small = activation_profile(
            s.backbone, s.projector, s.small_size, dtype, model_size=s.view_size
        )
        act += s.small_views * m * small.per_image(s.checkpointing)
        largest = max(largest, s.small_views * m * small.largest)
    parts["activations"] = act + 2 * largest
    if not s.cuda:
        # The step runs after backward has freed the activations: the CPU's heap reuses them
        # (measured, docs/benchmarks/presets.md). The caching allocator may not (a large block
        # is not cut from smaller freed ones): on a card both count, until measured there.
        step = parts.pop("optimizer step") - parts["activations"]
        if step > 0:
            parts["optimizer step"] = step
    loss = _objective_bytes(s)
    if cache:
        loss += 2 * s.views * FLOAT * batch * q  # every view's cached embeddings, gradients
    parts["loss"] = loss
    pixels = 3 * s.load_size * s.load_size
    at_once = m if cache else batch
    view_pixels = 3 * (s.large_views * s.view_size**2 + s.small_views * s.small_size**2)
    parts["views"] = (
        batch * pixels  # the uint8 batch
        + at_once * pixels * FLOAT  # its float32 copy for the augmentation
        + at_once * view_pixels * (out_bytes + FLOAT)  # views, float32 work copy
    )
    if s.cuda and s.cached_images:
        parts["image cache"] = s.cached_images * pixels
    dynamic = sum(v for k, v in parts.items() if k != "image cache")
    if s.cuda:
        parts["allocator slack"] = ALLOCATOR_SLACK * dynamic
        parts["CUDA context"] = CUDA_CONTEXT_BYTES
    else:
        parts["heap and oneDNN"] = CPU_SLACK * dynamic + CPU_RUNTIME_BYTES
    return Estimate(s, parts)


def _objective_bytes(s: Setting) -> float:
    """The loss library's memory for the objective on the global batch (every process's)."""
    return loss_bytes(
        s.loss, s.batch_size * s.processes, s.q, mmd_path=s.mmd_path,
        kernel_degree=s.kernel_degree, views=s.views, regularised=s.regularised_views,
        positives=s.positive_blocks,
    )  # fmt: skip


def certain_bytes(setting: Setting) -> float:
    """What a step of ``setting`` holds for certain, without the activations (their profile
    runs the network, which takes seconds): the parameters, their gradients and optimizer
    state, the loss's memory and the views. Below :func:`estimate`'s total; a setting over a
    budget by this alone does not fit it."""
    s = setting
    shapes = parameter_shapes(s.backbone, s.projector, s.view_size)
    n_params = sum(math.prod(shape) for shape in shapes)
    loss = _objective_bytes(s)
    view_pixels = 3 * (s.large_views * s.view_size**2 + s.small_views * s.small_size**2)
    views = s.batch_size * 3 * s.load_size**2 + min(s.micro, s.batch_size) * view_pixels * FLOAT
    return 2 * FLOAT * n_params + optimizer_bytes(shapes, s.optimizer, s.state_bits) + loss + views


def micro_batch_candidates(batch: int) -> list[int]:
    """The micro-batches to try, largest first: the batch, then powers of two below it."""
    out = [batch]
    p = 1 << (batch.bit_length() - 1)
    if p == batch:
        p //= 2
    while p >= 8:
        out.append(p)
        p //= 2
    return out


def fit_micro_batch(setting: Setting, card_gib: float) -> Estimate | None:
    """The largest micro-batch (the batch, then powers of two down to 8) whose estimated peak
    stays within ``HEADROOM`` of ``card_gib``; None when none does."""
    for m in micro_batch_candidates(setting.batch_size):
        est = estimate(dataclasses.replace(setting, micro_batch_size=m))
        if est.fits(card_gib):
            return est
    return None


__all__ = [
    "ALLOCATOR_SLACK",
    "CPU_RUNTIME_BYTES",
    "CPU_SLACK",
    "CUDA_CONTEXT_BYTES",
    "HEADROOM",
    "ActivationProfile",
    "Estimate",
    "Setting",
    "activation_profile",
    "certain_bytes",
    "estimate",
    "fit_micro_batch",
    "loss_bytes",
    "micro_batch_candidates",
    "optimizer_bytes",
    "parameter_shapes",
]
