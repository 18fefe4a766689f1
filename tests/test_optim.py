"""Tests of lowres_ssl.optim: LARS (8- and 32-bit) against an independent float64 reference,
AdamW 8-bit against torch, checkpoints, the bitsandbytes fallback and the schedule.

The 8-bit tolerance (test_lars_8bit_matches_reference) is derived, not tuned:

* bitsandbytes stores ``mu`` in blocks of 256 values, each as a code of the signed dynamic map
  times the block's absmax ``A``. A value is stored as one of the two codes around it, so the
  stored error is at most ``delta * A`` with ``delta`` the widest gap of the map (0.0141, near
  +-1). Measured here on 2**18 random values: max 0.00705 A (nearly round-to-nearest, half a gap),
  mean 0.0028 A.
* bitsandbytes updates ``p`` with the fp32 ``mu_t = m Q(mu_{t-1}) + g_t`` and only then stores
  ``Q(mu_t)``. With the same gradients, the error ``e_s`` stored after step ``s`` reaches
  ``mu_t`` (t > s) as ``m^(t-s) e_s``, hence ``p_T`` as ``lr m^(t-s) e_s`` summed over t::

      |p8_T - p_T| <= lr * delta * sum_{s=1}^{T-1} c_s A_s,   c_s = m (1 - m^(T-s)) / (1 - m)

  with ``A_s`` the absmax of each element's block of the reference ``mu_s``. A factor 1.1 covers
  what the first-order bound leaves out (the 8-bit run's own ``A_s`` and ``||p||`` differ from
  the reference's by the error itself, a few %) and 1e-5 the fp32 arithmetic (measured 5e-7).
  The measured error is at most 0.43 of this bound (0.04 on average). Removing the trust ratio
  or adding the decay after it moves the 8-bit 2-D tensor by ~170 times the bound; applying LARS
  to the excluded 8-bit 1-D tensor moves it by ~13 times (the test asks for > 10).
"""

from __future__ import annotations

import importlib
import itertools
import math
import sys
import warnings

import pytest
import torch

import lowres_ssl
from lowres_ssl import optim
from lowres_ssl.errors import UserError
from lowres_ssl.optim import (
    LARS,
    OPTIMIZERS,
    CosineSchedule,
    StateFallbackWarning,
    build_optimizer,
    parameter_groups,
    scaled_lr,
    warmup_steps_for,
)

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional
except Exception:  # no usable bitsandbytes: the 8-bit tests are skipped, the fallback still runs
    bnb = None

needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not usable here")

STEPS = 20
BLOCK = 256  # bitsandbytes' block size for 8-bit optimizer state (optim/optimizer.py:691)

# Parameters of the LARS comparison: the big 2-D one has 8-bit state, the big 1-D one is excluded
# but also 8-bit (a BatchNorm over an 8192-wide projector), the small ones keep fp32 state.
SHAPES = [(64, 128), (8, 16), (128,), (8192,)]
EXCLUDED = [len(s) <= 1 for s in SHAPES]
# Decay comparable to the gradient (wd ||p|| ~ ||g||) and a trust ratio far from 1 (q ~ 0.1),
# so that each of the mistakes the test must catch changes the update by a large factor.
LARS_HP = {"lr": 0.5, "momentum": 0.9, "weight_decay": 0.01, "eta": 0.001}


