"""Multi-crop objectives (``ViewLayout``) against float64 references written here from the
formulas of the official SFRIK code's two layouts, and two views against the two-view
formulas of before the generalisation, bit for bit."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lowres_ssl.losses import (
    BarlowTwinsLoss,
    SFRIKKernel,
    SFRIKLoss,
    SimCLRLoss,
    UniformityLoss,
    VICRegLoss,
    ViewLayout,
    objective_from_settings,
)
from lowres_ssl.losses.distributed import world_size
from tests.distributed_harness import run_distributed

F64 = torch.float64

# ---------------------------------------------------------------------------------------------
# References: explicit loops over the anchors ("general" views) and the other views.


def unit(z: Tensor) -> Tensor:
    return z / z.norm(dim=1, keepdim=True)


def anchors_of(layout: str, large: int, small: int) -> tuple[int, list[int]]:
    """(K, the anchors) of a layout: SwAV's large crops, or OBoW's original (view 0)."""
    if layout == "swav":
        return large + small, list(range(large))
    return 1 + large + small, [0]


def invariance_ref(z: list[Tensor], anchors: list[int], d) -> Tensor:
    """(1/|A|) Σ_a (1/(K−1)) Σ_{v≠a} d(z_a, z_v): SwAV's form; with A = {0}, OBoW's."""
    k = len(z)
    per_anchor = [sum(d(z[a], z[v]) for v in range(k) if v != a) / (k - 1) for a in anchors]
    return sum(per_anchor) / len(anchors)


def mmd_ref(zhat: Tensor, b=(1.0, 40.0, 40.0)) -> Tensor:
    """(1/n²) Σ_ij ψ(⟨ẑ_i, ẑ_j⟩), ψ = b1 t + b2 P2 + b3 P3 (Gegenbauer closed forms, P(1) = 1)."""
    q = zhat.shape[1]
    t = zhat @ zhat.T
    p2 = (q * t**2 - 1) / (q - 1)
    p3 = ((q + 2) * t**3 - 3 * t) / (q - 1)
    return (b[0] * t + b[1] * p2 + b[2] * p3).mean()


def sfrik_ref(views, anchors, reg_small, lam):
    z = [unit(v) for v in views]
    inv = invariance_ref(z, anchors, lambda x, y: ((x - y) ** 2).sum(dim=1).mean())
    reg = range(len(z)) if reg_small else anchors
    mmd = sum(mmd_ref(z[v]) for v in reg) / len(reg)
    return inv + lam * mmd


def vicreg_ref(views, anchors, reg_small, c=(25.0, 25.0, 1.0), eps=1e-4):
    inv = invariance_ref(views, anchors, lambda x, y: ((x - y) ** 2).mean())
    reg = list(range(len(views))) if reg_small else anchors

    def var_cov(z):
        n, q = z.shape
        zc = z - z.mean(dim=0)
        cov = zc.T @ zc / (n - 1)
        var = torch.relu(1 - torch.sqrt(cov.diagonal() + eps)).mean()
        off = sum(cov[i, j] ** 2 for i in range(q) for j in range(q) if i != j) / q
        return var, off

    stats = [var_cov(views[v]) for v in reg]
    variance = sum(s[0] for s in stats) / len(reg)
    covariance = 2 * sum(s[1] for s in stats) / len(reg)  # two views: c(z¹) + c(z²)
    return c[0] * inv + c[1] * variance + c[2] * covariance


def simclr_ref(views, anchors, temperature=0.2):
    """The multi-view NCE: for each anchor view c, every row (v, i), v ≠ c, has its positive
    (c, i) and its negatives (w, j), j ≠ i, in every view w; the mean over all (row, c)."""
    z = [unit(v) for v in views]
    k, n = len(z), z[0].shape[0]
    losses = []
    for c in anchors:
        for v in range(k):
            if v == c:
                continue
            for i in range(n):
                pos = (z[v][i] * z[c][i]).sum() / temperature
                neg = [(z[v][i] * z[w][j]).sum() / temperature
                       for w in range(k) for j in range(n) if j != i]  # fmt: skip
                logits = torch.stack([pos, *neg])
                losses.append(torch.logsumexp(logits, 0) - pos)
    return sum(losses) / len(losses)


def random_views(k: int, n: int = 10, q: int = 6, seed: int = 0) -> list[Tensor]:
    """K views of n images: a shared part plus noise, float64, requiring grad."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, q, generator=g, dtype=F64)
    return [(base + 0.5 * torch.randn(n, q, generator=g, dtype=F64)).requires_grad_()
            for _ in range(k)]  # fmt: skip


LAYOUTS = [("swav", 2, 0), ("swav", 2, 3), ("swav", 3, 2), ("obow", 1, 0), ("obow", 2, 3)]


