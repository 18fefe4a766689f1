"""Backbone weights in and out: one loader for ``--init``, ``--checkpoint`` and export.

Where weights come from (:func:`find_weights`): a run folder (its ``backbone.safetensors``,
else its latest checkpoint), a checkpoint folder (``model.safetensors``, backbone and
projector), or a file: ``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with
``torch.load(weights_only=True)``. No code from a file ever runs.

What they are (:class:`BackboneSpec`): the architecture is read from the state dict itself
(bottleneck blocks → resnet50, the number of blocks per stage → resnet18/34, a 3×3 ``conv1`` →
the CIFAR stem), and the image size and training config from the file's metadata, the sidecar
JSON of a ``.pth``, or the run folder's ``config.yaml``. A file that lies about its backbone, a
damaged file and a foreign one are one-line :class:`~lowres_ssl.errors.UserError`s.

The backbone's state-dict keys are torchvision's ResNet keys without ``fc.*``, so an export in
``torchvision`` format is the same dict, saved with ``torch.save``; it loads with
``strict=True`` into ``torchvision.models.resnet18()`` after ``model.fc = nn.Identity()`` (and,
for the CIFAR stem, the 3×3 ``conv1`` and no max-pool; see ``docs/evaluation.md``).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from lowres_ssl.errors import UserError
from lowres_ssl.files import write_atomic, write_text_atomic
from lowres_ssl.models import (
    BACKBONES,
    CIFAR_STEM_MAX_SIZE,
    LibraryBackbone,
    SSLModel,
    build_backbone,
    is_library_name,
)
from lowres_ssl.models.protocol import Backbone
from lowres_ssl.run_layout import (
    BACKBONE_FILE,
    CHECKPOINT_MODEL_FILE,
    CLASSIFIER_FILE,
    CONFIG_FILE,
    latest_intact,
)

BACKBONE_FORMAT = "lowres_ssl.backbone.v1"
CLASSIFIER_FORMAT = "lowres_ssl.classifier.v1"
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
EXPORT_FORMATS = ("safetensors", "torchvision")

#: Blocks per stage (layer1 … layer4) of each backbone, as torchvision builds them.
_STAGE_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3)}


@dataclass
class BackboneSpec:
    """What is needed to rebuild a backbone: name, image size, stem, feature width."""

    backbone: str
    image_size: int
    cifar_stem: bool
    out_dim: int
    config: dict[str, Any] | None = None  # the training config, where known
    kwargs: dict[str, Any] = field(default_factory=dict)  # a timm/torchvision constructor's

    @property
    def stem(self) -> str:
        return "cifar" if self.cifar_stem else "imagenet"

    @property
    def library(self) -> bool:
        """Whether the backbone is a timm or torchvision model (not a built-in ResNet)."""
        return is_library_name(self.backbone)

    def describe(self) -> str:
        stem = "CIFAR stem" if self.cifar_stem else "ImageNet stem"
        if self.library:
            stem = "stride-1 stem" if self.cifar_stem else "its own stem"
            stem += "".join(f", {k}={v}" for k, v in sorted(self.kwargs.items()))
        return f"{self.backbone} ({stem}, {self.image_size} px, {self.out_dim} features)"

    def build(self) -> Backbone:
        """The architecture, randomly initialised (seed it before calling for a fixed init)."""
        return build_backbone(
            self.backbone, image_size=self.image_size, cifar_stem=self.cifar_stem,
            kwargs=self.kwargs or None,
        )  # fmt: skip


@dataclass
class Weights:
    """Backbone weights read from disk, with where they came from."""

    file: Path
    backbone: dict[str, Tensor]
    spec: BackboneSpec
    projector: dict[str, Tensor] = field(default_factory=dict)
    run_dir: Path | None = None  # the run folder, when ``file`` belongs to one


def state_sha256(state: dict[str, Tensor]) -> str:
    """A hash of a state dict's tensors (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Finding and reading


