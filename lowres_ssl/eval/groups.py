"""What a set of embeddings says about its images: nearest neighbours, groups, near-duplicates
and how well the groups match labels (the explorer's arithmetic, torch only).

Everything works on L2-normalised features, so a dot product is a cosine similarity, in
blocks of rows so that memory stays bounded for 100,000 images (a block of ``block`` rows
against all ``n`` is ``block × n`` floats).

- :func:`nearest`: exact top-k cosine neighbours (blocked matrix products).
- :func:`kmeans`: spherical k-means in mini-batches (Sculley, "Web-scale k-means
  clustering", WWW 2010: per-centre learning rates 1/count), k-means++ seeding on a sample,
  then a final full assignment.
- :func:`near_duplicates`: every pair above a cosine threshold.
- :func:`adjusted_rand_index`, :func:`purity`: groups against labels (Hubert & Arabie 1985).

torch rather than scikit-learn: the features are already tensors (on the GPU where there is
one), and the blocked products are the same code as the kNN evaluation's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def normalised(features: Tensor) -> Tensor:
    return torch.nn.functional.normalize(features.float(), dim=1)


def nearest(features: Tensor, k: int, *, queries: Tensor | None = None, block: int = 1024):
    """(similarities, indices), each (q, k): the ``k`` most similar rows of ``features`` to each
    query (default: every row, itself left out), by cosine, most similar first."""
    base = normalised(features)
    own = queries is None
    q = base if own else normalised(queries)
    k = min(k, base.shape[0] - (1 if own else 0))
    sims, idx = [], []
    for start in range(0, q.shape[0], block):
        s = q[start : start + block] @ base.T
        if own:
            rows = torch.arange(start, start + s.shape[0], device=s.device)
            s[rows - start, rows] = -math.inf
        top = s.topk(k, dim=1)
        sims.append(top.values)
        idx.append(top.indices)
    return torch.cat(sims), torch.cat(idx)


def near_duplicates(
    features: Tensor, threshold: float, *, limit: int | None = None, block: int = 1024
) -> tuple[list[tuple[int, int, float]], int]:
    """(pairs, total): the ``limit`` most similar pairs (i, j, similarity) with i < j and
    cosine ≥ ``threshold``, most similar first (all of them with no limit), and how many pairs
    are above the threshold in all.

    Each block of rows is compared with the rows from its own first one on (the upper
    triangle: half the products of the full matrix), into one buffer reused for every block;
    memory stays bounded when nearly every pair is above the threshold (an untrained
    backbone): each block keeps its ``limit`` best."""
    base = normalised(features)
    n = base.shape[0]
    values: list[Tensor] = []
    rows_kept: list[Tensor] = []
    cols_kept: list[Tensor] = []
    kept, total = 0, 0
    buffer = torch.empty(min(block, n) * n, device=base.device)
    for start in range(0, n, block):
        stop = min(n, start + block)
        b, width = stop - start, n - start
        s = buffer[: b * width].view(b, width)
        torch.mm(base[start:stop], base[start:].T, out=s)
        lower = torch.ones(b, b, dtype=torch.bool, device=s.device).tril_()
        s[:, :b].masked_fill_(lower, -math.inf)  # j ≤ i
        hit = s >= threshold
        above = int(hit.sum())
        if above == 0:
            continue
        total += above
        if limit is not None and above > limit:
            v, where = _top_of_block(s.masked_fill_(~hit, -math.inf), limit)
        else:
            where = torch.nonzero(hit.view(-1)).flatten()
            v = s.view(-1)[where]
        values.append(v)
        rows_kept.append(where // width + start)
        cols_kept.append(where % width + start)
        kept += v.numel()
        if limit is not None and kept > 2 * limit:  # prune now and then, not every block
            values, rows_kept, cols_kept = _best(values, rows_kept, cols_kept, limit)
            kept = limit
    values, rows_kept, cols_kept = _best(values, rows_kept, cols_kept, limit)
    pairs = zip(rows_kept[0].tolist(), cols_kept[0].tolist(), values[0].tolist(), strict=True)
    return [(int(i), int(j), float(v)) for i, j, v in pairs], total


def _top_of_block(s: Tensor, limit: int, chunk: int = 2**22) -> tuple[Tensor, Tensor]:
    """The ``limit`` largest values of ``s`` and their flat indices, ``chunk`` elements at a
    time: a top-k over the whole block would allocate indices for all of it (1.2 GB for
    1,024 × 100,000)."""
    flat = s.view(-1)
    values, where = [], []
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk]
        top = part.topk(min(limit, part.numel()))
        values.append(top.values)
        where.append(top.indices + start)
    v, i = torch.cat(values), torch.cat(where)
    top = v.topk(min(limit, v.numel()))
    return top.values, i[top.indices]


def _best(values: list[Tensor], rows: list[Tensor], cols: list[Tensor], limit: int | None):
    """The kept pairs as one tensor each, most similar first, at most ``limit``."""
    if not values:
        empty = torch.zeros(0, dtype=torch.long)
        return [torch.zeros(0)], [empty], [empty]
    v, r, c = torch.cat(values), torch.cat(rows), torch.cat(cols)
    order = v.argsort(descending=True, stable=True)
    if limit is not None:
        order = order[:limit]
    return [v[order]], [r[order]], [c[order]]


def _assign(x: Tensor, centres: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """(group, cosine to its centre) of every row."""
    groups, sims = [], []
    for start in range(0, x.shape[0], block):
        s = x[start : start + block] @ centres.T
        best = s.max(dim=1)
        groups.append(best.indices)
        sims.append(best.values)
    return torch.cat(groups), torch.cat(sims)


def _seed(x: Tensor, k: int, gen: torch.Generator, sample: int) -> Tensor:
    """k-means++ on a sample of rows: each next centre drawn with probability ∝ its squared
    distance (2 − 2·cosine) to the nearest centre so far."""
    pick = torch.randperm(x.shape[0], generator=gen)[:sample].to(x.device)
    pool = x[pick]
    first = int(torch.randint(pool.shape[0], (1,), generator=gen))
    centres = [pool[first]]
    dist = (2 - 2 * pool @ pool[first]).clamp_min(0)
    for _ in range(1, k):
        weights = dist.cpu().double()
        if float(weights.sum()) <= 0:
            nxt = int(torch.randint(pool.shape[0], (1,), generator=gen))
        else:
            nxt = int(torch.multinomial(weights, 1, generator=gen))
        centres.append(pool[nxt])
        dist = torch.minimum(dist, (2 - 2 * pool @ pool[nxt]).clamp_min(0))
    return torch.stack(centres)


def kmeans(
    features: Tensor, k: int, *, steps: int = 100, batch: int = 4096, seed: int = 0,
    block: int = 4096, restarts: int = 3,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Spherical mini-batch k-means: (group of every row, cosine to its centre, centres).

    ``restarts`` runs from different seeds; the one whose rows are closest to their centres on
    average is kept. Every row ends in exactly one group (the final assignment is over all
    rows); memory is bounded by ``batch`` and ``block`` rows at a time.
    """
    x = normalised(features)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of rows ({n}), got {k}")
    best = None
    for attempt in range(max(1, restarts)):
        gen = torch.Generator().manual_seed(seed + 7919 * attempt)
        centres = _fit(x, k, steps, batch, gen)
        groups, sims = _assign(x, centres, block)
        if best is None or float(sims.mean()) > float(best[1].mean()):
            best = groups, sims, centres
    return best


