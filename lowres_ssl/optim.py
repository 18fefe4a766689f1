"""Optimizers (LARS and AdamW, with 8-bit state) and the warm-up + cosine learning-rate schedule.

>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
>>> opt = build_optimizer("lars", model, lr=0.3, weight_decay=1e-6, state_bits=32)
>>> [(g["lars_exclude"], g["lars_weight_decay"]) for g in opt.param_groups]
[(False, 1e-06), (True, 0.0)]

**LARS** exactly as in the code released with the SFRIK paper (Zheng et al., ICLR 2023), which is
VICReg's (``src/vicreg/optim.py`` there). For each parameter ``p`` with gradient ``g``::

    not excluded:  g <- g + wd p                      (decay first ...)
                   q  = eta ||p|| / ||g||             (... then the trust ratio; q = 1 where
                   g <- q g                            ||p|| = 0 or ||g|| = 0)
    excluded:      g unchanged                        (biases, normalisation weights: ndim <= 1)
    mu <- momentum mu + g                             (mu starts at 0, so the first mu is g)
    p  <- p - lr mu

Note the order: the decay is added *before* the trust ratio, so the modified gradient of a
non-excluded parameter always has norm ``eta ||p||``, decay included (adding the decay after the
trust ratio would let it escape the normalisation).

Both LARS classes compute the modified gradient in place in ``p.grad`` (no copy of the gradient
is kept: this matters for 285M-parameter projectors on 8 GB cards) and then hand over to plain
momentum SGD underneath: :class:`LARS` to ``torch.optim.SGD`` (32-bit state), ``LARS8bit`` to
``bitsandbytes.optim.SGD8bit`` (8-bit blockwise-quantised ``mu``). **After** ``step()``,
``p.grad`` holds the LARS-scaled gradient, not the raw one: clip or log gradients before the step.

Why not ``bitsandbytes.optim.LARS8bit``, and which properties of bitsandbytes' 8-bit SGD this
relies on (no dampening, 8-bit state only for tensors of at least 4096 values): see
``docs/design.md`` §5.

**AdamW**: ``bitsandbytes.optim.AdamW8bit`` or ``torch.optim.AdamW``, with no decay on biases and
normalisation weights (parameter groups, the same ``ndim <= 1`` rule).

**Fallback**: where bitsandbytes cannot run (its import raises, or a one-off probe update on the
training device raises), :func:`build_optimizer` returns the 32-bit torch optimizer with the same
math and one :class:`StateFallbackWarning`.

**Schedule** (:class:`CosineSchedule`), VICReg's ``adjust_learning_rate``::

    peak = base_lr * batch_size / 256                       (scaled_lr)
    lr(s) = peak * s / W                                    0 <= s < W   (from 0: lr(0) = 0)
    lr(s) = floor + (peak - floor) (1 + cos(pi t)) / 2      t = (s - W) / (T - W),  W <= s < T
    lr(s) = floor = peak * final_lr_ratio                   s >= T
"""

from __future__ import annotations

import functools
import importlib
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from lowres_ssl.device import canonical_device
from lowres_ssl.errors import UserError

__all__ = [
    "LARS",
    "OPTIMIZERS",
    "SFRIK_RESNET18",
    "ChannelsLastKept",
    "CosineSchedule",
    "OptimDefaults",
    "OptimizerSpec",
    "StateFallbackWarning",
    "build_optimizer",
    "is_excluded",
    "lars_scale_grad_",
    "parameter_groups",
    "scaled_lr",
    "warmup_steps_for",
]

ParamsLike = nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]]

# bitsandbytes keeps fp32 state below this many elements (its default, optim/optimizer.py:674).
MIN_8BIT_SIZE = 4096


@dataclass(frozen=True)
class OptimDefaults:
    """Optimisation hyper-parameters of SFRIK's ResNet-18 recipe (LARS, VICReg's schedule).

    ``base_lr`` is per 256 images: the peak learning rate is ``base_lr * batch_size / 256``.
    ``max_warmup_fraction`` is this kit's own cap for short runs (see :func:`warmup_steps_for`).
    """

    optimizer: str = "lars"
    base_lr: float = 1.2
    reference_batch_size: int = 256
    momentum: float = 0.9
    eta: float = 0.001
    weight_decay: float = 1e-6
    warmup_epochs: float = 10.0
    final_lr_ratio: float = 0.001
    max_warmup_fraction: float = 0.1