def make_params(shapes: list[tuple[int, ...]] = SHAPES, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        x = 0.5 * torch.randn(s, generator=gen)
        if len(s) == 1:
            x = 1.0 + 0.1 * x  # like a normalisation weight
        out.append(x.requires_grad_())
    return out


def make_grads(shapes: list[tuple[int, ...]] = SHAPES, steps: int = STEPS, scale: float = 0.005):
    gen = torch.Generator().manual_seed(2)
    return [[scale * torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]


def run(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads, schedule=None, start=0):
    """Apply the given gradients (copies: LARS rescales p.grad in place), one step each."""
    for i, step_grads in enumerate(grads):
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        if schedule is not None:
            schedule.apply(opt, start + i)
        opt.step()
    return params


def reference_lars(
    params0, grads, *, lr, momentum, weight_decay, eta, excluded, trust=True, decay_first=True
):
    """LARS restated in float64 with plain loops; the flags build the wrong variants.

    Returns the final parameters and, per parameter, ``mu`` after every step.
    """
    ps = [p.detach().double().clone() for p in params0]
    mus = [torch.zeros_like(p) for p in ps]
    history: list[list[torch.Tensor]] = [[] for _ in ps]
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            p, d = ps[i], g.double().clone()
            if not excluded[i]:
                if decay_first:
                    d = d + weight_decay * p
                if trust:
                    p_norm = math.sqrt(float((p * p).sum()))
                    d_norm = math.sqrt(float((d * d).sum()))
                    d = d * (eta * p_norm / d_norm if p_norm > 0 and d_norm > 0 else 1.0)
                if not decay_first:
                    d = d + weight_decay * p
            mus[i] = momentum * mus[i] + d
            ps[i] = p - lr * mus[i]
            history[i].append(mus[i].clone())
    return ps, history


def quantisation_delta() -> tuple[float, float]:
    """(bound, measured): widest gap of the signed dynamic map; worst |Q(x) - x| / block absmax."""
    code = torch.sort(bnb_functional.create_dynamic_map(signed=True)).values
    bound = float((code[1:] - code[:-1]).max())
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(1 << 17, generator=gen), torch.randn(1 << 17, generator=gen) ** 3])
    q, qstate = bnb_functional.quantize_blockwise(x, blocksize=BLOCK)
    y = bnb_functional.dequantize_blockwise(q, qstate)
    absmax = x.view(-1, BLOCK).abs().amax(1, keepdim=True)
    measured = float(((y - x).view(-1, BLOCK).abs() / absmax).max())
    return bound, measured


def lars_8bit_tolerance(history: list[torch.Tensor], lr: float, m: float, delta: float):
    """Per-element bound on |p8_T - p_T| (module docstring), from the reference mu history."""
    steps = len(history)
    acc = torch.zeros(history[0].numel(), dtype=torch.float64)
    for s in range(1, steps):  # the state stored after step s is read by steps s+1..T
        flat = history[s - 1].flatten().abs()
        n = flat.numel()
        padded = torch.nn.functional.pad(flat, (0, (-n) % BLOCK))
        block_absmax = padded.view(-1, BLOCK).amax(1).repeat_interleave(BLOCK)[:n]
        acc += m * (1 - m ** (steps - s)) / (1 - m) * block_absmax
    return (1.1 * lr * delta * acc + 1e-5).view_as(history[0])


def state_dtype(opt: torch.optim.Optimizer, p: torch.Tensor) -> torch.dtype:
    return opt.state[p]["state1"].dtype


# ---------------------------------------------------------------------------------------------
# LARS
# ---------------------------------------------------------------------------------------------


@needs_bnb
def test_lars_8bit_matches_reference():
    grads = make_grads()
    params = make_params()
    opt = build_optimizer("lars", params, state_bits=8, **LARS_HP)
    assert type(opt).__name__ == "LARS8bit"
    run(opt, params, grads)
    # The two big tensors really have 8-bit state; the small ones keep fp32 state.
    assert [state_dtype(opt, p) for p in params] == [
        torch.uint8,
        torch.float32,
        torch.float32,
        torch.uint8,
    ]

    delta, measured = quantisation_delta()
    assert 0.0140 < delta < 0.0141 and 0.005 < measured <= delta

    hp = LARS_HP
    ref, history = reference_lars(make_params(), grads, excluded=EXCLUDED, **hp)
    wrong = {
        "no trust ratio": reference_lars(
            make_params(), grads, excluded=EXCLUDED, trust=False, **hp
        ),
        "decay after trust ratio": reference_lars(
            make_params(), grads, excluded=EXCLUDED, decay_first=False, **hp
        ),
        "nothing excluded": reference_lars(make_params(), grads, excluded=[False] * 4, **hp),
    }
    for i, p in enumerate(params):
        got = p.detach().double()
        if state_dtype(opt, p) == torch.float32:
            torch.testing.assert_close(got, ref[i], rtol=0, atol=1e-6)
            continue
        tol = lars_8bit_tolerance(history[i], hp["lr"], hp["momentum"], delta)
        err = (got - ref[i]).abs()
        assert bool((err <= tol).all()), f"param {i}: worst err/tol {float((err / tol).max()):.3f}"
        # The check has power: each mistake moves p by far more than the tolerance.
        for label, (bad, _) in wrong.items():
            if EXCLUDED[i] != (label == "nothing excluded"):
                continue  # each mistake touches only excluded or only non-excluded parameters
            ratio = float(((bad[i] - ref[i]).abs() / tol).max())
            assert ratio > 10, f"param {i}, {label}: only {ratio:.1f} x the tolerance"


