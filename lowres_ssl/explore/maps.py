"""The embeddings in two dimensions: PCA always (the two leading eigenvectors of the features'
covariance, d × d, accumulated in blocks of rows, so 100,000 rows cost one pass); t-SNE on a
sample where scikit-learn is installed (``pip install -e ".[explore]"``). Drawn as coloured
points (matplotlib) and as a scatter of thumbnails (Pillow)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from lowres_ssl.eval.groups import normalised
from lowres_ssl.files import write_atomic

TSNE_SAMPLE = 3000


def pca_2d(features: Tensor, block: int = 8192) -> tuple[Tensor, list[float]]:
    """(n, 2) coordinates on the two principal axes of the normalised features, and the share
    of the variance each axis holds."""
    x = normalised(features).double()
    n, d = x.shape
    mean = x.mean(dim=0)
    cov = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, n, block):
        c = x[start : start + block] - mean
        cov += c.T @ c
    cov /= max(1, n - 1)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    axes = vectors[:, -2:].flip(1)
    total = float(values.clamp_min(0).sum()) or 1.0
    shares = [float(v) / total for v in values[-2:].flip(0)]
    xy = torch.cat([(x[s : s + block] - mean) @ axes for s in range(0, n, block)])
    return xy.float(), shares


def has_tsne() -> bool:
    return importlib.util.find_spec("sklearn") is not None


def tsne_2d(features: Tensor, rows: Tensor, seed: int = 0) -> Tensor:
    """t-SNE coordinates (len(rows), 2) of the rows given (scikit-learn; PCA to 50 first)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = normalised(features[rows]).numpy()
    if x.shape[1] > 50 and x.shape[0] > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    perplexity = float(min(30, max(2, (x.shape[0] - 1) // 3)))
    xy = TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity)
    return torch.from_numpy(xy.fit_transform(x)).float()


def scatter_png(
    xy: Tensor,
    colour_by: Tensor,
    names: list[str],
    path: Path,
    *,
    title: str,
    axes: tuple[str, str] = ("PC 1", "PC 2"),
) -> Path:
    """Points coloured by ``colour_by`` (indices into ``names``; a legend up to 20 of them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 7), dpi=100)
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    n = xy.shape[0]
    size = 12 if n <= 2000 else 4 if n <= 20000 else 1
    for c, name in enumerate(names):
        mask = colour_by == c
        if bool(mask.any()):
            ax.scatter(
                xy[mask, 0],
                xy[mask, 1],
                s=size,
                color=cmap(c % cmap.N),
                label=name,
                alpha=0.7,
                linewidths=0,
            )
    if len(names) <= 20:
        ax.legend(markerscale=max(1, 12 // size), fontsize=8, loc="best", framealpha=0.8)
    ax.set_title(title)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    fig.tight_layout()
    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def thumbnail_map(
    xy: Tensor, rows: Tensor, thumbnail, path: Path, *, side: int = 1400, tile: int = 48
) -> Path:
    """The images of ``rows`` placed at their 2-D coordinates on one square canvas (later rows
    drawn over earlier ones)."""
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    p = xy[rows]
    lo, hi = p.min(dim=0).values, p.max(dim=0).values
    scale = (side - tile) / (hi - lo).clamp_min(1e-12)
    for (x, y), i in zip(((p - lo) * scale).tolist(), rows.tolist(), strict=True):
        im = thumbnail(i).resize((tile, tile), Image.Resampling.BILINEAR)
        canvas.paste(im, (int(x), int(side - tile - y)))
    return write_atomic(path, lambda tmp: canvas.save(tmp, format="PNG"))


__all__ = ["TSNE_SAMPLE", "has_tsne", "pca_2d", "scatter_png", "thumbnail_map", "tsne_2d"]
