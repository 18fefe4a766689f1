"""Batched two-view and multi-crop augmentation on the training device.

The loader hands over a uint8 batch ``(B, 3, H, W)`` already on the GPU; :class:`ViewAugment`
turns it into normalised float views ``[view1, view2, *small_crops]``, each ``(B, 3, side, side)``
(multi-crop: more large views, small crops at a smaller side, or OBoW's unaugmented original
first; see :class:`ViewAugment`).
Every image gets its own crop, flip, jitter factors, jitter order, grayscale/blur/solarize coin
flips and blur sigma: there is no Python loop over samples, and nothing is shared by the batch.

>>> aug = build_augment("vicreg", 32)
>>> v1, v2 = aug(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
>>> tuple(v1.shape), v1.dtype
((4, 3, 32, 32), torch.float32)

Per view, in this order (VICReg's and torchvision's)::

    x   = uint8 / 255                          (once per batch, float32, shared by all views)
    x   = RandomResizedCrop(size, scale, ratio) and horizontal flip    (one grid_sample)
    x   = ColorJitter(b, c, s, h) with probability jitter_p, ops in a random order per image
    x   = grayscale with probability gray_p      gray = 0.2989 R + 0.587 G + 0.114 B
    x   = Gaussian blur, sigma ~ U(blur_sigma), probability blur_p, kernel 2 ceil(3 sigma_max) + 1
    x   = solarize with probability solarize_p   x >= 0.5  ->  1 - x
    out = ((x - mean) / std).to(out_dtype)       (optionally channels_last)

Colour formulas (torchvision's ``adjust_*``; every blend is clamped to [0, 1])::

    brightness f ~ U[max(0, 1 - b), 1 + b]:  x' = f x
    contrast   f ~ U[max(0, 1 - c), 1 + c]:  x' = f x + (1 - f) mean_hw(gray(x))
    saturation f ~ U[max(0, 1 - s), 1 + s]:  x' = f x + (1 - f) gray(x)
    hue        f ~ U[-h, h]:                 H' = (H + f) mod 1 in HSV, S and V unchanged

Why our own ops rather than Kornia's augmentation modules (shared randomness across the batch,
gated ops computed on every image): see ``docs/design.md`` §4.

Kornia in the hot path: ``kornia.filters.gaussian_blur2d`` (one kernel per image from a ``(B, 2)``
sigma, separable, reflect border). The hue shift is :func:`adjust_hue`:
``kornia.enhance.adjust_hue(x, 2 pi f)`` is as close to torchvision (1.5e-6 against 1.2e-6) but
takes 2.5x the CPU time (it builds the HSV image and converts back).

Randomness: every parameter is drawn on the **CPU**, from the global torch RNG (or the CPU
``torch.Generator`` given to :meth:`ViewAugment.forward`), a fixed number of draws per view.
``torch.manual_seed(s)`` therefore makes the views reproducible, the same seed gives the same
parameters on CPU and CUDA, and an exact resume needs ``torch.get_rng_state()`` only (no CUDA RNG
state). Sampling on the host also means that choosing "which images?" costs no device sync.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import kornia
import torch
import torch.nn.functional as F
from torch import nn

from lowres_ssl.errors import UserError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: torchvision's luma weights (``rgb_to_grayscale``): grayscale, contrast and saturation use them.
GRAY_WEIGHTS: tuple[float, float, float] = (0.2989, 0.587, 0.114)

#: Smallest view side. The 13-tap blur (sigma <= 2) reflect-pads by 6 pixels, which needs a side of
#: 7 or more; 8 keeps a margin, and a smaller crop carries almost no content.
MIN_SIZE = 8

#: The output dtypes of a training step.
OUT_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)


def _check_pair(name: str, pair: Sequence[float], hi: float = math.inf) -> tuple[float, float]:
    """``pair`` as floats if ``0 < low <= high <= hi``, else a one-line ValueError."""
    if len(pair) != 2 or not 0 < pair[0] <= pair[1] <= hi:
        bound = "" if hi == math.inf else f" <= {hi:g}"
        raise UserError(f"{name} must be (low, high) with 0 < low <= high{bound}, got {pair}")
    return float(pair[0]), float(pair[1])


@dataclass(frozen=True)
class ViewSpec:
    """The random pipeline of one view (formulas in the module docstring).

    ``scale``: crop area as a fraction of the input area; ``ratio``: crop width / height, drawn
    log-uniformly (torchvision's ``RandomResizedCrop.get_params``: ten tries, then a centred crop).
    ``brightness``, ``contrast``, ``saturation`` ``m``: factors ``U[max(0, 1 - m), 1 + m]``;
    ``hue`` ``h``: shifts ``U[-h, h]`` turns (``h <= 0.5``); the four together with probability
    ``jitter_p``. ``blur_sigma`` is in pixels of the view.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5

    def __post_init__(self) -> None:
        _check_pair("scale", self.scale, 1.0)
        _check_pair("ratio", self.ratio)
        _check_pair("blur_sigma", self.blur_sigma)
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p", "solarize_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise UserError(f"hue must be in [0, 0.5], got {self.hue}")

    @property
    def blur_kernel(self) -> int:
        """Odd blur kernel side ``2 ceil(3 sigma_max) + 1`` (13 for sigma <= 2).

        Not a fraction of the image (SimCLR's 10 %): official VICReg blurs with PIL's
        ``GaussianBlur(radius=sigma)``, which is not truncated at 10 % of the image, and at 32 px a
        3-tap kernel would cap the effective sigma near 1 whatever sigma was drawn. +-3 sigma keeps
        99.7 % of the mass of the widest Gaussian.
        """
        return 2 * math.ceil(3 * self.blur_sigma[1]) + 1


@dataclass(frozen=True)
class Recipe:
    """A named recipe: the pipelines of view 1 and view 2 (small crops use view 2's, see below).

    ``interpolation``: the crop resampling (``grid_sample`` mode). Official VICReg uses PIL bicubic;
    bilinear (torchvision's default) is the default here, at half the CPU cost of bicubic.
    """

    name: str
    view1: ViewSpec
    view2: ViewSpec
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            choices = ", ".join(INTERPOLATIONS)
            raise UserError(f"interpolation must be one of {choices}, got {self.interpolation!r}")


_VICREG_VIEW1 = ViewSpec(blur_p=1.0, solarize_p=0.0)
_VICREG_VIEW2 = ViewSpec(blur_p=0.1, solarize_p=0.2)
_AUH_VIEW = ViewSpec(jitter_p=1.0, saturation=0.4, hue=0.4, blur_p=0.0, solarize_p=0.0)
#: OBoW's "original" view: the whole image (a centred square where it is not square), flipped
#: or not, nothing else.
ORIGINAL_VIEW = ViewSpec(
    scale=(1.0, 1.0),
    ratio=(1.0, 1.0),
    jitter_p=0.0,
    gray_p=0.0,
    blur_p=0.0,
    solarize_p=0.0,
)
_SUPERVISED_VIEW = ViewSpec(
    scale=(0.35, 1.0),
    jitter_p=0.8,
    brightness=0.2,
    contrast=0.2,
    saturation=0.2,
    hue=0.0,
    gray_p=0.0,
    blur_p=0.0,
    solarize_p=0.0,
)

#: Recipe name → :class:`Recipe`:
#:
#: * ``vicreg``: VICReg's asymmetric pair (Bardes et al. 2022): crop (0.08, 1), flip 0.5, jitter
#:   (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2, blur p 1.0 / 0.1, solarize p 0 / 0.2.
#: * ``auh``: the SFRIK paper's STL-10 recipe: crop and flip as above, jitter (0.4, 0.4, 0.4, 0.4)
#:   p 1.0, grayscale 0.2, no blur, no solarize, on both views.
#: * ``cifar``: ``vicreg`` without blur (sigma up to 2 px smears a 32 px image); solarize kept.
#: * ``supervised``: fine-tuning's one view (only view 1 is used): crop (0.35, 1), flip 0.5,
#:   light jitter (0.2, 0.2, 0.2, 0) p 0.8, nothing else. A milder crop than the SSL recipes':
#:   a labeled few epochs need the object in the view, not an invariance to losing it.
RECIPES: dict[str, Recipe] = {
    "vicreg": Recipe("vicreg", _VICREG_VIEW1, _VICREG_VIEW2),
    "auh": Recipe("auh", _AUH_VIEW, _AUH_VIEW),
    "cifar": Recipe(
        "cifar",
        dataclasses.replace(_VICREG_VIEW1, blur_p=0.0),
        dataclasses.replace(_VICREG_VIEW2, blur_p=0.0),
    ),
    "supervised": Recipe("supervised", _SUPERVISED_VIEW, _SUPERVISED_VIEW),
}


@dataclass(frozen=True)
class ViewParams:
    """The parameters one view drew, per image (CPU tensors; ``B`` is the batch size).

    Attributes:
        crop: ``(B, 4)`` int64 ``(top, left, height, width)`` in input pixels (the order of
            torchvision's ``RandomResizedCrop.get_params``).
        flip: ``(B,)`` bool, flipped horizontally.
        jitter: ``(B,)`` bool, colour jitter applied.
        jitter_factors: ``(B, 4)`` float32 brightness, contrast, saturation, hue; drawn for every
            image, used where ``jitter``.
        jitter_order: ``(B, 4)`` int64 op indices (0 brightness, 1 contrast, 2 saturation, 3 hue)
            in the order they are applied.
        gray: ``(B,)`` bool, turned to grayscale.
        blur: ``(B,)`` bool, blurred.
        blur_sigma: ``(B,)`` float32 sigma in view pixels; drawn for every image, used where
            ``blur``.
        solarize: ``(B,)`` bool, solarized.
    """

    crop: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    jitter_factors: torch.Tensor
    jitter_order: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    blur_sigma: torch.Tensor
    solarize: torch.Tensor

    def part(self, rows: slice) -> ViewParams:
        """The parameters of the images ``rows`` of the batch."""
        return ViewParams(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))