_RIGHT_SCALE = optim.lars_scale_grad_  # kept before the test below patches the module


def _wrong_decay_after(p, grad, weight_decay, eta):
    _RIGHT_SCALE(p, grad, 0.0, eta)
    grad.add_(p, alpha=weight_decay)


def _wrong_no_trust_ratio(p, grad, weight_decay, eta):
    grad.add_(p, alpha=weight_decay)


@needs_bnb
@pytest.mark.parametrize("mistake", [_wrong_decay_after, _wrong_no_trust_ratio])
def test_lars_8bit_check_catches_broken_implementations(monkeypatch, mistake):
    # The same tolerance check as above, run on a deliberately broken 8-bit LARS.
    monkeypatch.setattr(optim, "lars_scale_grad_", mistake)
    grads = make_grads()
    params = make_params()
    run(build_optimizer("lars", params, state_bits=8, **LARS_HP), params, grads)
    ref, history = reference_lars(make_params(), grads, excluded=EXCLUDED, **LARS_HP)
    delta = quantisation_delta()[0]
    tol = lars_8bit_tolerance(history[0], LARS_HP["lr"], LARS_HP["momentum"], delta)
    assert float(((params[0].detach().double() - ref[0]).abs() / tol).max()) > 10


def test_lars_32bit_matches_reference():
    grads = make_grads()
    params = make_params()
    opt = build_optimizer("lars", params, state_bits=32, **LARS_HP)
    assert isinstance(opt, LARS)
    run(opt, params, grads)
    hp = LARS_HP
    ref, _ = reference_lars(make_params(), grads, excluded=EXCLUDED, **hp)
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.detach().double(), r, rtol=0, atol=1e-6)
    # Same check, wrong variant: it is far outside 1e-6.
    bad, _ = reference_lars(make_params(), grads, excluded=EXCLUDED, decay_first=False, **hp)
    assert float((params[0].detach().double() - bad[0]).abs().max()) > 1e-3


