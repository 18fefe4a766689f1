"""ViewAugment: recipe statistics, torchvision equivalence, shapes/dtypes and input checks.

Statistical tolerances are at least 4 standard errors (binomial: sqrt(p (1 - p) / n)), so each
check would fail for a random seed with probability < 1e-4; the seeds are fixed anyway. Numerical
tolerances are about 10x the largest deviation measured. Everything runs on the CPU with small
images (16-32 px).
"""

import math

import pytest
import torch
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from lowres_ssl.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RECIPES,
    Recipe,
    ViewAugment,
    ViewSpec,
    adjust_hue,
    build_augment,
    color_jitter,
)

N_STAT = 4000  # images per view in the statistics batch


def natural_image(h=32, w=32, seed=0) -> torch.Tensor:
    """A uint8 (3, h, w) stand-in for a decoded photo (no photo ships with the repo).

    Smooth colour gradients (every hue, many max-channel ties after quantisation), a gray patch
    (chroma 0), a saturated patch (values 0 and 255, so blends clip) and sensor-like noise.
    """
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    phase = torch.rand(3, 1, 1, generator=g) * 2 * math.pi
    img = 0.5 + 0.45 * torch.sin(4 * xx + 3 * yy + phase) * torch.cos(2 * yy - xx + phase / 2)
    img = img + 0.03 * torch.randn(3, h, w, generator=g)
    img[:, : h // 4, : w // 4] = 0.5  # gray
    img[:, -h // 4 :, -w // 4 :] = torch.tensor([1.0, 0.0, 0.05]).view(3, 1, 1)  # saturated red
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def colourful_batch(n, size, seed=0) -> torch.Tensor:
    """uint8 (n, 3, size, size) of random RGB pixels: no image or crop of one is gray."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def is_gray(v: torch.Tensor) -> torch.Tensor:
    """(B,) bool: R == G == B everywhere (the grayscale path gives bit-identical channels)."""
    return ((v[:, 0] == v[:, 1]) & (v[:, 1] == v[:, 2])).flatten(1).all(1)


def tv_jitter(img: torch.Tensor, factors, order) -> torch.Tensor:
    """torchvision.transforms.v2.functional reference for one image (3, H, W) in [0, 1]."""
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in order:
        img = ops[int(i)](img, float(factors[int(i)]))
    return img


@pytest.fixture(scope="module")
def vicreg_stats():
    """One big vicreg batch (16 px, no normalisation): the views and their recorded params."""
    aug = build_augment("vicreg", 16, mean=None)
    torch.manual_seed(1234)
    views = aug(colourful_batch(N_STAT, 16))
    return views, aug.last_params


def se_tol(p, n, k=4.0):
    return k * math.sqrt(p * (1 - p) / n)


# --- recipe statistics -----------------------------------------------------------------------


def test_grayscale_fraction_mask_and_pixels(vicreg_stats):
    views, params = vicreg_stats
    for v, p in zip(views, params, strict=True):
        # The recorded mask is exactly the set of views whose channels came out equal.
        assert torch.equal(is_gray(v), p.gray)
    frac = torch.cat([p.gray for p in params]).float().mean().item()
    # n = 8000 (both views): SE = 0.0045, so +-0.03 is 6.7 SE.
    assert abs(frac - 0.2) < 0.03


def test_blur_solarize_jitter_flip_fractions(vicreg_stats):
    _, (p1, p2) = vicreg_stats
    assert p1.blur.all()  # vicreg: view 1 always blurred
    assert not p1.solarize.any()  # ... and never solarized
    # n = 4000 per view; tolerances 4 SE (0.019 for p 0.1, 0.025 for 0.2/0.8, 0.032 for 0.5).
    assert abs(p2.blur.float().mean().item() - 0.1) < se_tol(0.1, N_STAT)
    assert abs(p2.solarize.float().mean().item() - 0.2) < se_tol(0.2, N_STAT)
    for p in (p1, p2):
        assert abs(p.jitter.float().mean().item() - 0.8) < se_tol(0.8, N_STAT)
        assert abs(p.flip.float().mean().item() - 0.5) < se_tol(0.5, N_STAT)
        assert ((p.blur_sigma >= 0.1) & (p.blur_sigma <= 2.0)).all()


def test_jitter_factor_ranges_and_per_image_order(vicreg_stats):
    _, params = vicreg_stats
    f = params[0].jitter_factors
    lo = torch.tensor([0.6, 0.6, 0.8, -0.1])
    hi = torch.tensor([1.4, 1.4, 1.2, 0.1])
    assert ((f >= lo) & (f <= hi)).all()
    assert (f.mean(0) - (lo + hi) / 2).abs().max() < 0.02  # uniform: SE <= 0.004
    order = params[0].jitter_order
    assert torch.equal(order.sort(1).values, torch.arange(4).expand_as(order))  # permutations
    # All 24 orders occur, each ~1/24 (n = 4000: SE = 0.0032, tolerance 0.013).
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.unique(codes, return_counts=True)[1].float() / N_STAT
    assert len(counts) == 24
    assert (counts - 1 / 24).abs().max() < se_tol(1 / 24, N_STAT)


def test_crop_boxes_within_recipe_bounds(vicreg_stats):
    """Area fraction in [0.08, 1] and aspect in [3/4, 4/3] up to rounding w, h to integers."""
    _, params = vicreg_stats
    for p in params:
        top, left, h, w = p.crop.double().unbind(1)
        assert ((top >= 0) & (left >= 0) & (top + h <= 16) & (left + w <= 16)).all()
        # The unrounded (w, h) torchvision draws lie within half a pixel of the rounded ones.
        assert ((w + 0.5) * (h + 0.5) >= 0.08 * 256).all()
        assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all()
        assert ((w - 0.5) / (h + 0.5) <= 4 / 3).all()


def test_crop_distribution_matches_torchvision():
    """Area-fraction and log-aspect means against torchvision's own get_params (32 x 32)."""
    n = 3000
    aug = build_augment("vicreg", 32, mean=None)
    torch.manual_seed(5)
    aug(colourful_batch(n, 32))
    _, _, h, w = aug.last_params[0].crop.double().unbind(1)
    ours_area, ours_aspect = (h * w / 1024).mean(), (w / h).log().mean()
    img = torch.zeros(1, 32, 32)
    tv = torch.tensor(
        [RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])[2:] for _ in range(n)],
        dtype=torch.float64,
    )
    tv_area, tv_aspect = (tv[:, 0] * tv[:, 1] / 1024).mean(), (tv[:, 1] / tv[:, 0]).log().mean()
    # SD(area) ~ 0.27, SD(log aspect) ~ 0.17: two-sample SE 0.007 and 0.0045; 4 SE.
    assert abs(ours_area - tv_area) < 0.028
    assert abs(ours_aspect - tv_aspect) < 0.018


