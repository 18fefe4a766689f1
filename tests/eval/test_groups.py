"""The explorer's arithmetic against brute force: neighbours, near-duplicates, k-means, and the
adjusted Rand index against pair counting in float64."""

from __future__ import annotations

import itertools

import pytest
import torch

from lowres_ssl.eval.groups import (
    adjusted_rand_index,
    kmeans,
    near_duplicates,
    nearest,
    purity,
)


def _features(n=300, d=16, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _cosines(x):
    x = torch.nn.functional.normalize(x.double(), dim=1)
    return x @ x.T


def test_nearest_is_the_brute_force_top_k_without_itself():
    x = _features()
    sims, idx = nearest(x, 5, block=64)  # blocks that do not divide 300
    full = _cosines(x)
    full.fill_diagonal_(-2)
    ref = full.topk(5, dim=1)
    assert torch.equal(idx, ref.indices)
    torch.testing.assert_close(sims.double(), ref.values, rtol=0, atol=1e-5)
    q = _features(7, seed=1)
    _, qi = nearest(x, 3, queries=q)
    unit = torch.nn.functional.normalize
    qref = (unit(q.double(), dim=1) @ unit(x.double(), dim=1).T).topk(3, dim=1).indices
    assert torch.equal(qi, qref)


def test_near_duplicates_are_every_pair_above_the_threshold():
    x = _features(200)
    x[50] = x[10] * 3 + 1e-3  # a copy (scaled, nearly the same direction)
    x[120] = x[10]
    pairs, total = near_duplicates(x, 0.6, block=37)
    full = _cosines(x)
    want = {(i, j) for i, j in itertools.combinations(range(200), 2) if full[i, j] >= 0.6}
    assert {(i, j) for i, j, _ in pairs} == want and total == len(want)
    assert pairs[0][2] >= pairs[-1][2] and (10, 120) in {(i, j) for i, j, _ in pairs}


def test_near_duplicates_with_a_limit_keep_the_most_similar_pairs_and_count_them_all():
    x = _features(150, d=4)  # in 4 dimensions many pairs are above 0.5
    full = _cosines(x)
    above = sorted(
        ((float(full[i, j]), i, j) for i, j in itertools.combinations(range(150), 2)
         if full[i, j] >= 0.5),
        reverse=True,
    )  # fmt: skip
    assert len(above) > 1000
    pairs, total = near_duplicates(x, 0.5, limit=25, block=16)
    assert total == len(above) and len(pairs) == 25
    assert [(i, j) for i, j, _ in pairs] == [(i, j) for _, i, j in above[:25]]


def test_kmeans_finds_well_separated_groups_and_puts_every_row_in_one():
    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(6, 32, generator=gen), dim=1)
    truth = torch.arange(600) % 6
    x = centres[truth] + 0.05 * torch.randn(600, 32, generator=gen)
    groups, sims, found = kmeans(x, 6, steps=50, batch=128, seed=0)
    assert groups.shape == (600,) and found.shape == (6, 32)
    assert groups.min() >= 0 and groups.max() < 6
    assert adjusted_rand_index(groups, truth) == pytest.approx(1.0)
    assert purity(groups, truth) == 1.0
    assert torch.all(sims > 0.9)


def _ari_by_pairs(a, b):
    """The adjusted Rand index from its definition: agreements over all pairs, float64."""
    n = len(a)
    pairs = list(itertools.combinations(range(n), 2))
    same_a = [a[i] == a[j] for i, j in pairs]
    same_b = [b[i] == b[j] for i, j in pairs]
    both = sum(x and y for x, y in zip(same_a, same_b, strict=True))
    sa, sb, total = sum(same_a), sum(same_b), len(pairs)
    expected = sa * sb / total
    return (both - expected) / ((sa + sb) / 2 - expected)


@pytest.mark.parametrize("seed", range(5))
def test_the_adjusted_rand_index_is_the_pair_counting_definition(seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(4, (40,), generator=gen)
    b = torch.randint(5, (40,), generator=gen)
    assert adjusted_rand_index(a, b) == pytest.approx(_ari_by_pairs(a.tolist(), b.tolist()))
    assert adjusted_rand_index(a, (a + 3) % 7) == pytest.approx(1.0)  # names do not matter


def test_the_top_of_a_block_in_chunks_is_the_top_of_the_whole():
    from lowres_ssl.eval.groups import _top_of_block

    s = torch.randn(13, 17, generator=torch.Generator().manual_seed(4))
    v, where = _top_of_block(s, 20, chunk=7)  # chunks that do not divide 221
    ref = s.flatten().topk(20)
    assert torch.equal(v, ref.values) and torch.equal(where, ref.indices)