@pytest.mark.parametrize("state_bits", [32, pytest.param(8, marks=needs_bnb)])
def test_lars_excluded_params_are_plain_momentum_sgd(state_bits):
    # A bias and a small norm weight (fp32 state in both classes), in their own groups.
    shapes = [(128,), (16,)]
    grads = make_grads(shapes)
    params = make_params(shapes)
    groups = parameter_groups([*params, torch.ones(4, 4, requires_grad=True)], 0.5)
    assert [g["lars_exclude"] for g in groups] == [False, True]
    opt = build_optimizer(
        "lars", groups, lr=0.3, weight_decay=0.5, eta=0.001, state_bits=state_bits
    )
    run(opt, params, grads)
    plain = make_params(shapes)
    sgd = torch.optim.SGD(plain, lr=0.3, momentum=0.9)
    run(sgd, plain, grads)
    for p, q in zip(params, plain, strict=True):
        if state_bits == 32:
            assert torch.equal(p, q)  # literally torch's momentum SGD
        else:
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("state_bits", [32, pytest.param(8, marks=needs_bnb)])
def test_lars_trust_ratio_edge_cases(state_bits):
    lr, eta, wd = 0.1, 0.001, 0.1
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(64, 64, generator=gen)  # 4096 elements: 8-bit state in the 8-bit class
    w0 = 1.0 + torch.rand(64, 64, generator=gen)

    def one_step(p0, grad, weight_decay):
        p = p0.clone().requires_grad_()
        opt = build_optimizer(
            "lars", [p], lr=lr, weight_decay=weight_decay, eta=eta, state_bits=state_bits
        )
        p.grad = grad.clone()
        opt.step()
        return p.detach()

    # ||p|| = 0: q = 1, so the step is the raw gradient (decay of a zero tensor is zero).
    torch.testing.assert_close(one_step(torch.zeros(64, 64), g, wd), -lr * g, rtol=1e-6, atol=0)
    # ||g|| = 0 and no decay: q = 1 and nothing moves (no 0/0).
    assert torch.equal(one_step(w0, torch.zeros(64, 64), 0.0), w0)
    # ||g|| = 0 with decay: g' = wd p, q = eta / wd, so the step is lr eta p.
    torch.testing.assert_close(
        one_step(w0, torch.zeros(64, 64), wd), (1 - lr * eta) * w0, rtol=1e-6, atol=0
    )
    # Both zero: stays zero.
    assert torch.equal(one_step(torch.zeros(64, 64), torch.zeros(64, 64), wd), torch.zeros(64, 64))


@pytest.mark.parametrize("state_bits", [32, pytest.param(8, marks=needs_bnb)])
def test_lars_group_keys_and_hooks(state_bits):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64))
    # Instantiating the plain parent class makes torch wrap its step with the hook runner.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    if bnb is not None:
        bnb.optim.SGD8bit([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    opt = build_optimizer("lars", model, lr=0.2, weight_decay=1e-6, state_bits=state_bits)
    for group, excluded in zip(opt.param_groups, [False, True], strict=True):
        assert group["lars_exclude"] is excluded
        assert group["eta"] == 0.001 and group["momentum"] == 0.9 and group["lr"] == 0.2
        assert group["weight_decay"] == 0.0  # the inner optimizer never decays
        assert group["lars_weight_decay"] == (0.0 if excluded else 1e-6)
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append(1))
    model(torch.randn(8, 64)).sum().backward()
    opt.param_groups[0]["momentum"] = 0.5
    opt.step()
    assert calls == [1]  # each hook runs once, although both our step and the parent's are wrapped
    if state_bits == 8:
        assert opt.param_groups[0]["betas"] == (0.5, 0.0)  # momentum key reaches bitsandbytes
    opt.param_groups[0]["weight_decay"] = 0.1
    with pytest.raises(UserError, match="lars_weight_decay"):
        opt.step()


# ---------------------------------------------------------------------------------------------
# AdamW
# ---------------------------------------------------------------------------------------------


@needs_bnb
def test_adamw_8bit_matches_torch_adamw():
    """Tolerance: 5 % of the displacement norm for 8-bit state, 1e-6 for fp32 state.

    Adam's step m/sqrt(v) carries the error of both quantised moments, and a value far below its
    block's absmax has a large relative error, so no useful per-element bound exists; the
    displacement norm averages it. Measured 1.3 % (mean stored error 0.28 % of the block absmax,
    amplified by the ratio); 5 % leaves 4x for other platforms' rounding.
    """
    lr, wd = 1e-2, 0.1
    shapes = [(64, 128), (8, 16), (128,)]
    grads = make_grads(shapes, scale=0.01)
    p8, p32 = make_params(shapes), make_params(shapes)
    opt8 = build_optimizer("adamw", p8, lr=lr, weight_decay=wd, state_bits=8)
    opt32 = build_optimizer("adamw", p32, lr=lr, weight_decay=wd, state_bits=32)
    assert type(opt8).__name__ == "AdamW8bit" and type(opt32) is torch.optim.AdamW
    run(opt8, p8, grads)
    run(opt32, p32, grads)
    assert opt8.state[p8[0]]["state1"].dtype == torch.uint8
    assert opt8.state[p8[0]]["state2"].dtype == torch.uint8
    for a, b, p0 in zip(p8, p32, make_params(shapes), strict=True):
        moved = (b - p0).detach().norm()
        rel = float((a - b).detach().norm() / moved)
        assert rel < (0.05 if a.numel() >= optim.MIN_8BIT_SIZE else 1e-6), rel


@pytest.mark.parametrize("state_bits", [32, pytest.param(8, marks=needs_bnb)])
def test_adamw_no_decay_on_1d_params(state_bits):
    # With zero gradients AdamW only decays: p <- (1 - lr wd) p per step, exactly; 1-D untouched.
    lr, wd = 1e-2, 0.1
    shapes = [(64, 128), (128,), (8192,)]
    params = make_params(shapes)
    opt = build_optimizer("adamw", params, lr=lr, weight_decay=wd, state_bits=state_bits)
    run(opt, params, [[torch.zeros(s) for s in shapes]] * 5)
    p0 = make_params(shapes)
    torch.testing.assert_close(params[0], (1 - lr * wd) ** 5 * p0[0], rtol=1e-6, atol=0)
    assert torch.equal(params[1], p0[1]) and torch.equal(params[2], p0[2])


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,state_bits",
    [
        ("lars", 32),
        ("adamw", 32),
        pytest.param("lars", 8, marks=needs_bnb),
        pytest.param("adamw", 8, marks=needs_bnb),
    ],
)
def test_state_dict_round_trip_is_bitwise(tmp_path, name, state_bits):
    shapes = [(64, 128), (8192,), (16,)]
    grads = make_grads(shapes, steps=6)
    hp = {"lr": 0.05, "weight_decay": 0.01, "state_bits": state_bits}
    schedule = CosineSchedule(0.05, total_steps=6, warmup_steps=2)

    straight = make_params(shapes)
    opt = build_optimizer(name, straight, **hp)
    run(opt, straight, grads, schedule)

    first = make_params(shapes)
    opt1 = build_optimizer(name, first, **hp)
    run(opt1, first, grads[:3], schedule)
    torch.save(opt1.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)  # as accelerate loads it
    resumed = [p.detach().clone().requires_grad_() for p in first]
    opt2 = build_optimizer(name, resumed, **hp)
    opt2.load_state_dict(loaded)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt2.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in opt1.param_groups
    ]
    run(opt2, resumed, grads[3:], schedule, start=3)
    for a, b in zip(resumed, straight, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Fallback
# ---------------------------------------------------------------------------------------------


def _trains(opt: torch.optim.Optimizer, model: torch.nn.Module) -> bool:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 16, generator=gen)
    y = x @ torch.randn(16, 1, generator=gen)
    losses = []
    for _ in range(30):
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses[-1] < 0.5 * losses[0]