def find_weights(path: str | Path, flag: str = "--checkpoint") -> tuple[Path, Path | None]:
    """(weights file, its run folder or None) behind a run folder, checkpoint folder or file."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in (BACKBONE_FILE, CLASSIFIER_FILE):  # pre-training's, fine-tuning's
            if (p / name).is_file():
                return p / name, p if (p / CONFIG_FILE).is_file() else None
        if (p / CHECKPOINT_MODEL_FILE).is_file():  # a checkpoint folder: run/checkpoints/step_N
            run = p.parent.parent
            return p / CHECKPOINT_MODEL_FILE, run if (run / CONFIG_FILE).is_file() else None
        last = latest_intact(p)[0]
        if last is not None and (last / CHECKPOINT_MODEL_FILE).is_file():
            return last / CHECKPOINT_MODEL_FILE, p
        raise UserError(
            f"{flag} {p}: no {BACKBONE_FILE}, {CHECKPOINT_MODEL_FILE} or checkpoint in it; pass "
            "a run folder, a checkpoint folder or a weights file"
        )
    if not p.exists():
        raise UserError(f"{flag} {p} does not exist")
    if p.suffix not in (".safetensors", *TORCH_SUFFIXES):
        raise UserError(
            f"{flag} {p}: pass a .safetensors or .pth file, a run folder or a checkpoint folder"
        )
    return p, None


def _damaged(flag: str, file: Path, why: str) -> UserError:
    return UserError(
        f"{flag} {file} is not a readable weights file ({why}); it may be truncated or of "
        "another format: export it again, or pass the run folder"
    )


def read_state(file: Path, flag: str = "--checkpoint") -> tuple[dict[str, Tensor], dict]:
    """(tensors, metadata) of a weights file; never runs code from it."""
    if file.stat().st_size == 0:
        raise _damaged(flag, file, "empty file")
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as err:
            why = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
            raise _damaged(flag, file, f"safetensors: {why}") from None
    try:
        with warnings.catch_warnings():  # about pickle protocols: the error below says enough
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _damaged(
            flag, file, "a pickle of objects other than tensors, refused because it could run code"
        ) from None
    except Exception as err:  # the unpickler raises many kinds of error on garbage
        why = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise _damaged(flag, file, f"torch.load(weights_only=True): {why}") from None
    for wrapper in ("state_dict", "model"):  # common layouts of other tools' checkpoints
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not (isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values())):
        raise _damaged(flag, file, "it holds no state dict of tensors")
    sidecar = file.with_suffix(".json")
    meta = {}
    if sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            meta = {}
    # The sidecar holds JSON values; the metadata of a safetensors file holds strings.
    return dict(obj), {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def _split_state(
    state: dict[str, Tensor], head: str | None = "fc."
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(backbone, projector) parts of a whole model's, a backbone's or torchvision's dict;
    a plain dict loses the classifier's ``head`` keys (None: keep them all, for a library
    model, whose own loader knows its head)."""
    if any(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        backbone = {k[9:]: v for k, v in state.items() if k.startswith("backbone.")}
        projector = {k[10:]: v for k, v in state.items() if k.startswith("projector.")}
        return backbone, projector
    if head is None:
        return dict(state), {}
    # A torchvision classifier's head is not part of the representation.
    return {k: v for k, v in state.items() if not k.startswith(head)}, {}


def infer_architecture(state: dict[str, Tensor]) -> tuple[str, bool]:
    """(backbone name, CIFAR stem?) of a ResNet backbone state dict."""
    conv1 = state.get("conv1.weight")
    if conv1 is None or conv1.ndim != 4 or "layer4.0.conv1.weight" not in state:
        raise UserError(
            "the weights are not a ResNet backbone (no conv1.weight / layer4 keys); "
            f"supported backbones: {', '.join(BACKBONES)}"
        )
    if "layer1.0.conv3.weight" in state:
        name = "resnet50"
    else:
        blocks = tuple(
            len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5)
        )
        matches = [n for n, b in _STAGE_BLOCKS.items() if b == blocks and n != "resnet50"]
        if not matches:
            raise UserError(
                f"the weights are a ResNet with {blocks} blocks per stage, which is none of "
                f"{', '.join(BACKBONES)}"
            )
        name = matches[0]
    return name, conv1.shape[-1] == 3