def _fit(x: Tensor, k: int, steps: int, batch: int, gen: torch.Generator) -> Tensor:
    """The centres after ``steps`` mini-batches: each centre is the running mean of every row
    assigned to it so far (rate = its rows in this batch / all its rows), renormalised."""
    n = x.shape[0]
    centres = _seed(x, k, gen, sample=min(n, max(20 * k, 2048)))
    counts = torch.zeros(k, device=x.device)
    for _ in range(steps):
        rows = torch.randint(n, (min(batch, n),), generator=gen).to(x.device)
        xb = x[rows]
        groups = (xb @ centres.T).argmax(dim=1)
        here = torch.bincount(groups, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, groups, xb)
        counts += here
        rate = (here / counts.clamp_min(1))[:, None]
        means = sums / here.clamp_min(1)[:, None]
        centres = normalised(torch.where(here[:, None] > 0, (1 - rate) * centres + rate * means,
                                         centres))  # fmt: skip
    return centres


def _comb2(t: Tensor) -> Tensor:
    t = t.double()
    return t * (t - 1) / 2


def adjusted_rand_index(a: Tensor, b: Tensor) -> float:
    """The adjusted Rand index of two labellings of the same rows (1: the same partition;
    about 0: as good as chance), from their contingency table."""
    a, b = torch.as_tensor(a).long().cpu(), torch.as_tensor(b).long().cpu()
    if a.shape != b.shape:
        raise ValueError("the two labellings must have the same length")
    _, ai = a.unique(return_inverse=True)
    _, bi = b.unique(return_inverse=True)
    table = torch.zeros(int(ai.max()) + 1, int(bi.max()) + 1, dtype=torch.long)
    table.index_put_((ai, bi), torch.ones_like(ai), accumulate=True)
    index = float(_comb2(table).sum())
    rows, cols = float(_comb2(table.sum(1)).sum()), float(_comb2(table.sum(0)).sum())
    total = float(_comb2(torch.tensor(a.numel())))
    expected = rows * cols / total if total else 0.0
    best = (rows + cols) / 2
    if best == expected:  # one group on both sides, or every row its own
        return 1.0
    return (index - expected) / (best - expected)


def purity(groups: Tensor, labels: Tensor) -> float:
    """The share of rows whose label is their group's most common one."""
    groups, labels = torch.as_tensor(groups).long().cpu(), torch.as_tensor(labels).long().cpu()
    right = 0
    for g in groups.unique():
        right += int(torch.bincount(labels[groups == g]).max())
    return right / max(1, groups.numel())


__all__ = ["adjusted_rand_index", "kmeans", "near_duplicates", "nearest", "normalised", "purity"]