def test_fallback_when_import_fails(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise
    monkeypatch.setattr(optim, "_PROBED_OK", set())
    for name, lr, torch_cls in [("lars", 2.0, LARS), ("adamw", 0.05, torch.optim.AdamW)]:
        model = torch.nn.Linear(16, 1, bias=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = build_optimizer(name, model, lr=lr, weight_decay=0.0, eta=0.02, state_bits=8)
        fallback = [w for w in caught if issubclass(w.category, StateFallbackWarning)]
        assert len(fallback) == 1 and len(caught) == 1
        message = str(fallback[0].message)
        assert "ModuleNotFoundError" in message and "32-bit" in message and "\n" not in message
        assert type(opt) is torch_cls and "unavailable" in opt.description
        assert _trains(opt, model)


@needs_bnb
def test_fallback_when_first_use_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(bnb_functional, "optimizer_update_8bit_blockwise", broken)
    monkeypatch.setattr(optim, "_PROBED_OK", set())
    with pytest.warns(StateFallbackWarning, match="RuntimeError: no kernel") as caught:
        opt = build_optimizer("lars", torch.nn.Linear(16, 1), lr=0.1, weight_decay=0.0)
    assert len(caught) == 1 and isinstance(opt, LARS)


def test_state_bits_32_never_warns():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_optimizer("lars", torch.nn.Linear(4, 4), lr=0.1, weight_decay=0.0, state_bits=32)


# ---------------------------------------------------------------------------------------------
# Factory and parameter groups
# ---------------------------------------------------------------------------------------------


def test_unknown_optimizer_is_one_line_user_error():
    with pytest.raises(UserError) as info:
        build_optimizer("rmsprop", torch.nn.Linear(2, 2), lr=0.1, weight_decay=0.0)
    assert "lars, adamw, sgd" in str(info.value) and "\n" not in str(info.value)
    assert list(OPTIMIZERS) == ["lars", "adamw", "sgd"]


def test_sgd_is_momentum_sgd_and_its_8bit_state_tracks_the_32bit_one():
    """Fine-tuning's optimizer: mu <- m mu + g + wd p, p <- p - lr mu (float64 reference);
    8-bit momentum (a 64 x 64 weight: quantised blockwise) stays within 1 % of 32-bit."""
    torch.manual_seed(0)
    w0 = torch.randn(64, 64)
    grads = [torch.randn(64, 64) for _ in range(5)]
    runs = {}
    for bits in (32, 8):
        p = torch.nn.Parameter(w0.clone())
        opt = build_optimizer("sgd", [p], lr=0.1, weight_decay=0.01, momentum=0.9, state_bits=bits)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        runs[bits] = p.detach().clone()
        if bits == 8:
            assert "8-bit" in opt.description or "bitsandbytes unavailable" in opt.description
    ref, mu = w0.double(), torch.zeros(64, 64, dtype=torch.float64)
    for g in grads:
        mu = 0.9 * mu + g.double() + 0.01 * ref
        ref = ref - 0.1 * mu
    assert torch.allclose(runs[32].double(), ref, rtol=1e-5, atol=1e-5)
    moved = (ref - w0.double()).norm()
    assert (runs[8].double() - ref).norm() <= 0.01 * moved


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"state_bits": 4}, "8 or 32"),
        ({"momentum": 1.0}, "momentum"),
        ({"lr": -1.0}, "learning rate"),
        ({"eta": 0.0}, "eta"),
        ({"weight_decay": float("nan")}, "weight_decay"),
        ({"betas": (0.9, 1.0)}, "betas"),
    ],
)
def test_bad_values_are_user_errors(kwargs, match):
    args = {"lr": 0.1, "weight_decay": 0.0, **kwargs}
    with pytest.raises(UserError, match=match):
        build_optimizer("lars", torch.nn.Linear(2, 2), **args)