def _run_config(run_dir: Path | None) -> dict[str, Any] | None:
    if run_dir is None or not (run_dir / CONFIG_FILE).is_file():
        return None
    try:
        values = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return None
    return values if isinstance(values, dict) else None


def _view_size(config: dict[str, Any] | None) -> int | None:
    data = (config or {}).get("data") or {}
    size = data.get("image_size") or data.get("load_size")
    return int(size) if size else None


def load_weights(
    path: str | Path, flag: str = "--checkpoint", expected: BackboneSpec | None = None
) -> Weights:
    """The backbone weights behind ``path`` (see :func:`find_weights`), with their spec.
    ``expected``: the timm/torchvision backbone a plain library state dict (no metadata, no
    run folder: ImageNet weights, say) is taken to be."""
    file, run_dir = find_weights(path, flag)
    state, meta = read_state(file, flag)
    return _weights_of(file, run_dir, state, meta, flag, expected)


def _library_claim(meta: dict, config: dict | None) -> str | None:
    """The timm/torchvision backbone a file's metadata or run config names, if any."""
    claimed = meta.get("backbone") or ((config or {}).get("model") or {}).get("backbone")
    return claimed if isinstance(claimed, str) and is_library_name(claimed) else None


def _library_weights(
    file: Path, run_dir: Path | None, state: dict[str, Tensor], meta: dict,
    config: dict | None, name: str, expected: BackboneSpec | None,
) -> Weights:  # fmt: skip
    """The :class:`Weights` of a timm/torchvision backbone: its spec from the metadata (or
    the run config, or ``expected`` for a plain library file)."""
    backbone, projector = _split_state(state, head=None)
    try:
        kwargs = json.loads(meta["kwargs"]) if meta.get("kwargs") else None
    except json.JSONDecodeError:
        kwargs = None
    size = int(meta["image_size"]) if meta.get("image_size") else _view_size(config)
    if expected is not None and expected.backbone == name:
        size = size or expected.image_size
        kwargs = expected.kwargs if kwargs is None else kwargs
        stem = meta.get("stem", expected.stem) == "cifar"
    else:
        stem = meta.get("stem") == "cifar"
    size = size or 224
    spec = BackboneSpec(name, size, stem, 0, config, dict(kwargs or {}))
    if meta.get("out_dim"):
        spec.out_dim = int(meta["out_dim"])
    else:  # a checkpoint or a plain file: the width of the model it makes (built on meta)
        with torch.device("meta"):
            built = spec.build()
        spec.out_dim, spec.kwargs = built.out_dim, dict(built.kwargs)
    return Weights(file, backbone, spec, projector, run_dir)


def _weights_of(
    file: Path, run_dir: Path | None, state: dict[str, Tensor], meta: dict, flag: str,
    expected: BackboneSpec | None = None,
) -> Weights:  # fmt: skip
    """The :class:`Weights` of a file's tensors and metadata (a ResNet's architecture from
    its tensors; a timm/torchvision model's from the metadata or run config)."""
    config = None
    if meta.get("config"):
        try:
            config = json.loads(meta["config"])
        except json.JSONDecodeError:
            config = None
    config = config or _run_config(run_dir)
    library = _library_claim(meta, config)
    if library is None and expected is not None and expected.library:
        library = expected.backbone  # a plain state dict given for a library backbone
    if library is not None:
        return _library_weights(file, run_dir, state, meta, config, library, expected)
    backbone, projector = _split_state(state)
    try:
        name, cifar_stem = infer_architecture(backbone)
    except UserError as err:
        raise UserError(f"{flag} {file}: {err}") from None
    claimed = meta.get("backbone")
    if claimed and claimed != name:
        raise UserError(
            f"{flag} {file}: its metadata says {claimed} but its tensors are a {name}; the file "
            "was changed after export"
        )
    size = int(meta["image_size"]) if meta.get("image_size") else _view_size(config)
    if size is None:  # a plain torchvision file: the usual size for its stem
        size = 32 if cifar_stem else 224
    spec = BackboneSpec(name, size, cifar_stem, BACKBONES[name], config)
    return Weights(file, backbone, spec, projector, run_dir)