class PlannedViews:
    """The views of one batch with their parameters drawn but not yet computed.

    Made by :meth:`ViewAugment.plan`; holds the uint8 images and the parameters (a few
    bytes per image). ``take()`` computes every view, ``take(part, count)`` the first ``count``
    views of the images ``part`` (a slice). Computing a part twice gives the same tensors: the
    ops are deterministic given their parameters.
    """

    def __init__(
        self, augment: ViewAugment, images: torch.Tensor, params: list[ViewParams]
    ) -> None:
        self.augment, self.images, self.params = augment, images, params

    def __len__(self) -> int:
        return self.images.shape[0]

    def take(self, part: slice | None = None, count: int | None = None) -> list[torch.Tensor]:
        count = len(self.params) if count is None else count
        if part is None:
            return self.augment._compute(self.images, self.params, count)
        params = [p.part(part) for p in self.params[:count]]
        return self.augment._compute(self.images[part], params, count)

    def sample_input(self, n: int) -> torch.Tensor:
        """The first view of the first ``n`` images (at most), as the model takes them."""
        return self.take(slice(0, min(len(self), n)), 1)[0]


# Columns of the one (B, _N_RAND) uniform draw per view. The count is fixed whatever the recipe
# enables, so the RNG stream, and with it a resume, does not depend on the recipe's contents.
_AREA, _LOG_RATIO = slice(0, 10), slice(10, 20)
_TOP, _LEFT, _FLIP, _JITTER = 20, 21, 22, 23
_FACTORS, _ORDER_KEYS = slice(24, 28), slice(28, 32)
_GRAY, _BLUR, _SIGMA, _SOLARIZE = 32, 33, 34, 35
_N_RAND = 36


