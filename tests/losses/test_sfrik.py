"""SFRIKLoss against a reference written from the paper's closed forms (float64)."""

import pytest
import torch

from lowres_ssl.losses import GaussianKernel, SFRIKKernel, SFRIKLoss, build_objective


def reference_mmd(zhat: torch.Tensor, b=(1.0, 40.0, 40.0)) -> torch.Tensor:
    """(1/n²)Σ ψ(G) with ψ = b1·t + b2·P2 + b3·P3 written out (P2, P3 closed forms)."""
    q = zhat.shape[1]
    t = zhat @ zhat.T
    p2 = (q * t**2 - 1) / (q - 1)
    p3 = ((q + 2) * t**3 - 3 * t) / (q - 1)
    return (b[0] * t + b[1] * p2 + b[2] * p3).mean()


def views(n=24, q=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, q, generator=g, dtype=dtype)
    z2 = z1 + 0.3 * torch.randn(n, q, generator=g, dtype=dtype)
    return z1.requires_grad_(), z2.requires_grad_()


def normalise(z):
    return z / z.norm(dim=1, keepdim=True)


def test_paper_form_matches_reference():
    z1, z2 = views()
    lam = 1.7
    got = SFRIKLoss(lam=lam)(z1, z2)
    a, b = normalise(z1), normalise(z2)
    want = ((a - b) ** 2).sum(1).mean() + lam / 2 * (reference_mmd(a) + reference_mmd(b))
    # float64 throughout: only summation order differs.
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    g_got = torch.autograd.grad(got, (z1, z2))
    g_want = torch.autograd.grad(want, (z1, z2))
    for x, y in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_official_coefficients_give_the_official_value():
    z1, z2 = views(q=32)
    sim, mmd = 4000.0, 1.0
    got = SFRIKLoss(sim_coeff=sim, mmd_coeff=mmd)(z1, z2)
    a, b = normalise(z1), normalise(z2)
    official = sim * ((a - b) ** 2).mean() + mmd * (reference_mmd(a) + reference_mmd(b)) / 2
    torch.testing.assert_close(got, official, rtol=1e-12, atol=0)
    # The same objective in the paper's form, scaled by sim/q, with λ = mmd·q/sim.
    q = z1.shape[1]
    paper = SFRIKLoss(lam=mmd * q / sim)(z1, z2)
    torch.testing.assert_close(got, sim / q * paper, rtol=1e-12, atol=0)


def test_default_lambda_is_the_papers():
    assert SFRIKLoss().lam == pytest.approx(8192 / 4000)


def test_terms_are_logged_and_detached():
    z1, z2 = views()
    loss_fn = SFRIKLoss(lam=3.0)
    loss = loss_fn(z1, z2)
    terms = loss_fn.terms
    assert set(terms) == {"invariance", "mmd"}
    assert not any(t.requires_grad for t in terms.values())
    torch.testing.assert_close(loss.detach(), terms["invariance"] + 3.0 * terms["mmd"])


def test_identical_views_have_zero_invariance_and_scale_does_not_matter():
    z1, _ = views()
    loss_fn = SFRIKLoss()
    base = loss_fn(z1, z1.detach().clone())
    assert loss_fn.terms["invariance"] == 0
    scaled = loss_fn(7.5 * z1, 7.5 * z1.detach())
    torch.testing.assert_close(base, scaled, rtol=1e-12, atol=0)


def test_gradcheck_float64():
    z1, z2 = views(n=6, q=5)
    for path in ("dense", "blocked"):
        loss_fn = SFRIKLoss(mmd_path=path, block_size=4)
        assert torch.autograd.gradcheck(loss_fn, (z1, z2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_computed_in_float32(dtype):
    z1, z2 = views(dtype=torch.float32)
    h1, h2 = z1.detach().to(dtype), z2.detach().to(dtype)
    got = SFRIKLoss()(h1, h2)
    assert got.dtype == torch.float32
    want = SFRIKLoss()(h1.float(), h2.float())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # same fp32 arithmetic
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_autocast = SFRIKLoss()(z1.detach(), z2.detach())
    assert in_autocast.dtype == torch.float32
    # fp32 inside autocast: equal to the fp32 loss up to fp32 summation order.
    plain = SFRIKLoss()(z1.detach(), z2.detach())
    torch.testing.assert_close(in_autocast, plain, rtol=1e-6, atol=0)


def test_other_kernels_plug_in():
    z1, z2 = views()
    a, b = normalise(z1), normalise(z2)
    kernel = GaussianKernel(2.0)
    got = SFRIKLoss(lam=1.0, kernel=kernel)(z1, z2)
    q = z1.shape[1]

    def gauss_mmd(x):
        return torch.exp(4.0 * (x @ x.T - 1)).mean() - kernel.b0(q)

    want = ((a - b) ** 2).sum(1).mean() + (gauss_mmd(a) + gauss_mmd(b)) / 2
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="not a mix"):
        SFRIKLoss(lam=1.0, sim_coeff=4000.0, mmd_coeff=1.0)
    with pytest.raises(ValueError, match="not a mix"):
        SFRIKLoss(sim_coeff=4000.0)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        SFRIKLoss(lam=-1.0)
    with pytest.raises(ValueError, match="same shape"):
        SFRIKLoss()(torch.randn(4, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="not positive definite"):
        SFRIKKernel((1.0, -2.0))


def test_registry_builds_by_name():
    assert isinstance(build_objective("sfrik", lam=1.0), SFRIKLoss)
    with pytest.raises(ValueError, match="choose one of sfrik"):
        build_objective("byol")


def test_the_default_lambda_follows_q_as_the_official_recipes():
    from lowres_ssl.losses import default_lam, objective_from_settings

    # λ = mmd·q/sim of the official recipes: sim 4000 up to q = 8192, 40000 at q = 32768.
    assert default_lam(2048) == pytest.approx(0.512)
    assert default_lam(8192) == pytest.approx(2.048)
    assert default_lam(32768) == pytest.approx(0.8192)
    assert default_lam(8192) > default_lam(16384) > default_lam(32768)  # between: interpolated
    assert objective_from_settings("sfrik", q=2048).lam == pytest.approx(0.512)
    assert objective_from_settings("sfrik", lam=1.5, q=2048).lam == 1.5  # a set λ is kept
    official = objective_from_settings("sfrik", q=2048, options={"sim_coeff": 1, "mmd_coeff": 1})
    assert official.lam is None
