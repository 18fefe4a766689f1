"""Backbones from timm and torchvision: ``timm/<name>`` and ``torchvision/<name>``.

>>> net = LibraryBackbone("timm/convnext_atto", image_size=96)
>>> net(torch.randn(2, 3, 96, 96)).shape
torch.Size([2, 320])

The library's own model is ``net.net``, without its classifier (timm: ``num_classes=0``, the
pooled features; torchvision: its last ``Linear`` replaced by ``nn.Identity``). The backbone's
state dict has the library's own keys (no ``net.`` prefix: hooks strip it on save and add it
on load), so checkpoints, exports and ``--init`` files all speak the library's keys, and an
export loads into the library's constructor with ``strict=True``. What small-card training
needs is added around the model, not into it:

- **Gradient checkpointing** recomputes each stage in backward. A model without BatchNorm uses
  timm's own (``set_grad_checkpointing``); a model with BatchNorm, and every torchvision model,
  uses ours, which freezes the BatchNorm running statistics during the recomputation — timm's
  own folds each batch into them twice (a test shows it).
- **Small images**: a model whose stem would shrink 32–64 px views to nothing is changed the
  way its library allows, and the change is recorded (``kwargs`` and ``cifar_stem``) so the
  export rebuilds with it: ResNet-like models (timm and torchvision) get a stride-1 first
  convolution and no max-pool up to 64 px (the weights keep their shapes); timm ViTs take the
  view size (``img_size``, ``dynamic_img_size`` for multi-crop's smaller views) and a smaller
  patch where fewer than 6 × 6 patches would remain. Any other model whose last feature map
  is under 2 × 2 at the view size (ConvNeXt, EfficientNet, MobileNet, RegNet below 64 px:
  they divide the side by 32, and timm's ``patch_size`` of ConvNeXt moves that stride into
  the first stage rather than removing it) is a one-line error naming the smallest size.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lowres_ssl.errors import UserError
from lowres_ssl.models.batchnorm import has_batchnorm, recompute_contexts
from lowres_ssl.small_images import SMALL_MAX

LIBRARIES = ("timm", "torchvision")

#: The fewest patches per side a ViT keeps at its view size (else its patch shrinks).
MIN_VIT_GRID = 6

#: The smallest last feature map (per side) a convolutional backbone may leave.
MIN_FEATURE_SIDE = 2

#: Containers whose children are a model's stages, in the order they are looked for.
_STAGE_CONTAINERS = ("stages", "blocks", "layers", "features", "trunk_output", "encoder.layers")
_STAGE_SETS = (("layer1", "layer2", "layer3", "layer4"), ("s1", "s2", "s3", "s4"))


def split_name(name: str) -> tuple[str | None, str]:
    """(library, model name) of a backbone name; library None for the built-in ResNets."""
    library, sep, model = name.partition("/")
    if sep and library in LIBRARIES:
        return library, model
    return None, name


def is_library_name(name: str) -> bool:
    return split_name(name)[0] is not None


def _need_timm() -> Any:
    if importlib.util.find_spec("timm") is None:
        raise UserError(
            "timm backbones need the timm package: pip install -e '.[timm]' "
            "(or pip install 'timm>=1.0,<2')"
        )
    import timm

    return timm


def check_name(name: str) -> None:
    """A one-line error when ``name`` names no model of its library (or the library is
    missing); builds nothing."""
    library, model = split_name(name)
    if library == "timm":
        timm = _need_timm()
        if not timm.is_model(model):
            close = timm.list_models(f"*{model.split('_')[0]}*")[:6]
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise UserError(
                f"model.backbone {name!r}: timm has no model {model!r}{hint} "
                "(timm.list_models() lists them)"
            )
    elif library == "torchvision":
        from torchvision import models as tv_models

        if model not in tv_models.list_models(module=tv_models):
            raise UserError(
                f"model.backbone {name!r}: torchvision has no classification model {model!r} "
                "(torchvision.models.list_models() lists them)"
            )
        if model.startswith(("vit_", "swin_", "maxvit")):
            raise UserError(
                f"model.backbone {name!r}: torchvision's transformers take one fixed image "
                "size, which multi-crop's smaller views break; use the timm model "
                "(e.g. timm/vit_small_patch16_224), which takes any size"
            )


def find_stages(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The units gradient checkpointing recomputes one at a time: the children of a model's
    stage container (timm's ``stages``/``blocks``, torchvision's ``features``, …) or its
    ``layer1``…``layer4``."""
    for names in _STAGE_SETS:
        if all(isinstance(getattr(net, n, None), nn.Module) for n in names):
            return [(n, getattr(net, n)) for n in names]
    for path in _STAGE_CONTAINERS:
        try:
            container = net.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(container, nn.Sequential | nn.ModuleList) and len(container) > 0:
            return [(f"{path}.{i}", m) for i, m in enumerate(container)]
    return []