def _sample_crops(u: torch.Tensor, height: int, width: int, spec: ViewSpec) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop.get_params``, vectorised: ``(B, 4)`` (top, left, h, w).

    Ten candidates per image: area ``H W U(scale)``, aspect ``exp(U(log ratio))``,
    ``w = round(sqrt(area aspect))``, ``h = round(sqrt(area / aspect))``; the first that fits wins,
    at a uniform position. If none fits, the whole image clipped to ``ratio``, centred. float64,
    as torchvision's Python floats (both round half to even).
    """
    u = u.double()
    area = height * width * (spec.scale[0] + (spec.scale[1] - spec.scale[0]) * u[:, _AREA])
    log_lo, log_hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, _LOG_RATIO])
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    # argmax returns the first maximum: the first candidate that fits, as torchvision's loop.
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)

    if width / height < spec.ratio[0]:
        fb_w, fb_h = width, round(width / spec.ratio[0])
    elif width / height > spec.ratio[1]:
        fb_w, fb_h = round(height * spec.ratio[1]), height
    else:
        fb_w, fb_h = width, height
    found = fits.any(dim=1)
    w = torch.where(found, w, float(fb_w))
    h = torch.where(found, h, float(fb_h))
    top = torch.where(found, (u[:, _TOP] * (height - h + 1)).floor(), float((height - fb_h) // 2))
    left = torch.where(found, (u[:, _LEFT] * (width - w + 1)).floor(), float((width - fb_w) // 2))
    return torch.stack([top, left, h, w], dim=1).long()


def _crop_grid(
    crop: torch.Tensor, flip: torch.Tensor, height: int, width: int, side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling coordinates that crop, resize and flip: ``(B, side)`` x and y, normalised.

    Output column ``j`` of ``side`` samples input column ``left + (j + 0.5) w / side - 0.5`` (the
    half-pixel convention of ``interpolate``), which in ``grid_sample``'s normalised coordinates
    (align_corners=False) is ``x = (2 left + (2 j + 1) w / side) / W - 1``; a flip reverses ``j``.
    Rows likewise. The grid is separable, so two ``(B, side)`` tables describe it (no
    ``affine_grid`` batched matmul); computed in float64 on the CPU and rounded once.
    """
    top, left, h, w = crop.double().unbind(1)
    j = (2 * torch.arange(side, dtype=torch.float64) + 1) / side
    jx = torch.where(flip[:, None], j.flip(0), j)
    gx = (2 * left[:, None] + jx * w[:, None]) / width - 1
    gy = (2 * top[:, None] + j * h[:, None]) / height - 1
    return gx.float(), gy.float()


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W) -> (B, 1, H, W)``: ``0.2989 R + 0.587 G + 0.114 B`` (torchvision's luma)."""
    r, g, b = x.unbind(dim=1)
    wr, wg, wb = GRAY_WEIGHTS
    return (r * wr).add_(g, alpha=wg).add_(b, alpha=wb).unsqueeze(1)


#: Channel offsets n (R, G, B) of the sextant formula in :func:`adjust_hue`.
_HUE_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shift the HSV hue of ``x`` ``(B, 3, H, W)`` in [0, 1] by ``shift`` ``(B,)`` turns.

    torchvision's ``adjust_hue`` (RGB → HSV, ``H' = (H + shift) mod 1``, → RGB) without building
    the HSV image. With ``v = max(R, G, B)``, chroma ``c = v - min(R, G, B)`` and the hue in
    sixths ``h6`` (``(G - B) / c`` where R is the max, else ``(B - R) / c + 2`` where G is, else
    ``(R - G) / c + 4``: ties go to R, then G, as in torchvision), channel ``n`` (R 5, G 3, B 1)
    is::

        k = (n + h6 + 6 shift) mod 6,    out_n = v - c clamp(min(k, 4 - k), 0, 1)

    Gray pixels (``c = 0``) come back unchanged, outputs stay in ``[min, max]`` of the pixel.
    """
    r, g, b = x.unbind(dim=1)
    v = x.amax(dim=1, keepdim=True)
    c = v - x.amin(dim=1, keepdim=True)
    is_r, is_g = v.squeeze(1) == r, v.squeeze(1) == g
    num = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g)).unsqueeze(1)
    sextant = torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0)).unsqueeze(1)
    # Gray pixels (c = 0) may take any finite hue: out = v - c * (...) = v.
    h6 = (num / torch.where(c > 0, c, 1.0)).add_(sextant)
    h6 = h6.add_((6 * shift).to(x.device, x.dtype, non_blocking=True).view(-1, 1, 1, 1))
    # The three channels at once: k is (B, 3, H, W).
    k = (h6 + _HUE_OFFSETS.to(x.device, x.dtype, non_blocking=True)).remainder_(6.0)
    return torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0).mul_(-c).add_(v)


def _apply_to(
    x: torch.Tensor, mask: torch.Tensor, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Replace the images selected by the CPU bool ``mask`` by ``fn(x[i], i)`` (``i`` CPU indices).

    Only the selected images are computed (a Kornia gate computes all, then discards), and the
    mask lives on the host, so the selection costs no device sync. ``x`` may be updated in place;
    use the returned tensor.
    """
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    if idx.numel() == x.shape[0]:
        return fn(x, idx)
    idx_dev = idx.to(x.device, non_blocking=True)
    return x.index_copy_(0, idx_dev, fn(x.index_select(0, idx_dev), idx))