def _mismatch(flag: str, file: Path, have: BackboneSpec, want: Backbone) -> str | None:
    if have.backbone != want.name:
        return f"backbone {have.backbone} in the file, {want.name} asked for"
    if isinstance(want, LibraryBackbone):
        return None  # its keys and shapes say the rest (load_library_state)
    if have.cifar_stem != want.cifar_stem:
        a = "CIFAR (3x3 conv1)" if have.cifar_stem else "ImageNet (7x7 conv1)"
        b = "CIFAR" if want.cifar_stem else "ImageNet"
        return (
            f"{a} stem in the file, {b} stem asked for (the stem follows the image size: "
            f"CIFAR up to {CIFAR_STEM_MAX_SIZE} px)"
        )
    return None


def load_into(backbone: Backbone, weights: Weights, flag: str = "--checkpoint") -> None:
    """Load ``weights`` into ``backbone`` (strict); another architecture is a one-line error."""
    problem = _mismatch(flag, weights.file, weights.spec, backbone)
    if problem is None and isinstance(backbone, LibraryBackbone):
        backbone.load_library_state(weights.backbone, f"{flag} {weights.file}")
        return
    if problem is None:
        try:
            backbone.load_state_dict(weights.backbone)
        except RuntimeError as err:
            lines = str(err).splitlines()
            problem = (lines[1] if len(lines) > 1 else lines[0]).strip()[:160]
    if problem is not None:
        raise UserError(f"{flag} {weights.file}: {problem}")


def load_backbone(path: str | Path, flag: str = "--checkpoint") -> tuple[Backbone, Weights]:
    """A backbone rebuilt from its weights alone (architecture, stem and size from the file)."""
    weights = load_weights(path, flag)
    with torch.random.fork_rng(devices=[]):  # building draws an init; keep the caller's RNG
        backbone = weights.spec.build()
    load_into(backbone, weights, flag)
    return backbone, weights