def test_parameter_groups_split_and_skip_frozen():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2)
    )
    model[2].weight.requires_grad_(False)
    decayed, excluded = parameter_groups(model, 1e-6)
    assert [id(p) for p in decayed["params"]] == [id(model[0].weight)]
    assert decayed["weight_decay"] == 1e-6
    expected = [model[0].bias, model[1].weight, model[1].bias, model[2].bias]
    assert [id(p) for p in excluded["params"]] == [id(p) for p in expected]
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"] is True
    with pytest.raises(UserError, match="no trainable"):
        parameter_groups(torch.nn.Linear(2, 2).requires_grad_(False), 0.0)


# ---------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------


def test_schedule_values():
    peak, total, warm = 2.0, 110, 10
    s = CosineSchedule(peak, total, warm, final_lr_ratio=0.001)
    floor = peak * 0.001
    assert s(0) == 0.0 and s(5) == pytest.approx(1.0) and s(warm) == pytest.approx(peak)
    assert s(60) == pytest.approx((peak + floor) / 2)  # cosine half-way: t = 0.5
    assert s(total) == pytest.approx(floor) and s(10 * total) == pytest.approx(floor)
    warmup = [s(i) for i in range(warm + 1)]
    cosine = [s(i) for i in range(warm, total + 1)]
    assert all(a < b for a, b in itertools.pairwise(warmup))
    assert all(a > b for a, b in itertools.pairwise(cosine))
    # VICReg's adjust_learning_rate, restated.
    for step in range(warm, total):
        q = 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
        assert s(step) == pytest.approx(peak * q + floor * (1 - q))
    assert scaled_lr(1.2, 512) == pytest.approx(2.4)
    assert CosineSchedule(1.0, 10, 0)(0) == 1.0  # no warm-up: starts at the peak
    with pytest.raises(UserError):
        CosineSchedule(1.0, 10, 10)
    with pytest.raises(UserError):
        s(-1)