def layout_of(kind, large, small, reg_small):
    return ViewLayout.of(kind, large, small, reg_small=reg_small)


def close(got: Tensor, want: Tensor, rtol: float = 1e-6) -> None:
    # float64 on both sides: the only difference is the order of the sums (~1e-15).
    assert abs(got.item() - want.item()) <= rtol * abs(want.item()), (got.item(), want.item())


@pytest.mark.parametrize("reg_small", [False, True])
@pytest.mark.parametrize(("kind", "large", "small"), LAYOUTS)
def test_sfrik_matches_the_reference(kind, large, small, reg_small):
    k, anchors = anchors_of(kind, large, small)
    views = random_views(k)
    lam = 0.7
    loss = SFRIKLoss(lam, SFRIKKernel(), layout=layout_of(kind, large, small, reg_small))
    got, want = loss(*views), sfrik_ref(views, anchors, reg_small, lam)
    close(got, want)
    g_got = torch.autograd.grad(got, views)
    g_want = torch.autograd.grad(want, views)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reg_small", [False, True])
@pytest.mark.parametrize(("kind", "large", "small"), LAYOUTS)
def test_vicreg_matches_the_reference(kind, large, small, reg_small):
    k, anchors = anchors_of(kind, large, small)
    views = random_views(k, seed=1)
    loss = VICRegLoss(layout=layout_of(kind, large, small, reg_small))
    close(loss(*views), vicreg_ref(views, anchors, reg_small))


@pytest.mark.parametrize(("kind", "large", "small"), LAYOUTS)
def test_simclr_matches_the_reference(kind, large, small):
    k, anchors = anchors_of(kind, large, small)
    views = random_views(k, n=5, seed=2)
    loss = SimCLRLoss(temperature=0.3, layout=layout_of(kind, large, small, False))
    got, want = loss(*views), simclr_ref(views, anchors, temperature=0.3)
    close(got, want)
    for a, b in zip(torch.autograd.grad(got, views), torch.autograd.grad(want, views), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_pair_weights_sum_to_one_and_count_anchor_pairs_twice():
    layout = ViewLayout.swav(2, 4)
    pairs = {(a, b): w for a, b, w in layout.pairs()}
    assert sum(pairs.values()) == pytest.approx(1.0)
    assert pairs[0, 1] == pytest.approx(2 / (2 * 5))  # both are anchors
    assert pairs[0, 2] == pytest.approx(1 / (2 * 5))
    assert (2, 3) not in pairs  # two small crops are never compared
    assert ViewLayout().pairs() == [(0, 1, 1.0)]
    assert ViewLayout.obow(2, 1).regularised == (0,)
    assert ViewLayout.obow(2, 1, reg_small=True).regularised == (0, 1, 2, 3)


def test_multicrop_objective_is_permutation_invariant_within_the_small_crops():
    views = random_views(6, seed=3)
    loss = SFRIKLoss(1.0, layout=ViewLayout.swav(2, 4, reg_small=True))
    shuffled = [views[0], views[1], views[5], views[3], views[2], views[4]]
    torch.testing.assert_close(loss(*views), loss(*shuffled), rtol=1e-12, atol=0)


def test_wrong_view_count_is_a_one_line_error():
    loss = SFRIKLoss(1.0, layout=ViewLayout.swav(2, 2))
    z = [torch.randn(4, 8) for _ in range(3)]
    with pytest.raises(ValueError, match=r"expects 4 views .* got 3") as err:
        loss(*z)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="same shape"):
        loss(torch.randn(4, 8), torch.randn(4, 8), torch.randn(3, 8), torch.randn(4, 8))
    for count, anchors in ((1, (0,)), (3, ()), (3, (3,)), (3, (1, 1))):
        with pytest.raises(ValueError):
            ViewLayout(count, anchors)


def test_settings_build_the_layout_into_every_objective():
    layout = ViewLayout.swav(2, 3)
    for name in ("sfrik", "vicreg", "barlow_twins", "uniformity", "simclr"):
        objective = objective_from_settings(name, layout=layout, q=64)
        assert objective.layout == layout
        value = objective(*(torch.randn(8, 64) for _ in range(5)))
        assert torch.isfinite(value)


# ---------------------------------------------------------------------------------------------
# Two views: the generalised objectives are the two-view formulas of before, bit for bit. The
# functions below are the two-view forward bodies as they were (float32, the same op order).


def old_sfrik(z1, z2, lam, kernel):
    from lowres_ssl.losses import mmd_to_uniform

    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    invariance = (z1 - z2).pow(2).sum(dim=1).mean()
    mmd = (mmd_to_uniform(z1, kernel, "auto", None) + mmd_to_uniform(z2, kernel, "auto", None)) / 2
    return invariance + lam * mmd