def test_views_and_images_differ():
    aug = build_augment("vicreg", 32, mean=None)
    torch.manual_seed(0)
    same = natural_image().expand(16, -1, -1, -1)  # one image, 16 times
    v1, v2 = aug(same)
    p1, p2 = aug.last_params
    # Per-sample randomness: identical inputs give 16 distinct outputs and (almost surely) boxes.
    assert len(torch.unique(v1.flatten(1), dim=0)) == 16
    assert len(torch.unique(p1.crop, dim=0)) >= 15
    assert not torch.equal(p1.crop, p2.crop)
    # The two views of each image differ.
    assert ((v1 - v2).abs().flatten(1).amax(1) > 0.05).all()


# --- equivalence with torchvision ------------------------------------------------------------


def test_color_jitter_matches_torchvision_every_order():
    img = natural_image(32, 32).float() / 255
    factors = torch.tensor([1.3, 0.7, 1.25, 0.08])
    orders = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]])
    x = img.expand(4, -1, -1, -1).clone()
    got = color_jitter(x, factors.expand(4, -1), orders)
    for i in range(4):
        want = tv_jitter(img, factors, orders[i])
        # Measured: blends within 1.2e-7 (brightness exact), hue within 1.2e-6 of torchvision's
        # HSV round trip, the four chained within 8.3e-7; 1e-5 is a 10x margin.
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)


def test_color_jitter_per_image_factors_and_mask():
    g = torch.Generator().manual_seed(3)
    img = natural_image(24, 24, seed=1).float() / 255
    n = 12
    x = img.expand(n, -1, -1, -1).clone()
    lo = torch.tensor([0.6, 0.6, 0.6, -0.4])
    factors = lo + (torch.tensor([1.4, 1.4, 1.4, 0.4]) - lo) * torch.rand(n, 4, generator=g)
    order = torch.rand(n, 4, generator=g).argsort(1)
    applied = torch.arange(n) % 3 != 0
    got = color_jitter(x.clone(), factors, order, applied)
    for i in range(n):
        want = tv_jitter(img, factors[i], order[i]) if applied[i] else img
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)
    assert torch.equal(got[~applied], x[~applied])  # bit-exact pass-through