SFRIK_RESNET18 = OptimDefaults()


class StateFallbackWarning(UserWarning):
    """bitsandbytes cannot run here; the optimizer keeps 32-bit state instead of 8-bit."""


def is_excluded(p: torch.Tensor) -> bool:
    """Whether ``p`` is a bias or a normalisation weight (``p.ndim <= 1``): no decay, no LARS."""
    return p.ndim <= 1


def parameter_groups(model: nn.Module | Iterable[torch.Tensor], weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group and an excluded (``ndim <= 1``) group.

    Returns ``[{"params", "weight_decay": wd, "lars_exclude": False},
    {"params", "weight_decay": 0.0, "lars_exclude": True}]``, leaving out an empty group and
    parameters with ``requires_grad=False``. The group order is fixed (decayed first), so a
    checkpoint's optimizer state maps back onto the same model.
    """
    params = model.parameters() if isinstance(model, nn.Module) else model
    decayed: list[torch.Tensor] = []
    excluded: list[torch.Tensor] = []
    seen: set[int] = set()
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise UserError(f"parameters must be tensors, got {type(p).__name__}")
        # A tensor listed twice (tied weights) must be optimised once.
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (excluded if is_excluded(p) else decayed).append(p)
    groups = []
    if decayed:
        groups.append({"params": decayed, "weight_decay": weight_decay, "lars_exclude": False})
    if excluded:
        groups.append({"params": excluded, "weight_decay": 0.0, "lars_exclude": True})
    if not groups:
        raise UserError("the model has no trainable parameters (all have requires_grad=False)")
    return groups


# ---------------------------------------------------------------------------------------------
# LARS
# ---------------------------------------------------------------------------------------------


def _unhooked(step: Callable) -> Callable:
    """``step`` without the hook runner torch wraps around each optimizer class's ``step``.

    ``Optimizer._patch_step_function`` wraps ``type(opt).step`` once (marked ``hooked``); our own
    ``step`` is wrapped too, so calling the wrapped parent ``step`` from it would run every
    registered step hook twice.
    """
    if getattr(step, "hooked", False):
        return step.__wrapped__  # type: ignore[attr-defined]
    return step


def _check_lars_values(lr: float, momentum: float, weight_decay: float, eta: float) -> None:
    if not (math.isfinite(lr) and lr >= 0):
        raise UserError(f"LARS learning rate must be a finite number >= 0, got {lr}")
    if not 0 <= momentum < 1:
        raise UserError(f"LARS momentum must be in [0, 1), got {momentum}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise UserError(f"LARS weight_decay must be a finite number >= 0, got {weight_decay}")
    if not (math.isfinite(eta) and eta > 0):
        raise UserError(f"LARS eta (trust coefficient) must be a finite number > 0, got {eta}")


@torch.no_grad()
def lars_scale_grad_(p: torch.Tensor, grad: torch.Tensor, weight_decay: float, eta: float) -> None:
    """In place: ``grad <- q (grad + wd p)`` with ``q = eta ||p|| / ||grad + wd p||``.

    ``q = 1`` where ``||p|| = 0`` or ``||grad + wd p|| = 0``. The norms stay on the device
    (``torch.where``, no ``.item()``): no host synchronisation per parameter. They are taken in
    fp32 whatever the gradient's dtype, so an fp16 sum of squares cannot overflow.
    """
    if weight_decay != 0.0:
        grad.add_(p, alpha=weight_decay)
    p_norm = torch.linalg.vector_norm(p, dtype=torch.float32)
    g_norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
    q = torch.where((p_norm > 0) & (g_norm > 0), eta * p_norm / g_norm, torch.ones_like(p_norm))
    grad.mul_(q.to(grad.dtype))


class _LarsMixin:
    """LARS on top of a momentum-SGD optimizer class ``_inner`` (``mu = m mu + g``, ``p -= lr mu``).

    Parameter-group keys (all visible, all saved by ``state_dict``)::

        lr                 read by the inner optimizer at every step: a scheduler may set it
        momentum           m (copied into bitsandbytes' ``betas`` before each 8-bit step)
        lars_weight_decay  wd, applied here; the inner optimizer's own ``weight_decay`` stays 0
        eta                trust coefficient
        lars_exclude       True / False for the whole group, or None: each parameter by ndim <= 1

    A group passed in with ``weight_decay`` (as :func:`parameter_groups` makes them) has it moved
    to ``lars_weight_decay``.
    """

    _inner: type[torch.optim.Optimizer]
    _lars_defaults: dict[str, Any]
    param_groups: list[dict[str, Any]]

    def _sync_inner_keys(self, group: dict[str, Any]) -> None:
        """Copy LARS keys into the inner optimizer's spelling of them (nothing for torch SGD)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        if "lars_weight_decay" not in group:
            group["lars_weight_decay"] = group.get(
                "weight_decay", self._lars_defaults["lars_weight_decay"]
            )
        elif group.get("weight_decay", 0.0) != 0.0:
            raise UserError(
                "a LARS parameter group has both weight_decay and lars_weight_decay; give only one"
            )
        # The inner optimizer would add its decay after our trust ratio: it must never apply one.
        group["weight_decay"] = 0.0
        for key in ("momentum", "eta", "lars_exclude"):
            group.setdefault(key, self._lars_defaults[key])
        _check_lars_values(
            group.get("lr", 0.0), group["momentum"], group["lars_weight_decay"], group["eta"]
        )
        self._sync_inner_keys(group)
        super().add_param_group(group)  # type: ignore[misc]

    @torch.no_grad()
    def _lars_prepare(self) -> None:
        """Turn every ``p.grad`` into LARS's modified gradient, in place."""
        for group in self.param_groups:
            if group["weight_decay"] != 0.0:
                raise UserError(
                    "LARS takes its decay from param_group['lars_weight_decay']; "
                    "param_group['weight_decay'] must stay 0"
                )
            self._sync_inner_keys(group)
            flag = group["lars_exclude"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise UserError("LARS does not support sparse gradients")
                excluded = is_excluded(p) if flag is None else bool(flag)
                if not excluded:
                    lars_scale_grad_(p, p.grad, group["lars_weight_decay"], group["eta"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One LARS step. Overwrites each ``p.grad`` with the LARS-modified gradient."""
        loss = None
        if closure is not None:
            # Gradients must exist before they are rescaled, so the closure runs first here.
            with torch.enable_grad():
                loss = closure()
        self._lars_prepare()
        _unhooked(self._inner.step)(self)
        return loss


def _lars_defaults(
    momentum: float, weight_decay: float, eta: float, lars_exclude: bool | None
) -> dict[str, Any]:
    return {
        "momentum": momentum,
        "lars_weight_decay": weight_decay,
        "eta": eta,
        "lars_exclude": lars_exclude,
    }


class LARS(_LarsMixin, torch.optim.SGD):
    """LARS with fp32 momentum: the LARS gradient, then ``torch.optim.SGD`` (dampening 0).

    See the module docstring for the update. ``lars_exclude=None`` (default) decides per
    parameter (``ndim <= 1`` excluded); True/False applies to every parameter of a group.
    """

    _inner = torch.optim.SGD

    def __init__(
        self,
        params: ParamsLike,
        lr: float,
        *,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        lars_exclude: bool | None = None,
    ) -> None:
        _check_lars_values(lr, momentum, weight_decay, eta)
        self._lars_defaults = _lars_defaults(momentum, weight_decay, eta, lars_exclude)
        torch.optim.SGD.__init__(
            self, params, lr=lr, momentum=momentum, dampening=0.0, weight_decay=0.0
        )
        self.defaults.update(self._lars_defaults)
        self.description = "LARS (32-bit momentum, torch.optim.SGD)"


@functools.cache
def _make_lars8bit(sgd8bit: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """Build the 8-bit LARS class on top of bitsandbytes' ``SGD8bit`` (imported lazily)."""

    class LARS8bit(_LarsMixin, sgd8bit):  # type: ignore[valid-type, misc]
        """LARS with 8-bit momentum: the LARS gradient, then ``bitsandbytes.optim.SGD8bit``.

        ``mu`` is stored blockwise-quantised (uint8 + one fp32 absmax per 256 values) for
        parameters with at least ``min_8bit_size`` elements, fp32 below. Each step dequantises
        ``mu``, updates ``p`` with the fp32 ``m mu + g`` and re-quantises it.
        """

        _inner = sgd8bit

        def __init__(
            self,
            params: ParamsLike,
            lr: float,
            *,
            momentum: float = 0.9,
            weight_decay: float = 0.0,
            eta: float = 0.001,
            lars_exclude: bool | None = None,
            min_8bit_size: int = MIN_8BIT_SIZE,
        ) -> None:
            _check_lars_values(lr, momentum, weight_decay, eta)
            if momentum == 0:
                # SGD8bit refuses momentum 0 (optim/sgd.py:92-93).
                raise UserError("8-bit LARS needs momentum > 0; use state_bits=32 for momentum 0")
            self._lars_defaults = _lars_defaults(momentum, weight_decay, eta, lars_exclude)
            sgd8bit.__init__(
                self,
                params,
                lr=lr,
                momentum=momentum,
                dampening=0.0,
                weight_decay=0.0,
                min_8bit_size=min_8bit_size,
            )
            self.defaults.update(self._lars_defaults)
            self.description = "LARS (8-bit momentum, bitsandbytes SGD8bit)"

        def _sync_inner_keys(self, group: dict[str, Any]) -> None:
            # bitsandbytes reads momentum from betas[0]; betas[1] (dampening) must stay 0.
            group["betas"] = (group["momentum"], 0.0)

    LARS8bit.__module__ = __name__
    LARS8bit.__qualname__ = "LARS8bit"
    return LARS8bit


class ChannelsLastKept:
    """Keeps ``optimizer``'s channels_last weights in that layout across its steps.

    bitsandbytes' 8-bit update runs ``p.data = p.data.contiguous()`` (and the same for the
    gradient) on every step, since its kernels read flat memory: a ``channels_last`` conv weight
    leaves that layout at the first step, and the 8-bit and 32-bit optimizers would then train
    the same model in two layouts. Hooked to the optimizer's step (torch's pre- and post-step
    hooks): the 4-D parameters that are channels_last at the first step are put back after
    every step, one copy each (``docs/benchmarks/layout.md`` measures the choice).
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.params: list[torch.Tensor] | None = None
        optimizer.register_step_pre_hook(self.before_step)
        optimizer.register_step_post_hook(self.after_step)

    @staticmethod
    def _channels_last(p: torch.Tensor) -> bool:
        return (
            p.dim() == 4
            and p.is_contiguous(memory_format=torch.channels_last)
            and not p.is_contiguous()
        )

    def before_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        if self.params is None:
            params = (p for g in optimizer.param_groups for p in g["params"])
            self.params = [p for p in params if self._channels_last(p)]

    def after_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        for p in self.params or ():
            if not p.is_contiguous(memory_format=torch.channels_last):
                p.data = p.data.contiguous(memory_format=torch.channels_last)


def _import_bitsandbytes() -> ModuleType:
    """Import bitsandbytes (raises whatever its import raises: ImportError, RuntimeError, ...)."""
    return importlib.import_module("bitsandbytes")


def __getattr__(name: str) -> Any:
    # ``lowres_ssl.optim.LARS8bit`` imports bitsandbytes only when asked for.
    if name == "LARS8bit":
        return _make_lars8bit(_import_bitsandbytes().optim.SGD8bit)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Hyper:
    lr: float
    weight_decay: float
    momentum: float
    eta: float
    betas: tuple[float, float]
    eps: float


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one optimizer: 32-bit on torch, 8-bit on bitsandbytes, and what to probe.

    ``make_probe(bnb, params)`` builds the plain bitsandbytes optimizer whose first update shows
    whether bitsandbytes runs on a device; probing bitsandbytes' own class (not ours) keeps a bug
    of ours from being mistaken for a missing bitsandbytes build.
    """

    torch_name: str
    build_32bit: Callable[[list[dict], _Hyper], torch.optim.Optimizer]
    build_8bit: Callable[[ModuleType, list[dict], _Hyper], torch.optim.Optimizer]
    make_probe: Callable[[ModuleType, list[torch.Tensor]], torch.optim.Optimizer]


def _lars_32bit(groups: list[dict], hp: _Hyper) -> torch.optim.Optimizer:
    return LARS(groups, hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, eta=hp.eta)


def _lars_8bit(bnb: ModuleType, groups: list[dict], hp: _Hyper) -> torch.optim.Optimizer:
    cls = _make_lars8bit(bnb.optim.SGD8bit)
    return cls(groups, hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, eta=hp.eta)


def _adamw_32bit(groups: list[dict], hp: _Hyper) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(
        groups, lr=hp.lr, betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay
    )
    opt.description = "AdamW (32-bit state, torch.optim.AdamW)"  # type: ignore[attr-defined]
    return opt


def _adamw_8bit(bnb: ModuleType, groups: list[dict], hp: _Hyper) -> torch.optim.Optimizer:
    opt = bnb.optim.AdamW8bit(
        groups, lr=hp.lr, betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay
    )
    opt.description = "AdamW (8-bit state, bitsandbytes AdamW8bit)"
    return opt


def _sgd_32bit(groups: list[dict], hp: _Hyper) -> torch.optim.Optimizer:
    opt = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    opt.description = "SGD with momentum (32-bit state, torch.optim.SGD)"  # type: ignore[attr-defined]
    return opt


def _sgd_8bit(bnb: ModuleType, groups: list[dict], hp: _Hyper) -> torch.optim.Optimizer:
    opt = bnb.optim.SGD8bit(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    opt.description = "SGD with momentum (8-bit momentum, bitsandbytes SGD8bit)"
    return opt


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "lars": OptimizerSpec(
        torch_name="LARS on torch.optim.SGD",
        build_32bit=_lars_32bit,
        build_8bit=_lars_8bit,
        make_probe=lambda bnb, params: bnb.optim.SGD8bit(params, lr=0.1, momentum=0.9),
    ),
    "adamw": OptimizerSpec(
        torch_name="torch.optim.AdamW",
        build_32bit=_adamw_32bit,
        build_8bit=_adamw_8bit,
        make_probe=lambda bnb, params: bnb.optim.AdamW8bit(params, lr=0.1),
    ),
    # Plain momentum SGD: the supervised fine-tuning recipe (no trust ratio on a new head).
    "sgd": OptimizerSpec(
        torch_name="torch.optim.SGD",
        build_32bit=_sgd_32bit,
        build_8bit=_sgd_8bit,
        make_probe=lambda bnb, params: bnb.optim.SGD8bit(params, lr=0.1, momentum=0.9),
    ),
}

# (optimizer name, device) pairs whose bitsandbytes probe passed: probe once per process.
_PROBED_OK: set[tuple[str, str]] = set()


def _probe_devices(params: list[torch.Tensor]) -> list[torch.device]:
    """Devices the 8-bit state will live on.

    The trainer builds the optimizer before Accelerate moves the model to the GPU, so CPU
    parameters on a machine with CUDA are probed on the current CUDA device too.
    """
    devices = {canonical_device(p.device) for p in params}
    if torch.cuda.is_available() and all(d.type == "cpu" for d in devices):
        devices.add(canonical_device("cuda"))
    return sorted(devices, key=str)


def _probe_bitsandbytes(name: str, bnb: ModuleType, devices: list[torch.device]) -> None:
    """One 8-bit update of a dummy tensor per device: raises where bitsandbytes cannot run."""
    for device in devices:
        key = (name, str(device))
        if key in _PROBED_OK:
            continue
        p = torch.zeros(MIN_8BIT_SIZE, device=device, requires_grad=True)
        p.grad = torch.full_like(p, 1e-3)
        opt = OPTIMIZERS[name].make_probe(bnb, [p])
        opt.step()
        if opt.state[p]["state1"].dtype != torch.uint8 or not bool(torch.isfinite(p).all()):
            raise RuntimeError(
                f"the 8-bit update on {device} gave no 8-bit state or non-finite values"
            )
        _PROBED_OK.add(key)


def _groups_from(model_or_params: ParamsLike, weight_decay: float) -> list[dict]:
    if isinstance(model_or_params, nn.Module):
        return parameter_groups(model_or_params, weight_decay)
    items = list(model_or_params)
    if items and all(isinstance(x, dict) for x in items):
        # Caller-made groups are kept as given (copied, so the caller's dicts stay untouched).
        return [dict(g, params=list(g["params"])) for g in items]
    return parameter_groups(items, weight_decay)


def _check_values(hp: _Hyper, state_bits: int) -> None:
    if not (math.isfinite(hp.lr) and hp.lr >= 0):
        raise UserError(f"learning rate must be a finite number >= 0, got {hp.lr}")
    if not (math.isfinite(hp.weight_decay) and hp.weight_decay >= 0):
        raise UserError(f"weight_decay must be a finite number >= 0, got {hp.weight_decay}")
    if not 0 <= hp.momentum < 1:
        raise UserError(f"momentum must be in [0, 1), got {hp.momentum}")
    if not (math.isfinite(hp.eta) and hp.eta > 0):
        raise UserError(f"eta must be a finite number > 0, got {hp.eta}")
    if len(hp.betas) != 2 or not all(0 <= b < 1 for b in hp.betas):
        raise UserError(f"betas must be two numbers in [0, 1), got {hp.betas}")
    if not (math.isfinite(hp.eps) and hp.eps > 0):
        raise UserError(f"eps must be a finite number > 0, got {hp.eps}")
    if state_bits not in (8, 32):
        raise UserError(f"state_bits must be 8 or 32, got {state_bits}")


def build_optimizer(
    name: str,
    model_or_params: ParamsLike,
    *,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    eta: float = 0.001,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    state_bits: int = 8,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (``lars``, ``adamw`` or ``sgd``) over a model or parameters.

    A module or a list of tensors is split by :func:`parameter_groups` (no decay and, for LARS,
    no trust ratio on ``ndim <= 1`` parameters); a list of group dicts is used as given.
    ``momentum`` and ``eta`` are LARS's, ``betas`` and ``eps`` AdamW's. ``state_bits=8`` keeps
    the optimizer state in bitsandbytes' 8-bit blockwise format; where bitsandbytes cannot run,
    the 32-bit torch optimizer is returned with one :class:`StateFallbackWarning`.
    ``state_bits=32`` always uses torch. The result has a ``description`` string for logs.
    """
    key = str(name).strip().lower()
    if key not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    hp = _Hyper(
        float(lr), float(weight_decay), float(momentum), float(eta), tuple(betas), float(eps)
    )
    _check_values(hp, state_bits)
    spec = OPTIMIZERS[key]
    groups = _groups_from(model_or_params, hp.weight_decay)
    if state_bits == 32:
        return spec.build_32bit(groups, hp)
    if key in ("lars", "sgd") and hp.momentum == 0:
        raise UserError(f"8-bit {key.upper()} needs momentum > 0; use state_bits=32 for momentum 0")
    params = [p for g in groups for p in g["params"]]
    try:
        bnb = _import_bitsandbytes()
        _probe_bitsandbytes(key, bnb, _probe_devices(params))
    except Exception as err:  # any failure of a foreign native library means "cannot run here"
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        warnings.warn(
            f"bitsandbytes cannot run here ({reason}); using {spec.torch_name} with 32-bit "
            "optimizer state (4 bytes per state value instead of 1)",
            StateFallbackWarning,
            stacklevel=2,
        )
        opt = spec.build_32bit(groups, hp)
        opt.description += " — bitsandbytes unavailable"  # type: ignore[attr-defined]
        return opt
    opt = spec.build_8bit(bnb, groups, hp)
    ChannelsLastKept(opt)
    return opt


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------------------------


def scaled_lr(base_lr: float, batch_size: int, reference_batch_size: int = 256) -> float:
    """The linear scaling rule: ``peak_lr = base_lr * batch_size / reference_batch_size``."""
    if batch_size <= 0 or reference_batch_size <= 0:
        raise UserError(f"batch sizes must be > 0, got {batch_size} and {reference_batch_size}")
    return base_lr * batch_size / reference_batch_size


def warmup_steps_for(
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float = 10,
    max_fraction: float = SFRIK_RESNET18.max_warmup_fraction,
) -> int:
    """Warm-up length in steps: ``min(round(warmup_epochs * steps_per_epoch), floor(max_fraction
    * total_steps))``.

    Why the cap at 10 % of the run: the recipe's 10 warm-up epochs were set for long runs (10 % of
    a 100-epoch run, 1 % of VICReg's 1000 epochs); a 20-epoch run on a small GPU would spend half
    its steps warming up and barely reach the cosine part. 10 % is the largest warm-up fraction
    of those recipes, so runs of >= 100 epochs get the recipe unchanged and shorter runs keep its
    shape. The result is always < ``total_steps`` (0 for runs under 10 steps).
    """
    if total_steps <= 0 or steps_per_epoch <= 0:
        raise UserError(
            f"total_steps and steps_per_epoch must be > 0, got {total_steps} and {steps_per_epoch}"
        )
    if warmup_epochs < 0 or not 0 <= max_fraction < 1:
        raise UserError(
            f"warmup_epochs must be >= 0 and max_fraction in [0, 1), "
            f"got {warmup_epochs} and {max_fraction}"
        )
    return min(round(warmup_epochs * steps_per_epoch), math.floor(max_fraction * total_steps))


class CosineSchedule:
    """Linear warm-up from 0 to ``peak_lr``, then cosine decay to ``peak_lr * final_lr_ratio``.

    With ``W = warmup_steps``, ``T = total_steps``, ``floor = peak_lr * final_lr_ratio``::

        lr(s) = peak_lr * s / W                                      0 <= s < W
        lr(s) = floor + (peak_lr - floor) * (1 + cos(pi t)) / 2      W <= s < T, t = (s-W)/(T-W)
        lr(s) = floor                                                s >= T

    As in VICReg's ``adjust_learning_rate``: the warm-up starts at exactly 0, so the first step
    (``s = 0``) moves nothing (LARS still fills its momentum), ``lr(W) = peak_lr``, and the cosine
    reaches the floor at ``s = T``. ``s`` counts optimizer steps from 0.
    """

    def __init__(
        self,
        peak_lr: float,
        total_steps: int,
        warmup_steps: int,
        final_lr_ratio: float = SFRIK_RESNET18.final_lr_ratio,
    ) -> None:
        if not (math.isfinite(peak_lr) and peak_lr >= 0):
            raise UserError(f"peak learning rate must be a finite number >= 0, got {peak_lr}")
        if total_steps <= 0:
            raise UserError(f"total_steps must be > 0, got {total_steps}")
        if not 0 <= warmup_steps < total_steps:
            raise UserError(
                f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}"
            )
        if not 0 <= final_lr_ratio <= 1:
            raise UserError(f"final_lr_ratio must be in [0, 1], got {final_lr_ratio}")
        self.peak_lr = float(peak_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.final_lr_ratio = float(final_lr_ratio)
        self.floor_lr = self.peak_lr * self.final_lr_ratio

    def __call__(self, step: int) -> float:
        """The learning rate for optimizer step ``step`` (0-based)."""
        if step < 0:
            raise UserError(f"schedule step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return self.peak_lr * step / self.warmup_steps
        if step >= self.total_steps:
            return self.floor_lr
        t = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.floor_lr + (self.peak_lr - self.floor_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set ``group["lr"] = lr(step) * group.get("lr_scale", 1)`` in every group; return lr."""
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def __repr__(self) -> str:
        return (
            f"CosineSchedule(peak_lr={self.peak_lr}, total_steps={self.total_steps}, "
            f"warmup_steps={self.warmup_steps}, final_lr_ratio={self.final_lr_ratio})"
        )