def test_warmup_steps_for_short_runs():
    assert warmup_steps_for(1000 * 50, 50) == 500  # long run: the recipe's 10 epochs
    assert warmup_steps_for(100 * 50, 50) == 500  # 100 epochs: 10 epochs is exactly 10 %
    assert warmup_steps_for(20 * 50, 50) == 100  # 20 epochs: capped at 10 % of the steps
    assert warmup_steps_for(400, 40, warmup_epochs=0.5) == 20  # fractional epochs
    assert warmup_steps_for(5, 5) == 0  # too short for any warm-up
    assert warmup_steps_for(30, 10, warmup_epochs=0) == 0
    with pytest.raises(UserError):
        warmup_steps_for(0, 10)


@pytest.mark.parametrize("state_bits", [32, pytest.param(8, marks=needs_bnb)])
def test_schedule_apply_sets_every_group(state_bits):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64))
    for name in OPTIMIZERS:
        opt = build_optimizer(name, model, lr=1.0, weight_decay=0.0, state_bits=state_bits)
        opt.param_groups[1]["lr_scale"] = 0.1
        s = CosineSchedule(0.8, total_steps=100, warmup_steps=10)
        assert s.apply(opt, 10) == pytest.approx(0.8)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.8, 0.08])
        # The optimizers read group["lr"]: at lr(0) = 0 nothing moves.
        s.apply(opt, 0)
        before = [p.detach().clone() for p in model.parameters()]
        model(torch.randn(8, 64)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_paper_defaults():
    d = optim.SFRIK_RESNET18
    assert (d.optimizer, d.base_lr, d.reference_batch_size) == ("lars", 1.2, 256)
    assert (d.momentum, d.eta, d.weight_decay, d.warmup_epochs) == (0.9, 0.001, 1e-6, 10)
    assert d.final_lr_ratio == 0.001


def test_module_imports_without_bitsandbytes(monkeypatch):
    # bitsandbytes is imported lazily: a fresh import of the module must not need it.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setattr(lowres_ssl, "optim", optim)  # restored afterwards, like sys.modules
    monkeypatch.delitem(sys.modules, "lowres_ssl.optim")
    fresh = importlib.import_module("lowres_ssl.optim")
    assert fresh is not optim and fresh.LARS is not None
    with pytest.raises(ImportError):
        _ = fresh.LARS8bit


@pytest.mark.parametrize("name", ["lars", "adamw", "sgd"])
@pytest.mark.parametrize("state_bits", [32, pytest.param(8, marks=needs_bnb)])
def test_channels_last_weights_keep_their_layout_and_values_across_a_step(name, state_bits):
    """bitsandbytes' 8-bit update made every channels_last weight plain contiguous at each
    step (the 8-bit and 32-bit optimizers then trained two layouts). The layout is kept now,
    and two steps on the same gradients give the values they give on contiguous weights."""
    torch.manual_seed(0)
    shapes = [(64, 16, 3, 3), (64, 64, 3, 3)]
    start = [torch.randn(s) * 0.1 for s in shapes]
    grads = [[torch.randn(s) * 0.01 for s in shapes] for _ in range(2)]
    results = []
    for layout in (torch.channels_last, torch.contiguous_format):
        weights = [torch.nn.Parameter(w.contiguous(memory_format=layout)) for w in start]
        opt = build_optimizer(name, weights, lr=0.1, weight_decay=1e-4, state_bits=state_bits)
        for step_grads in grads:
            for w, g in zip(weights, step_grads, strict=True):
                w.grad = g.contiguous(memory_format=layout)
            opt.step()
        assert all(w.is_contiguous(memory_format=layout) for w in weights)
        results.append([w.detach().clone() for w in weights])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