def test_adjust_hue_matches_torchvision_full_range():
    img = natural_image(16, 16, seed=2).float() / 255
    shifts = torch.linspace(-0.5, 0.5, 21)
    got = adjust_hue(img.expand(21, -1, -1, -1), shifts)
    for i, s in enumerate(shifts):
        torch.testing.assert_close(got[i], TF.adjust_hue(img, float(s)), atol=1e-5, rtol=0)


def test_pipeline_replays_with_torchvision():
    """Whole pipeline against torchvision, image by image, from the recorded params.

    The crop is the whole image at the same size (an exact copy), so this checks flip, jitter
    (per-image order), grayscale, blur (per-image sigma, 13 taps, reflect) and solarize and that
    each recorded flag matches what was done.
    """
    spec = ViewSpec(
        scale=(1.0, 1.0), ratio=(1.0, 1.0), saturation=0.4, hue=0.4, gray_p=0.3, blur_p=0.5,
        solarize_p=0.5,
    )  # fmt: skip
    aug = ViewAugment(Recipe("replay", spec, spec), 16, mean=None)
    batch = torch.stack([natural_image(16, 16, seed=s) for s in range(24)])
    torch.manual_seed(7)
    views = aug(batch)
    for v, p in zip(views, aug.last_params, strict=True):
        for flag in (p.flip, p.jitter, p.gray, p.blur, p.solarize):
            assert 0 < flag.sum() < 24  # both branches exercised
        for i in range(24):
            ref = batch[i].float() / 255
            if p.flip[i]:
                ref = TF.horizontal_flip(ref)
            if p.jitter[i]:
                ref = tv_jitter(ref, p.jitter_factors[i], p.jitter_order[i])
            if p.gray[i]:
                ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
            if p.blur[i]:
                s = float(p.blur_sigma[i])
                ref = TF.gaussian_blur(ref, [13, 13], [s, s])
            # Pixels within 1e-4 of the threshold may solarize either way: skip them.
            keep = (ref - 0.5).abs() > 1e-4
            if p.solarize[i]:
                ref = TF.solarize(ref, 0.5)
            torch.testing.assert_close(v[i][keep], ref[keep], atol=2e-5, rtol=0)


