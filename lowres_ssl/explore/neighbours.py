"""Nearest neighbours by cosine similarity: faiss where it is installed (``pip install -e
".[explore]"``: an exact inner-product index, its BLAS kernels multi-threaded), else the exact
blocked matrix products of :func:`lowres_ssl.eval.groups.nearest`. Both are exact, so they give
the same neighbours (up to ties); :func:`backend` says which one runs."""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from lowres_ssl.eval.groups import nearest, normalised

BACKENDS = ("auto", "faiss", "torch")


def backend(choice: str = "auto") -> str:
    """The backend that :func:`search` uses for ``choice`` (auto: faiss when installed)."""
    if choice not in BACKENDS:
        raise ValueError(f"unknown neighbour backend {choice!r}; choose one of {BACKENDS}")
    if choice == "auto":
        return "faiss" if importlib.util.find_spec("faiss") is not None else "torch"
    return choice


def search(
    features: Tensor,
    k: int,
    *,
    queries: Tensor | None = None,
    rows: Tensor | None = None,
    using: str = "auto",
) -> tuple[Tensor, Tensor]:
    """(similarities, indices), each (q, k) on the CPU: the ``k`` rows of ``features`` most
    similar to each query, most similar first. The queries are ``queries`` (other vectors), or
    the rows ``rows`` of ``features`` (default: every row), each leaving itself out."""
    n = features.shape[0]
    if queries is not None:
        return _search(features, queries, min(k, n), backend(using))
    rows = torch.arange(n) if rows is None else torch.as_tensor(rows).long().cpu()
    k = min(k, n - 1)
    if k <= 0:
        return torch.zeros(len(rows), 0), torch.zeros(len(rows), 0, dtype=torch.long)
    sims, idx = _search(features, features[rows], k + 1, backend(using))
    # Leave each row out of its own list: where it is not among the k + 1 (exact copies tie
    # with it), the last one goes instead.
    is_self = idx == rows[:, None]
    drop = torch.where(is_self.any(dim=1), is_self.float().argmax(dim=1), torch.tensor(k))
    keep = torch.ones_like(is_self)
    keep[torch.arange(len(rows)), drop] = False
    return sims[keep].view(-1, k), idx[keep].view(-1, k)


def _search(features: Tensor, queries: Tensor, k: int, using: str) -> tuple[Tensor, Tensor]:
    if using == "torch":
        sims, idx = nearest(features, k, queries=queries)
        return sims.cpu(), idx.cpu()
    import faiss

    base = normalised(features).cpu().contiguous().numpy()
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    sims, idx = index.search(normalised(queries).cpu().contiguous().numpy(), k)
    return torch.from_numpy(sims), torch.from_numpy(idx).long()


__all__ = ["BACKENDS", "backend", "search"]