def old_vicreg(z1, z2, loss):
    invariance = (z1 - z2).pow(2).mean()
    (var1, cov1), (var2, cov2) = (loss._variance_covariance(v) for v in (z1, z2))
    return 25.0 * invariance + 25.0 * ((var1 + var2) / 2) + 1.0 * (cov1 + cov2)


def old_simclr(z1, z2, temperature):
    n = z1.shape[0]
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    candidates, anchors = torch.cat([z1, z2]), torch.cat([z1, z2])
    logits = anchors @ candidates.T / temperature
    rows = torch.arange(n)
    itself, positive = torch.cat([rows, rows + n]), torch.cat([rows + n, rows])
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[torch.arange(2 * n), itself] = True
    return F.cross_entropy(logits.masked_fill(is_self, float("-inf")), positive)


def old_barlow(z1, z2, loss):
    n = z1.shape[0]
    s1, s2 = loss._standardise(z1), loss._standardise(z2)
    c = s1.T @ s2 / n
    from lowres_ssl.losses.baselines import _off_diagonal_square_sum

    return (1 - c.diagonal()).pow(2).sum() + 0.0051 * _off_diagonal_square_sum(c)


def old_uniformity(z1, z2, loss):
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    alignment = (z1 - z2).pow(2).sum(dim=1).mean()
    return 1.0 * alignment + 1.0 * ((loss._uniformity(z1) + loss._uniformity(z2)) / 2)


def test_two_views_are_bit_identical_to_the_two_view_formulas():
    g = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(64, 256, generator=g), torch.randn(64, 256, generator=g)
    sfrik = SFRIKLoss(0.9)
    assert torch.equal(sfrik(z1, z2), old_sfrik(z1, z2, 0.9, sfrik.kernel))
    vicreg = VICRegLoss()
    assert torch.equal(vicreg(z1, z2), old_vicreg(z1, z2, vicreg))
    assert torch.equal(SimCLRLoss(0.2)(z1, z2), old_simclr(z1, z2, 0.2))
    barlow = BarlowTwinsLoss()
    assert torch.equal(barlow(z1, z2), old_barlow(z1, z2, barlow))
    uniformity = UniformityLoss()
    assert torch.equal(uniformity(z1, z2), old_uniformity(z1, z2, uniformity))
    # A two-view layout built by name is the default one.
    assert ViewLayout.swav(2, 0) == ViewLayout()


# ---------------------------------------------------------------------------------------------
# Two processes: every view group's batch statistics over both processes' rows.


def _worker(rank: int, world: int) -> dict:
    assert world_size() == world
    views = random_views(5, n=8, q=6, seed=9)
    layout = ViewLayout.swav(2, 3, reg_small=True)
    out = {}
    for name, loss in (
        ("sfrik", SFRIKLoss(0.8, layout=layout)),
        ("simclr", SimCLRLoss(0.5, layout=layout)),
        ("vicreg", VICRegLoss(layout=layout)),
    ):
        local = [v[rank * 4 : (rank + 1) * 4].detach().requires_grad_() for v in views]
        value = loss(*local)
        value.backward()
        out[name] = (value.item(), [v.grad for v in local])
    return out


@pytest.fixture(scope="module")
def two_processes() -> list[dict]:
    return run_distributed(_worker, 2)


@pytest.mark.parametrize("name", ["sfrik", "simclr", "vicreg"])
def test_two_processes_equal_one(two_processes, name):
    results = two_processes
    views = random_views(5, n=8, q=6, seed=9)
    layout = ViewLayout.swav(2, 3, reg_small=True)
    loss = {"sfrik": SFRIKLoss(0.8, layout=layout), "simclr": SimCLRLoss(0.5, layout=layout),
            "vicreg": VICRegLoss(layout=layout)}[name]  # fmt: skip
    whole = loss(*views)
    grads = torch.autograd.grad(whole, views)
    mean = sum(r[name][0] for r in results) / 2
    assert mean == pytest.approx(whole.item(), rel=1e-10)
    for v, g in enumerate(grads):
        # DDP averages the processes' gradients: each process holds 2× its rows' share.
        got = torch.cat([results[r][name][1][v] for r in range(2)]) / 2
        torch.testing.assert_close(got, g, rtol=1e-9, atol=1e-12)


def test_every_pair_is_compared_once():
    layout = ViewLayout.swav(3, 2)
    pairs = [(a, b) for a, b, _ in layout.pairs()]
    assert len(pairs) == len(set(pairs))
    expected = {(a, b) for a, b in itertools.combinations(range(5), 2) if a < 3}
    assert set(pairs) == expected