class _CheckpointedForward:
    """A stage's ``forward``, recomputed in backward while its owner asks for it (only in
    train mode with grad enabled); the recomputation leaves BatchNorm statistics alone. Set
    as the stage's instance attribute, so its parameters keep their names."""

    def __init__(self, owner: LibraryBackbone, stage: nn.Module):
        self.owner, self.stage = owner, stage

    def __call__(self, *args, **kwargs):
        stage, plain = self.stage, functools.partial(type(self.stage).forward, self.stage)
        if not (self.owner.grad_checkpointing and stage.training and torch.is_grad_enabled()):
            return plain(*args, **kwargs)
        return checkpoint(
            plain, *args, use_reentrant=False,
            context_fn=functools.partial(recompute_contexts, stage), **kwargs,
        )  # fmt: skip


def _timm_model(model: str, image_size: int, kwargs: dict[str, Any]) -> tuple[nn.Module, dict]:
    """timm's model without its classifier, with the small-image arguments it needs."""
    timm = _need_timm()
    kwargs = dict(kwargs)
    with torch.device("meta"):
        probe = timm.create_model(model, pretrained=False, num_classes=0, **kwargs)
    params = inspect.signature(type(probe).__init__).parameters
    if hasattr(probe, "patch_embed") and "img_size" in params and "img_size" not in kwargs:
        patch = probe.patch_embed.patch_size
        patch = patch[0] if isinstance(patch, tuple | list) else int(patch)
        kwargs["img_size"] = image_size
        if "dynamic_img_size" in params:
            kwargs["dynamic_img_size"] = True
        if image_size // patch < MIN_VIT_GRID:
            kwargs["patch_size"] = max(1, image_size // 8)
    net = timm.create_model(model, pretrained=False, num_classes=0, **kwargs)
    return net, kwargs


def _torchvision_model(model: str, kwargs: dict[str, Any]) -> tuple[nn.Module, str]:
    """torchvision's model with its last Linear (the classifier) replaced by nn.Identity;
    (model, the head's path)."""
    from torchvision import models as tv_models

    net = tv_models.get_model(model, weights=None, **kwargs)
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"model.backbone torchvision/{model}: it has no classifier to remove")
    head, _ = linears[-1]
    net.set_submodule(head, nn.Identity())
    for m in net.modules():  # the classifier's dropout is no part of a representation
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return net, head


def _small_stem(net: nn.Module) -> bool:
    """A stride-1 first convolution and no max-pool for a ResNet-like model (``conv1`` and
    ``maxpool``); the weights keep their shapes. Whether the model is one."""
    conv1, pool = getattr(net, "conv1", None), getattr(net, "maxpool", None)
    if conv1 is None or not isinstance(pool, nn.MaxPool2d):
        return False
    first = conv1 if isinstance(conv1, nn.Conv2d) else next(
        (m for m in conv1.modules() if isinstance(m, nn.Conv2d)), None
    )  # fmt: skip
    if first is None:
        return False
    first.stride = (1, 1)
    net.maxpool = nn.Identity()
    return True


def _library_keys(module, state, prefix, local_metadata) -> None:
    """State-dict hook: ``<prefix>net.<key>`` → ``<prefix><key>``, the library's own keys."""
    inner = prefix + "net."
    for key in [k for k in state if k.startswith(inner)]:
        state[prefix + key[len(inner) :]] = state.pop(key)


def _wrapped_keys(module, state, prefix, *args) -> None:
    """Load pre-hook: the library's keys back under ``net.``."""
    inner = prefix + "net."
    for key in [k for k in state if k.startswith(prefix) and not k.startswith(inner)]:
        state[inner + key[len(prefix) :]] = state.pop(key)