def color_jitter(
    x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, applied: torch.Tensor | None = None
) -> torch.Tensor:
    """torchvision's ColorJitter with its own op order per image; ``x`` ``(B, 3, H, W)`` in [0, 1].

    ``factors`` ``(B, 4)``: brightness, contrast, saturation, hue (formulas in the module
    docstring); ``order`` ``(B, 4)``: op indices in application order; ``applied`` ``(B,)`` bool
    (default all): images to jitter. All three on the CPU. ``x`` may be updated in place.

    Pass ``k`` applies to image ``i`` the op ``order[i, k]``. Brightness, contrast and saturation
    are all ``clamp(a x + (1 - a) ref, 0, 1)`` with ``ref`` = 0, the mean gray, or the gray, so
    one fused full-batch blend does the three; ``a = 1, ref = 0`` is an exact identity for the
    other images. Hue runs on its images only.
    """
    n = x.shape[0]
    if applied is None:
        applied = torch.ones(n, dtype=torch.bool)
    for k in range(4):
        op = order[:, k]
        blend = applied & (op != _HUE)
        a = torch.ones(n)
        a[blend] = factors[blend, op[blend]]
        use_sat = blend & (op == _SATURATION)
        use_con = blend & (op == _CONTRAST)
        if bool((a != 1).any()):
            # One host-to-device copy for all of the pass's per-image coefficients.
            coef = torch.stack([a, use_sat.float(), use_con.float()])
            coef = coef.to(x.device, non_blocking=True).view(3, n, 1, 1, 1)
            if bool(use_sat.any() or use_con.any()):
                gray = rgb_to_gray(x)
                # ref: gray (saturation), its mean (contrast), 0 (brightness and the rest).
                mean = gray.mean(dim=(-2, -1), keepdim=True).mul_(coef[2])
                ref = torch.where(coef[1] > 0, gray, mean)
                # In place, x + (1 - a)(ref - x) = a x + (1 - a) ref; exactly x where a = 1.
                x = x.lerp_(ref, 1 - coef[0]).clamp_(0, 1)
            else:
                x = x.mul_(coef[0]).clamp_(0, 1)
        use_hue = applied & (op == _HUE) & (factors[:, _HUE] != 0)
        x = _apply_to(x, use_hue, lambda xs, i: adjust_hue(xs, factors[i, _HUE]))
    return x