def test_crop_resize_flip_matches_torchvision_resized_crop():
    """The grid_sample crop equals TF.resized_crop (bilinear, no antialias) + flip.

    Compared where torchvision's source coordinate lies inside the crop: at a crop edge,
    upsampling interpolate clamps to the crop, while grid_sample reads the neighbouring image
    pixel (half a pixel away at most). Downsampled views match everywhere.
    """
    spec = ViewSpec(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
    side = 24
    aug = ViewAugment(Recipe("geometry", spec, spec), side, mean=None)
    batch = torch.stack([natural_image(32, 40, seed=s) for s in range(16)])  # not square
    torch.manual_seed(11)
    v1, _ = aug(batch)
    p = aug.last_params[0]
    j = torch.arange(side, dtype=torch.float64)
    for i in range(16):
        top, left, h, w = (int(c) for c in p.crop[i])
        ref = TF.resized_crop(
            batch[i].float() / 255, top, left, h, w, [side, side], antialias=False
        )
        src_y, src_x = (j + 0.5) * h / side - 0.5, (j + 0.5) * w / side - 0.5
        ok_y, ok_x = (src_y >= 0) & (src_y <= h - 1), (src_x >= 0) & (src_x <= w - 1)
        got = v1[i]
        if p.flip[i]:
            got = got.flip(-1)
        keep = (ok_y[:, None] & ok_x[None, :]).expand(3, -1, -1)
        assert keep.float().mean() > 0.7
        torch.testing.assert_close(got[keep], ref[keep], atol=1e-5, rtol=0)


def test_crop_without_resize_is_an_exact_copy():
    spec = ViewSpec(
        scale=(0.25, 0.25), ratio=(1.0, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0
    )
    aug = ViewAugment(Recipe("copy", spec, spec), 16, mean=None)
    batch = torch.stack([natural_image(32, 32, seed=s) for s in range(8)])
    torch.manual_seed(2)
    v1, _ = aug(batch)
    p = aug.last_params[0]
    assert (p.crop[:, 2:] == 16).all()
    for i in range(8):
        top, left = int(p.crop[i, 0]), int(p.crop[i, 1])
        want = batch[i, :, top : top + 16, left : left + 16].float() / 255
        got = v1[i].flip(-1) if p.flip[i] else v1[i]
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


# --- outputs, options, reproducibility ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_shapes_dtype_layout(dtype, channels_last):
    aug = build_augment("vicreg", 24, out_dtype=dtype, channels_last=channels_last)
    views = aug(colourful_batch(5, 32))
    assert len(views) == 2
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for v in views:
        assert v.shape == (5, 3, 24, 24)
        assert v.dtype == dtype
        assert v.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("mode", ["bicubic", "nearest"])
def test_other_interpolations(mode):
    recipe = Recipe("x", RECIPES["vicreg"].view1, RECIPES["vicreg"].view2, interpolation=mode)
    views = ViewAugment(recipe, 24, mean=None)(colourful_batch(8, 32))
    assert all(v.shape == (8, 3, 24, 24) and v.min() >= 0 and v.max() <= 1 for v in views)


def test_reduced_precision_is_a_final_cast():
    batch = colourful_batch(6, 32)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(4)
        out[dtype] = build_augment("vicreg", 32, out_dtype=dtype)(batch)
    for a, b in zip(out[torch.float32], out[torch.bfloat16], strict=True):
        assert torch.equal(a.to(torch.bfloat16), b)


def test_normalisation():
    batch = colourful_batch(8, 32)
    torch.manual_seed(9)
    raw = build_augment("cifar", 32, mean=None)(batch)
    torch.manual_seed(9)
    normed = build_augment("cifar", 32)(batch)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for r, n in zip(raw, normed, strict=True):
        assert r.min() >= 0 and r.max() <= 1
        torch.testing.assert_close(n, (r - mean) / std, atol=1e-6, rtol=0)


def test_multicrop_views():
    aug = build_augment("vicreg", 32, num_small_crops=3, mean=None)
    views = aug(colourful_batch(200, 32))
    assert [tuple(v.shape) for v in views] == [(200, 3, 32, 32)] * 2 + [(200, 3, 14, 14)] * 3
    assert len(aug.last_params) == 5
    for p in aug.last_params[2:]:
        _, _, h, w = p.crop.double().unbind(1)
        # small_scale (0.05, 0.14) of 32 x 32, up to rounding w and h.
        assert ((w + 0.5) * (h + 0.5) >= 0.05 * 1024).all()
        assert ((w - 0.5) * (h - 0.5) <= 0.14 * 1024).all()
    explicit = build_augment("vicreg", 32, num_small_crops=1, small_size=10)
    assert explicit(colourful_batch(2, 32))[2].shape == (2, 3, 10, 10)


def test_reproducible_under_manual_seed_and_generator():
    batch = colourful_batch(8, 32)
    aug = build_augment("vicreg", 32, num_small_crops=1)
    torch.manual_seed(42)
    a = aug(batch)
    torch.manual_seed(42)
    b = aug(batch)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    torch.manual_seed(43)
    c = aug(batch)
    assert not torch.equal(a[0], c[0])
    # A CPU generator instead of the global RNG: reproducible, and the global state is untouched.
    state = torch.get_rng_state()
    d = aug(batch, generator=torch.Generator().manual_seed(1))
    e = aug(batch, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(d, e, strict=True))
    assert torch.equal(torch.get_rng_state(), state)


def test_float_input_and_autocast_match_uint8():
    batch = colourful_batch(6, 32)
    aug = build_augment("vicreg", 32)
    torch.manual_seed(8)
    want = aug(batch)
    torch.manual_seed(8)
    got = aug(batch.float() / 255)
    torch.manual_seed(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_autocast = aug(batch)
    for w, g, ga in zip(want, got, got_autocast, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=0)
        assert torch.equal(ga, w)


def test_channels_last_and_strided_uint8_input():
    batch = colourful_batch(6, 32)
    aug = build_augment("vicreg", 32)
    torch.manual_seed(3)
    want = aug(batch)
    for other in (batch.contiguous(memory_format=torch.channels_last), batch[:, [0, 1, 2]]):
        torch.manual_seed(3)
        assert all(torch.equal(a, b) for a, b in zip(aug(other), want, strict=True))


def test_empty_batch():
    views = build_augment("vicreg", 16, num_small_crops=1)(colourful_batch(0, 16))
    assert [tuple(v.shape) for v in views] == [(0, 3, 16, 16), (0, 3, 16, 16), (0, 3, 8, 8)]


def test_recipes_as_specified():
    v1, v2 = RECIPES["vicreg"].view1, RECIPES["vicreg"].view2
    assert (v1.blur_p, v2.blur_p, v1.solarize_p, v2.solarize_p) == (1.0, 0.1, 0.0, 0.2)
    assert (v1.brightness, v1.contrast, v1.saturation, v1.hue, v1.jitter_p) == (
        0.4, 0.4, 0.2, 0.1, 0.8,
    )  # fmt: skip
    assert (v1.scale, v1.ratio, v1.flip_p, v1.gray_p) == ((0.08, 1.0), (3 / 4, 4 / 3), 0.5, 0.2)
    assert v1.blur_kernel == 13
    a = RECIPES["auh"]
    assert a.view1 == a.view2
    assert (a.view1.brightness, a.view1.contrast, a.view1.saturation, a.view1.hue) == (0.4,) * 4
    assert (a.view1.jitter_p, a.view1.gray_p, a.view1.blur_p, a.view1.solarize_p) == (1, 0.2, 0, 0)
    c1, c2 = RECIPES["cifar"].view1, RECIPES["cifar"].view2
    assert (c1.blur_p, c2.blur_p, c1.solarize_p, c2.solarize_p) == (0.0, 0.0, 0.0, 0.2)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: build_augment("simclr", 32), "choose one of vicreg, auh, cifar"),
        (lambda: build_augment("vicreg", 4), r"size must be an int >= 8"),
        (lambda: build_augment("vicreg", 32.0), r"size must be an int >= 8"),
        (lambda: build_augment("vicreg", 32, small_size=5), r"small_size must be an int >= 8"),
        (
            lambda: build_augment("vicreg", 32, out_dtype=torch.float64),
            "float32, bfloat16, float16",
        ),
        (lambda: build_augment("vicreg", 32, num_small_crops=-1), "num_small_crops"),
        (lambda: build_augment("vicreg", 32, small_scale=(0.2, 0.1)), "small_scale"),
        (lambda: build_augment("vicreg", 32, mean=(0.5, 0.5)), "mean and std"),
        (lambda: ViewSpec(gray_p=1.5), r"gray_p must be in \[0, 1\]"),
        (lambda: ViewSpec(hue=0.6), r"hue must be in \[0, 0.5\]"),
        (lambda: ViewSpec(scale=(0.0, 1.0)), "scale must be"),
        (lambda: Recipe("x", ViewSpec(), ViewSpec(), "area"), "bilinear, bicubic, nearest"),
        (lambda: ViewAugment("vicreg", 32), "must be a Recipe or one of vicreg, auh, cifar"),
        (
            lambda: ViewAugment(Recipe("x", ViewSpec(blur_p=1, blur_sigma=(1, 3)), ViewSpec()), 9),
            "blur sigma up to 3 needs views over 9 px",
        ),
    ],
)
def test_bad_configuration(make, match):
    with pytest.raises(ValueError, match=match) as info:
        make()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.rand(2, 3, 16, 16, dtype=torch.float64), r"uint8 or float32 .* got torch.float64"),
        (torch.rand(2, 3, 16, 16).half(), r"uint8 or float32"),
        (torch.zeros(3, 16, 16, dtype=torch.uint8), r"shape \(B, 3, H, W\), got \(3, 16, 16\)"),
        (torch.zeros(2, 1, 16, 16, dtype=torch.uint8), r"shape \(B, 3, H, W\)"),
    ],
)
def test_bad_input(images, match):
    aug = build_augment("vicreg", 16)
    with pytest.raises(ValueError, match=match) as info:
        aug(images)
    assert "\n" not in str(info.value)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        aug(images.numpy())


# --- the Kornia behaviour the module docstring relies on --------------------------------------


def test_kornia_facts_behind_the_design():
    """If this fails after a Kornia upgrade, revisit the module docstring (and maybe the design)."""
    import kornia.augmentation as K

    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    jitter = K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8)
    jitter(x)
    params = jitter._params
    assert params["order"].shape == (4,)  # one order for the whole batch
    assert params["brightness_factor"].shape == (16,)  # per-sample factors
    assert len(params["brightness_factor"].unique()) == 16
    assert params["batch_prob"].shape == (16,)  # the per-sample applied mask
    solarize = K.RandomSolarize(thresholds=(0.5, 0.5), additions=(0.0, 0.0), p=1.0)
    ramp = torch.tensor([0.0, 0.25, 0.4999, 0.5, 0.75, 1.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    torch.testing.assert_close(solarize(ramp), torch.where(ramp >= 0.5, 1 - ramp, ramp))