class LibraryBackbone(nn.Module):
    """A timm or torchvision model as a backbone: images (B, 3, H, W) → features (B, out_dim).

    Args:
        name: ``timm/<model>`` or ``torchvision/<model>``.
        image_size: the view size the model is built for (the small-image rules above).
        grad_checkpointing: recompute each stage in backward (may be switched later).
        cifar_stem: force the stride-1 stem of ResNet-like models (a saved backbone keeps
            the stem it was trained with); None chooses by ``image_size``.
        kwargs: the library constructor's arguments (a saved backbone's, to rebuild it).

    Attributes:
        library, model: ``timm``/``torchvision`` and the library's model name.
        kwargs: the constructor arguments used (those passed and those the size rules set).
        head: the torchvision classifier's path that was removed (timm: its own
            ``pretrained_cfg['classifier']``), whose keys a full library state dict carries.
        stage_names: the checkpointed units.
        min_image_size: the smallest input side that leaves a usable feature map.
    """

    def __init__(
        self,
        name: str,
        *,
        image_size: int,
        grad_checkpointing: bool = False,
        cifar_stem: bool | None = None,
        kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        library, model = split_name(name)
        if library is None:
            raise UserError(f"{name!r} is not a timm/… or torchvision/… backbone")
        check_name(name)
        self.name, self.library, self.model = name, library, model
        if library == "timm":
            net, self.kwargs = _timm_model(model, image_size, kwargs or {})
            self.head = net.pretrained_cfg.get("classifier") or "head"
        else:
            self.kwargs = dict(kwargs or {})
            net, self.head = _torchvision_model(model, self.kwargs)
        small = image_size <= SMALL_MAX if cifar_stem is None else bool(cifar_stem)
        self.cifar_stem: bool = small and _small_stem(net)
        self.net = net
        self.register_state_dict_post_hook(_library_keys)
        self.register_load_state_dict_pre_hook(_wrapped_keys)
        stages = find_stages(net)
        self.stage_names = [n for n, _ in stages]
        self._own_checkpointing = (
            library == "timm" and not has_batchnorm(net) and hasattr(net, "set_grad_checkpointing")
        )
        if not self._own_checkpointing:
            for _, stage in stages:
                stage.forward = _CheckpointedForward(self, stage)
        self._grad_checkpointing = False
        self.grad_checkpointing = grad_checkpointing
        self.out_dim, side = self._probe(image_size)
        patch = getattr(getattr(net, "patch_embed", None), "patch_size", None)
        if patch is not None:  # a ViT: a 2x2 grid of patches at least
            self.min_image_size = MIN_FEATURE_SIDE * int(
                patch[0] if isinstance(patch, tuple | list) else patch
            )
        else:
            self.min_image_size = image_size
        if side is not None:
            reduction = image_size / side
            self.min_image_size = math.ceil(MIN_FEATURE_SIDE * reduction)
            if side < MIN_FEATURE_SIDE:
                raise UserError(
                    f"model.backbone {name}: {image_size}-px views leave a {side}x{side} "
                    f"feature map (it divides the side by {reduction:.0f}); use views of at "
                    f"least {self.min_image_size} px, or a ResNet-like model, which gets a "
                    f"stride-1 stem up to {SMALL_MAX} px"
                )

    @property
    def grad_checkpointing(self) -> bool:
        return self._grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, on: bool) -> None:
        self._grad_checkpointing = bool(on)
        if self._own_checkpointing:
            self.net.set_grad_checkpointing(bool(on))
        elif on and not self.stage_names:
            raise UserError(
                f"model.backbone {self.name}: no stages found to checkpoint; set "
                "train.grad_checkpointing=false"
            )

    def _probe(self, image_size: int) -> tuple[int, int | None]:
        """(feature width, side of the last stage's map or None for tokens) from one image."""
        seen: dict[str, Any] = {}
        last = self.net.get_submodule(self.stage_names[-1]) if self.stage_names else None

        def hook(module, args, out):
            seen["shape"] = tuple(out.shape) if isinstance(out, Tensor) else None

        handle = last.register_forward_hook(hook) if last is not None else None
        was = self.net.training
        try:
            self.net.eval()
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                out = self.net(torch.zeros(1, 3, image_size, image_size))
        except RuntimeError as err:
            raise UserError(
                f"model.backbone {self.name} does not take {image_size}-px images "
                f"({str(err).splitlines()[0][:120]}); use larger views"
            ) from None
        finally:
            self.net.train(was)
            if handle is not None:
                handle.remove()
        shape = seen.get("shape")
        side = min(shape[-2:]) if shape is not None and len(shape) == 4 else None
        return int(out.reshape(1, -1).shape[1]), side

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) → features (B, out_dim)."""
        return self.net(x).flatten(1)

    def stages(self) -> list[tuple[str, nn.Module]]:
        return [(n, self.net.get_submodule(n)) for n in self.stage_names]

    def library_state(self) -> dict[str, Tensor]:
        """The state dict with the library's own keys (what ``create_model(…, num_classes=0)``
        or the constructor with the head removed loads with ``strict=True``)."""
        return self.state_dict()

    def load_library_state(self, state: dict[str, Tensor], what: str) -> None:
        """Load a state dict with the library's keys, strictly; a full model's classifier
        keys are left out. Mismatched keys are one line naming the first few."""
        head = f"{self.head}."
        state = {k: v for k, v in state.items() if not k.startswith(head)}
        own = self.net.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("of another shape", shapes)):  # fmt: skip
            if keys:
                more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
                problems.append(f"{len(keys)} keys {label} ({', '.join(keys[:3])}{more})")
        if problems:
            raise UserError(
                f"{what}: the weights do not fit {self.name} ({self._describe_kwargs()}): "
                + "; ".join(problems)
            )
        self.net.load_state_dict(state, strict=True)

    def _describe_kwargs(self) -> str:
        parts = [f"{k}={v}" for k, v in sorted(self.kwargs.items())]
        parts += ["stride-1 stem, no max-pool"] if self.cifar_stem else []
        return ", ".join(parts) or "its defaults"

    def extra_repr(self) -> str:
        return f"name={self.name}, out_dim={self.out_dim}, kwargs={self.kwargs}"


__all__ = [
    "LIBRARIES",
    "LibraryBackbone",
    "check_name",
    "find_stages",
    "is_library_name",
    "split_name",
]
