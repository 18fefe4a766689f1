"""The two neighbour backends against brute force: the same neighbours, never the row itself
(exact copies included); and PCA against numpy's SVD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowres_ssl.explore.maps import pca_2d
from lowres_ssl.explore.neighbours import backend, search

BACKENDS = ["torch", pytest.param("faiss", marks=pytest.mark.skipif(
    backend() != "faiss", reason="faiss-cpu is not installed (the explore extra)"))]  # fmt: skip


def _brute(x: torch.Tensor, q: torch.Tensor | None, k: int):
    u = torch.nn.functional.normalize(x.double(), dim=1)
    s = (u if q is None else torch.nn.functional.normalize(q.double(), dim=1)) @ u.T
    if q is None:
        s.fill_diagonal_(-2)
    return s.topk(k, dim=1)


@pytest.mark.parametrize("using", BACKENDS)
def test_search_is_the_brute_force_top_k(using):
    x = torch.randn(300, 24, generator=torch.Generator().manual_seed(0))
    sims, idx = search(x, 6, using=using)
    ref = _brute(x, None, 6)
    assert torch.equal(idx, ref.indices)
    torch.testing.assert_close(sims.double(), ref.values, rtol=0, atol=1e-5)
    q = torch.randn(5, 24, generator=torch.Generator().manual_seed(1))
    qs, qi = search(x, 4, queries=q, using=using)
    assert torch.equal(qi, _brute(x, q, 4).indices) and qs.shape == (5, 4)


@pytest.mark.parametrize("using", BACKENDS)
def test_a_row_is_never_its_own_neighbour_even_beside_exact_copies(using):
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(2))
    x[10:20] = x[10]  # ten copies of one row: all tie with it
    _, idx = search(x, 12, using=using)
    assert not (idx == torch.arange(50)[:, None]).any()
    assert set(idx[10, :9].tolist()) == set(range(11, 20))  # its nine copies come first
    _, small = search(x[:3], 5, using=using)  # k capped at the other rows
    assert small.shape == (3, 2)


def test_pca_is_the_two_leading_components():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(400, 10, generator=gen) * torch.linspace(3, 0.5, 10)
    xy, shares = pca_2d(x, block=64)
    u = torch.nn.functional.normalize(x.double(), dim=1).numpy()
    c = u - u.mean(axis=0)
    _, s, vt = np.linalg.svd(c, full_matrices=False)
    want = c @ vt[:2].T
    for axis in range(2):  # the same up to the sign of each axis
        sign = np.sign(np.dot(want[:, axis], xy[:, axis].numpy()))
        np.testing.assert_allclose(xy[:, axis].numpy() * sign, want[:, axis], atol=1e-5)
    np.testing.assert_allclose(shares, (s[:2] ** 2 / (s**2).sum()), rtol=1e-6)