class ViewAugment(nn.Module):
    """uint8 ``(B, 3, H, W)`` → the views of a two-view or multi-crop step, normalised.

    The views, in order: with ``original``, OBoW's unaugmented whole image (:data:`ORIGINAL_VIEW`)
    at ``size``; ``num_large`` large views at ``size`` (view1's pipeline, view2's, view1's, …);
    ``num_small_crops`` small crops at ``small_size`` (view 2's pipeline). The default is the
    two views of the recipe.

    Args:
        recipe: the per-view pipelines (:data:`RECIPES` holds the named ones).
        size: side ``s`` of the large views (and the original), in pixels (an int >= 8).
        mean, std: per-channel normalisation ``(x - mean) / std`` of the [0, 1] values, ImageNet's
            by default; ``mean=None`` skips it (``std`` is then ignored): views stay in [0, 1].
        num_large: large views (default 2).
        large_scale: their crop area fraction; default the recipe's ((0.08, 1) for the named
            ones). SwAV's multi-crop takes (0.14, 1), leaving the smaller areas to small crops.
        num_small_crops: small multi-crop views (default 0). They use view 2's pipeline (its
            jitter, grayscale, blur and solarize probabilities) with ``small_scale`` as crop scale.
        small_size: their side; default ``max(8, round(size * 96 / 224))``, the 96 / 224 ratio of
            SwAV and DINO (14 px at size 32, 41 at 96, 96 at 224).
        small_scale: their crop area fraction, default (0.05, 0.14): SwAV's local crops, which
            sit below its (0.14, 1) global ones (DINO uses (0.05, 0.4)).
        original: OBoW's layout: the whole image first (the objective's anchor).
        out_dtype: dtype of the views: float32, bfloat16 or float16. The augmentations run in
            float32 (autocast off) and are cast once at the end.
        channels_last: return the views in ``torch.channels_last`` memory format.

    Input: uint8; float32 with values in [0, 1] is accepted too (the range is not checked: that
    would be a device sync), e.g. for already-decoded images. Other dtypes (float64, float16,
    integer) are rejected rather than silently converted. The input need not be square; the views
    are. After each call :attr:`last_params` holds one :class:`ViewParams` per returned view.
    :attr:`groups` says which views a step runs through the network together.
    """

    last_params: list[ViewParams] | None

    def __init__(
        self,
        recipe: Recipe,
        size: int,
        *,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        num_large: int = 2,
        large_scale: tuple[float, float] | None = None,
        num_small_crops: int = 0,
        small_size: int | None = None,
        small_scale: tuple[float, float] = (0.05, 0.14),
        original: bool = False,
        out_dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(recipe, Recipe):
            choices = ", ".join(RECIPES)
            raise UserError(f"recipe must be a Recipe or one of {choices}, got {recipe!r}")
        size = _check_size("size", size)
        _check_count("num_large", num_large)
        _check_count("num_small_crops", num_small_crops)
        if small_size is None:
            small_size = max(MIN_SIZE, round(size * 96 / 224))
        small_size = _check_size("small_size", small_size)
        if out_dtype not in OUT_DTYPES:
            choices = ", ".join(OUT_DTYPES.values())
            raise UserError(f"out_dtype must be one of {choices}, got {out_dtype}")

        self.recipe = recipe
        self.size = size
        self.small_size = small_size
        self.num_large = num_large
        self.num_small_crops = num_small_crops
        self.original = original
        self.out_dtype = out_dtype
        self.channels_last = channels_last
        #: (pipeline, side) of each returned view.
        self.views = _view_list(recipe, size, num_large, large_scale, original)
        small_spec = dataclasses.replace(
            recipe.view2, scale=_check_pair("small_scale", small_scale, 1.0)
        )
        self.views += [(small_spec, small_size)] * num_small_crops
        if len(self.views) < 1:
            raise UserError("the augmentation makes no view: ask for large views or small crops")
        #: Views run through the network together (:func:`forward_groups`).
        self.groups = forward_groups([side for _, side in self.views])
        for spec, side in self.views:
            # Reflect padding needs the blur radius below the view side.
            if spec.blur_p > 0 and spec.blur_kernel // 2 >= side:
                raise UserError(
                    f"blur sigma up to {spec.blur_sigma[1]:g} needs views over "
                    f"{spec.blur_kernel // 2} px, got {side} px: use a larger size or smaller sigma"
                )

        self.normalize = mean is not None
        if mean is None:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        elif len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise UserError(f"mean and std must be 3 values each, std > 0, got {mean} and {std}")
        # Non-persistent: constants, not state; they follow .to() and stay out of state_dict.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.last_params = None

    def extra_repr(self) -> str:
        return (
            f"recipe={self.recipe.name!r}, size={self.size}, "
            f"original={self.original}, num_large={self.num_large}, "
            f"num_small_crops={self.num_small_crops}, small_size={self.small_size}, "
            f"normalize={self.normalize}, out_dtype={OUT_DTYPES[self.out_dtype]}, "
            f"channels_last={self.channels_last}"
        )

    def forward(
        self, images: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """uint8 ``(B, 3, H, W)`` (or float32 in [0, 1]) → every view (the class docstring).

        Views are ``(B, 3, size, size)``, then ``(B, 3, small_size, small_size)``, in
        ``out_dtype`` on the input's device. ``generator``: a CPU ``torch.Generator`` to draw the
        parameters from instead of the global RNG.
        """
        return self.plan(images, generator=generator).take()

    def plan(
        self, images: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> PlannedViews:
        """Draw the parameters of every view of ``images`` now; compute views later, in parts.

        ``plan(x, generator=g).take()`` is ``self(x, generator=g)``, bit for bit, and draws the
        same random numbers; ``take(part)`` computes the views of ``images[part]`` only (what
        the embedding cache does per micro-batch, so the views of a whole batch never sit in
        memory at once).
        """
        _check_images(images)
        n, _, height, width = images.shape
        params = [self._sample(n, height, width, spec, generator) for spec, _ in self.views]
        self.last_params = params
        return PlannedViews(self, images, params)

    @torch.no_grad()
    def _compute(
        self, images: torch.Tensor, params: Sequence[ViewParams], count: int
    ) -> list[torch.Tensor]:
        """The first ``count`` views of ``images`` with the drawn ``params``."""
        # Autocast would run grid_sample and the blur in half precision: keep float32.
        with torch.autocast(images.device.type, enabled=False):
            x = images.float().div_(255) if images.dtype == torch.uint8 else images
            return [
                self._view(x, spec, side, p)
                for (spec, side), p in zip(self.views[:count], params[:count], strict=True)
            ]

    def _sample(
        self, n: int, height: int, width: int, spec: ViewSpec, generator: torch.Generator | None
    ) -> ViewParams:
        """One view's parameters, drawn on the CPU with one ``torch.rand`` of fixed size."""
        u = torch.rand(n, _N_RAND, generator=generator)
        mags = torch.tensor([spec.brightness, spec.contrast, spec.saturation])
        lo = torch.cat([(1 - mags).clamp(min=0), torch.tensor([-spec.hue])])
        hi = torch.cat([1 + mags, torch.tensor([spec.hue])])
        sigma_lo, sigma_hi = spec.blur_sigma
        return ViewParams(
            crop=_sample_crops(u, height, width, spec),
            flip=u[:, _FLIP] < spec.flip_p,
            jitter=u[:, _JITTER] < spec.jitter_p,
            jitter_factors=lo + (hi - lo) * u[:, _FACTORS],
            # The argsort of i.i.d. uniforms is a uniformly random permutation, one per image.
            jitter_order=u[:, _ORDER_KEYS].argsort(dim=1),
            gray=u[:, _GRAY] < spec.gray_p,
            blur=u[:, _BLUR] < spec.blur_p,
            blur_sigma=sigma_lo + (sigma_hi - sigma_lo) * u[:, _SIGMA],
            solarize=u[:, _SOLARIZE] < spec.solarize_p,
        )

    def _view(self, x: torch.Tensor, spec: ViewSpec, side: int, p: ViewParams) -> torch.Tensor:
        """One view of float32 ``x`` ``(B, 3, H, W)`` in [0, 1]: ``(B, 3, side, side)``."""
        n, _, height, width = x.shape
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        if n == 0:
            return x.new_empty(0, 3, side, side).to(dtype=self.out_dtype, memory_format=fmt)
        gx, gy = _crop_grid(p.crop, p.flip, height, width, side)
        gx, gy = gx.to(x.device, non_blocking=True), gy.to(x.device, non_blocking=True)
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
        # "border": a sample within half a pixel of the image edge takes the edge pixel, as in
        # interpolate, instead of fading to zero.
        v = F.grid_sample(
            x, grid, mode=self.recipe.interpolation, padding_mode="border", align_corners=False
        )
        if self.recipe.interpolation == "bicubic":
            v = v.clamp_(0, 1)  # bicubic overshoots; the colour ops assume [0, 1]
        v = color_jitter(v, p.jitter_factors, p.jitter_order, p.jitter)
        v = _apply_to(v, p.gray, lambda xs, i: rgb_to_gray(xs).expand(-1, 3, -1, -1).contiguous())
        k = spec.blur_kernel
        # sigma stays on the CPU: Kornia checks sigma > 0 on the host copy (no device sync).
        v = _apply_to(
            v,
            p.blur,
            lambda xs, i: kornia.filters.gaussian_blur2d(
                xs, (k, k), p.blur_sigma[i, None].expand(-1, 2), border_type="reflect"
            ),
        )
        t = spec.solarize_threshold
        v = _apply_to(v, p.solarize, lambda xs, i: torch.where(xs >= t, 1 - xs, xs))
        if self.normalize:
            v = v.sub_(self.mean.to(v.device)).div_(self.std.to(v.device))
        return v.to(dtype=self.out_dtype, memory_format=fmt)


def forward_groups(sides: Sequence[int]) -> list[list[int]]:
    """Which views a step runs through the network in one pass, from their sides: each view
    at the first view's side on its own (as the two-view step always has: BatchNorm sees each
    large view alone), and each run of smaller views of one side together (the small crops:
    one pass of ``count × batch`` images instead of ``count`` small ones)."""
    groups: list[list[int]] = []
    for i, side in enumerate(sides):
        joins = groups and side < sides[0] and sides[groups[-1][-1]] == side
        if joins:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _view_list(
    recipe: Recipe,
    size: int,
    num_large: int,
    large_scale: tuple[float, float] | None,
    original: bool,
) -> list[tuple[ViewSpec, int]]:
    """(pipeline, side) of the original (OBoW) and the large views: view1's, view2's, …"""
    specs = [recipe.view1, recipe.view2]
    if large_scale is not None:
        scale = _check_pair("large_scale", large_scale, 1.0)
        specs = [dataclasses.replace(spec, scale=scale) for spec in specs]
    views = [(ORIGINAL_VIEW, size)] if original else []
    return views + [(specs[i % 2], size) for i in range(num_large)]


def _check_count(name: str, count: object) -> None:
    if type(count) is not int or count < 0:  # bool is not a count
        raise UserError(f"{name} must be an int >= 0, got {count!r}")


def _check_size(name: str, size: object) -> int:
    if type(size) is not int or size < MIN_SIZE:  # rejects bool and float too
        raise UserError(f"{name} must be an int >= {MIN_SIZE} (pixels), got {size!r}")
    return size


def _check_images(images: object) -> None:
    if not isinstance(images, torch.Tensor):
        kind = type(images).__name__
        raise TypeError(f"images must be a torch.Tensor of shape (B, 3, H, W), got {kind}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.dtype not in (torch.uint8, torch.float32):
        raise ValueError(f"images must be uint8 or float32 in [0, 1], got {images.dtype}")


def build_augment(recipe: str | Recipe, size: int, **kwargs: Any) -> ViewAugment:
    """:class:`ViewAugment` for a recipe name in :data:`RECIPES`, or a :class:`Recipe`.

    ``kwargs`` go to :class:`ViewAugment`: ``mean``, ``std``, ``num_large``, ``large_scale``,
    ``num_small_crops``, ``small_size``, ``small_scale``, ``original``, ``out_dtype``,
    ``channels_last``.
    """
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            choices = ", ".join(RECIPES)
            raise UserError(f"unknown augmentation recipe {recipe!r}; choose one of {choices}")
        recipe = RECIPES[recipe]
    return ViewAugment(recipe, size, **kwargs)


__all__ = [
    "GRAY_WEIGHTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ORIGINAL_VIEW",
    "RECIPES",
    "PlannedViews",
    "Recipe",
    "ViewAugment",
    "ViewParams",
    "ViewSpec",
    "adjust_hue",
    "build_augment",
    "color_jitter",
    "forward_groups",
    "rgb_to_gray",
]