def random_backbone(spec: BackboneSpec, seed: int = 0) -> Backbone:
    """The architecture of ``spec`` at a fixed random init: the baseline every result must
    beat. The caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.build()


def load_init(model: SSLModel, path: str | Path) -> str:
    """Start training from saved weights: a whole model (backbone and projector, when the
    projector's shapes match) or a backbone. Returns what was loaded, for the log."""
    weights = load_weights(path, "--init", expected=spec_of(model.backbone, 0, None))
    load_into(model.backbone, weights, "--init")
    own = model.projector.state_dict()
    projector = weights.projector
    if projector and all(k in own and own[k].shape == v.shape for k, v in projector.items()):
        model.projector.load_state_dict(projector)
        return f"backbone and projector from {weights.file}"
    return f"backbone from {weights.file}"


# ---------------------------------------------------------------------------------------------
# Writing


def spec_of(backbone: Backbone, image_size: int, config: dict | None) -> BackboneSpec:
    """The spec of a built backbone (a timm/torchvision model's constructor arguments too)."""
    kwargs = dict(getattr(backbone, "kwargs", None) or {})
    return BackboneSpec(
        backbone.name, image_size, backbone.cifar_stem, backbone.out_dim, config, kwargs
    )


def _metadata(spec: BackboneSpec) -> dict[str, str]:
    meta = {
        "format": BACKBONE_FORMAT,
        "backbone": spec.backbone,
        "image_size": str(spec.image_size),
        "stem": spec.stem,
        "out_dim": str(spec.out_dim),
    }
    if spec.library:
        meta["kwargs"] = json.dumps(spec.kwargs)
    if spec.config is not None:
        meta["config"] = json.dumps(spec.config)
    return meta


def _plain_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _nbytes(state: dict[str, Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def save_safetensors(state: dict[str, Tensor], spec: BackboneSpec, path: Path) -> Path:
    """The backbone's state dict as safetensors, its spec as metadata; atomic."""
    plain = _plain_state(state)
    return write_atomic(
        path, lambda tmp: save_file(plain, str(tmp), metadata=_metadata(spec)),
        what="the backbone's weights", needed=_nbytes(plain),
    )  # fmt: skip


def save_torchvision(state: dict[str, Tensor], spec: BackboneSpec, path: Path) -> Path:
    """A plain state dict with torchvision's keys (``torch.save``), and ``<name>.json`` beside
    it saying which stem and image size it needs; both atomic."""
    plain = _plain_state(state)
    write_atomic(path, lambda tmp: torch.save(plain, tmp), what="the backbone's weights",
                 needed=_nbytes(plain))  # fmt: skip
    meta: dict[str, Any] = _metadata(spec)
    meta.update(image_size=spec.image_size, out_dim=spec.out_dim, config=spec.config)
    meta["load"] = load_line(spec, path.name)
    write_text_atomic(path.with_suffix(".json"), json.dumps(meta, indent=1) + "\n")
    return path


def library_constructor(spec: BackboneSpec) -> str:
    """Python that builds a timm/torchvision backbone the way the kit trained it."""
    from lowres_ssl.models.library import split_name

    library, model = split_name(spec.backbone)
    args = "".join(f", {k}={v!r}" for k, v in sorted(spec.kwargs.items()))
    if library == "timm":
        text = f"model = timm.create_model({model!r}, num_classes=0{args}); "
    else:
        with torch.device("meta"):
            head = build_backbone(spec.backbone, image_size=spec.image_size).head
        text = (
            f"model = torchvision.models.get_model({model!r}, weights=None{args}); "
            f"model.set_submodule({head!r}, torch.nn.Identity()); "
        )
    if spec.cifar_stem:
        text += (
            "first = next(m for m in model.conv1.modules() if isinstance(m, torch.nn.Conv2d)); "
            "first.stride = (1, 1); model.maxpool = torch.nn.Identity(); "
        )
    return text


def load_line(spec: BackboneSpec, name: str) -> str:
    """Python that builds the backbone of ``spec`` and loads a torch file ``name`` into it."""
    if spec.library:
        return library_constructor(spec) + (
            f"model.load_state_dict(torch.load('{name}', weights_only=True))"
        )
    return (
        f"model = torchvision.models.{spec.backbone}(); model.fc = torch.nn.Identity(); "
        + (
            "model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); "
            "model.maxpool = torch.nn.Identity(); "
            if spec.cifar_stem
            else ""
        )
        + f"model.load_state_dict(torch.load('{name}', weights_only=True))"
    )


# ---------------------------------------------------------------------------------------------
# Classifiers (fine-tuning's output)


@dataclass
class ClassifierFile:
    """A fine-tuned classifier read from disk: backbone spec, head, class names."""

    file: Path
    spec: BackboneSpec
    state: dict[str, Tensor]  # backbone.* and head.*
    classes: list[str]
    info: dict[str, Any]  # the rest of the metadata (val_top1, epoch, preprocessing, …)

    def build(self):
        """The :class:`~lowres_ssl.models.Classifier` with these weights (eval mode)."""
        from lowres_ssl.models import Classifier

        with torch.random.fork_rng(devices=[]):
            model = Classifier(self.spec.build(), len(self.classes))
        model.load_state_dict(self.state)
        return model.eval()


def save_classifier(
    model, spec: BackboneSpec, classes: list[str], path: Path, info: dict[str, Any] | None = None
) -> Path:
    """Backbone + head as safetensors; the backbone spec, class names, preprocessing and
    ``info`` (JSON values) in the metadata; atomic."""
    from lowres_ssl.augment import IMAGENET_MEAN, IMAGENET_STD

    meta = _metadata(spec)
    meta["format"] = CLASSIFIER_FORMAT
    meta["classes"] = json.dumps(list(classes))
    meta["preprocessing"] = json.dumps(
        {
            "resize": "centred square, bicubic, to image_size",
            "image_size": spec.image_size,
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
        }
    )
    meta["info"] = json.dumps(info or {})
    state = {
        **{f"backbone.{k}": v for k, v in model.backbone.state_dict().items()},
        **{f"head.{k}": v for k, v in model.head.state_dict().items()},
    }
    plain = _plain_state(state)
    return write_atomic(
        path, lambda tmp: save_file(plain, str(tmp), metadata=meta),
        what="the classifier's weights", needed=_nbytes(plain),
    )  # fmt: skip


def load_classifier(path: str | Path, flag: str = "--checkpoint") -> ClassifierFile:
    """A classifier from a fine-tuning run folder (its best model, ``classifier.safetensors``)
    or a classifier file; anything else is a one-line error."""
    p = Path(path).expanduser()
    file = p / CLASSIFIER_FILE if p.is_dir() else p
    if p.is_dir() and not file.is_file():
        raise UserError(
            f"{flag} {p}: no {CLASSIFIER_FILE} in it; pass the --out folder of a finished "
            "finetune.py run (or its classifier file)"
        )
    if not file.exists():
        raise UserError(f"{flag} {file} does not exist")
    if file.suffix != ".safetensors":
        raise UserError(f"{flag} {file}: a classifier is a .safetensors file from finetune.py")
    state, meta = read_state(file, flag)
    if meta.get("format") != CLASSIFIER_FORMAT or "head.weight" not in state:
        raise UserError(
            f"{flag} {file} is not a classifier from finetune.py (no head or class names); "
            "for a backbone's features use --embeddings"
        )
    weights = _weights_of(file, None, state, meta, flag)
    try:
        classes = json.loads(meta["classes"])
        info = json.loads(meta.get("info", "{}"))
    except (KeyError, json.JSONDecodeError):
        raise UserError(f"{flag} {file}: its class names are unreadable") from None
    if len(classes) != state["head.weight"].shape[0]:
        raise UserError(
            f"{flag} {file}: {len(classes)} class names for a head of "
            f"{state['head.weight'].shape[0]} outputs; the file was changed after training"
        )
    keep = {k: v for k, v in state.items() if k.startswith(("backbone.", "head."))}
    return ClassifierFile(file, weights.spec, keep, classes, info)


def export(weights: Weights, out: str | Path, fmt: str | None = None) -> Path:
    """Write ``weights`` as ``fmt`` (default from the suffix: .pth/.pt → torchvision)."""
    out = Path(out).expanduser()
    if fmt is None:
        fmt = "torchvision" if out.suffix in TORCH_SUFFIXES else "safetensors"
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    wanted = (".safetensors",) if fmt == "safetensors" else TORCH_SUFFIXES
    if out.suffix not in wanted:
        raise UserError(
            f"--out {out}: a {fmt} export is a {' or '.join(wanted)} file; rename --out or pass "
            "--format " + ("torchvision" if fmt == "safetensors" else "safetensors")
        )
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: the folder {out.parent} does not exist")
    save = save_safetensors if fmt == "safetensors" else save_torchvision
    return save(weights.backbone, weights.spec, out)


__all__ = [
    "BACKBONE_FORMAT",
    "CLASSIFIER_FORMAT",
    "EXPORT_FORMATS",
    "BackboneSpec",
    "ClassifierFile",
    "Weights",
    "export",
    "find_weights",
    "infer_architecture",
    "library_constructor",
    "load_backbone",
    "load_classifier",
    "load_init",
    "load_into",
    "load_line",
    "load_weights",
    "random_backbone",
    "read_state",
    "save_classifier",
    "save_safetensors",
    "save_torchvision",
    "spec_of",
    "state_sha256",
]
