"""The explorer: what a backbone learned about a folder of images, as files and one static page.

>>> explore("runs/photos", "~/photos", "runs/photos/explore")  # doctest: +SKIP

One pass of the backbone over the folder (:mod:`.embeddings`), then steps that each read the
embeddings and write their own files into ``out``: nearest-neighbour sheets, k-means groups
(``clusters.csv``, a sheet per group, optionally a folder of links per group), near-duplicate
pairs, a 2-D map, and — for a folder of class subfolders — how the groups match the classes.
``explore.json`` holds the figures and ``index.html`` shows them (docs/explore.md).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lowres_ssl.errors import UserError
from lowres_ssl.eval.context import InferenceContext
from lowres_ssl.eval.evaluate import backbone_to_evaluate
from lowres_ssl.eval.groups import adjusted_rand_index, kmeans, near_duplicates, purity
from lowres_ssl.eval.knn import knn_evaluate
from lowres_ssl.files import write_atomic, write_text_atomic
from lowres_ssl.weights import state_sha256

from .clock import StepClock
from .embeddings import Embedded, embed_folder, embed_image, write_embeddings
from .maps import TSNE_SAMPLE, has_tsne, pca_2d, scatter_png, thumbnail_map, tsne_2d
from .neighbours import backend, search
from .page import write_page
from .sheets import QUERY_FRAME, Thumbnails, Tile, draw_sheet, short

log = logging.getLogger("lowres_ssl")

GROUP_SHEET = 24  # images nearest the centre on a group's sheet
DUPLICATE_SHEET = 12  # pairs on the duplicates sheet
MAP_THUMBNAILS = 400
KNN_K = 20
MAX_GROUPS = 100


def default_groups(n: int, classes: int) -> int:
    """The number of classes where there are labels, else √(n/2) between 2 and 100 (a group
    per ~50 images of a 5,000-image folder, 100 for 20,000 and more)."""
    if classes >= 2:
        return min(classes, n)
    return max(1, min(n, max(2, min(MAX_GROUPS, round(math.sqrt(n / 2))))))


def _write_csv(path: Path, header: Sequence[str], rows) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)

    return write_atomic(path, write)


def _caption(e: Embedded, i: int, sim: float | None = None) -> str:
    first = f"{sim:.3f}" if sim is not None else short(e.paths[i])
    if e.labels is not None:
        return f"{first}\n{short(e.classes[int(e.labels[i])])}"
    return first if sim is None else f"{first}\n{short(e.paths[i])}"


def _pair_caption(e: Embedded, i: int, similarity: str = "") -> str:
    """A near-duplicate's caption: the pair's similarity (on its first image) and the class,
    then the file, so a photo filed under two classes shows as such."""
    first = similarity
    if e.labels is not None:  # the class shortened, never the similarity
        room = 18 - len(first) - (1 if first else 0)
        first = f"{first} {short(e.classes[int(e.labels[i])], room)}".strip()
    return f"{first}\n{short(e.paths[i])}"


# ---------------------------------------------------------------------------------------------
# The steps: each reads the embeddings and writes its own files.


def neighbour_sheets(
    e: Embedded, thumbs: Thumbnails, out: Path, *, k: int, queries: int, using: str, seed: int
) -> dict:
    """``neighbours.png`` (each row: a sampled query and its k nearest) and ``neighbours.csv``."""
    n = len(e)
    gen = torch.Generator().manual_seed(seed)
    picked = torch.randperm(n, generator=gen)[: min(queries, n)].sort().values
    sims, idx = search(e.features, k, rows=picked, using=using)
    rows, lines = [], []
    for n_q, q in enumerate(picked.tolist()):
        row = [Tile(thumbs(q), _caption(e, q), frame=QUERY_FRAME)]
        pairs = zip(idx[n_q].tolist(), sims[n_q].tolist(), strict=True)
        for rank, (j, s) in enumerate(pairs, 1):
            row.append(Tile(thumbs(j), _caption(e, j, s)))
            lines.append([e.paths[q], rank, e.paths[j], f"{s:.6f}"])
        rows.append(row)
    title = f"{len(picked)} images (framed) and their {idx.shape[1]} nearest by cosine similarity"
    draw_sheet(rows, out / "neighbours.png", title=title)
    _write_csv(out / "neighbours.csv", ["query", "rank", "neighbour", "similarity"], lines)
    return {
        "k": int(idx.shape[1]),
        "queries": len(picked),
        "sheet": "neighbours.png",
        "csv": "neighbours.csv",
    }


def query_sheets(
    e: Embedded,
    thumbs: Thumbnails,
    out: Path,
    net,
    images: Sequence[str],
    *,
    k: int,
    size: int,
    context: InferenceContext,
    using: str,
) -> list[dict]:
    """A sheet per ``--query`` image (a file anywhere): it and its k nearest in the folder,
    found for all the queries in one search (one pass over the features, one faiss index)."""
    if not images:
        return []
    queries = torch.stack([embed_image(net, p, size=size, context=context) for p in images])
    sims, idx = search(e.features, k, queries=queries, using=using)
    made = []
    for n, path in enumerate(images):
        row = [
            Tile(thumbs.of_file(Path(path).expanduser()), short(Path(path).name), frame=QUERY_FRAME)
        ]
        row += [
            Tile(thumbs(j), _caption(e, j, s))
            for j, s in zip(idx[n].tolist(), sims[n].tolist(), strict=True)
        ]
        name = f"query_{n:02d}_{Path(path).stem[:40]}.png"
        draw_sheet([row], out / name, title=f"{path} and its {idx.shape[1]} nearest")
        made.append({"query": str(path), "sheet": name})
    return made


def group_outputs(
    e: Embedded, thumbs: Thumbnails, out: Path, *, groups: int, seed: int
) -> tuple[dict, Tensor]:
    """k-means groups, numbered from the largest: ``clusters.csv`` (path, group, distance to
    the centre = 1 − cosine, and the class where there are labels) and ``groups/group_NN.png``
    (the images nearest each centre)."""
    found, sims, _ = kmeans(e.features, groups, seed=seed)
    sizes = torch.bincount(found, minlength=groups)
    order = sizes.argsort(descending=True, stable=True)
    renumber = torch.empty_like(order)
    renumber[order] = torch.arange(groups)
    found, sizes = renumber[found], sizes[order]
    header = ["path", "group", "distance"] + (["class"] if e.labels is not None else [])
    rows = []
    for i in range(len(e)):
        row = [e.paths[i], int(found[i]), f"{1 - float(sims[i]):.6f}"]
        if e.labels is not None:
            row.append(e.classes[int(e.labels[i])])
        rows.append(row)
    _write_csv(out / "clusters.csv", header, rows)
    folder = out / "groups"
    folder.mkdir(exist_ok=True)
    for old in folder.glob("group_*.png"):
        old.unlink()  # an earlier run's groups
    sheets = []
    for g in range(groups):
        members = torch.nonzero(found == g).flatten()
        best = members[sims[members].argsort(descending=True)[:GROUP_SHEET]].tolist()
        tiles = [Tile(thumbs(i), _caption(e, i, float(sims[i]))) for i in best]
        title = f"group {g}: {int(sizes[g]):,} images, the {len(best)} nearest its centre"
        name = f"groups/group_{g:02d}.png"
        draw_sheet([tiles[r : r + 8] for r in range(0, len(tiles), 8)], out / name, title=title)
        sheets.append(name)
    summary = {"n": groups, "csv": "clusters.csv", "sheets": sheets, "sizes": sizes.tolist()}
    return summary, found


def link_groups(e: Embedded, found: Tensor, into: Path) -> str:
    """A folder per group under ``into`` holding a link to each of its images (a copy where
    links cannot be made); the names are the paths in the folder with ``/`` as ``__``."""
    made = "links"
    for i, g in enumerate(found.tolist()):
        folder = into / f"group_{g:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / e.paths[i].replace("/", "__")
        if target.exists() or target.is_symlink():  # a/b__c.jpg and a__b/c.jpg: keep both
            target = target.with_name(f"{target.stem}__{i}{target.suffix}")
        try:
            os.symlink(e.file(i), target)
        except OSError:
            shutil.copy2(e.file(i), target)
            made = "copies"
    return made


def duplicate_outputs(
    e: Embedded, thumbs: Thumbnails, out: Path, *, threshold: float, max_pairs: int
) -> dict:
    """Every pair above ``threshold`` counted, the ``max_pairs`` most similar in
    ``duplicates.csv`` (path_a, path_b, similarity), the top pairs on ``duplicates.png``."""
    pairs, total = near_duplicates(e.features, threshold, limit=max_pairs)
    _write_csv(
        out / "duplicates.csv",
        ["path_a", "path_b", "similarity"],
        ([e.paths[i], e.paths[j], f"{s:.6f}"] for i, j, s in pairs),
    )
    sheet = out / "duplicates.png"
    if pairs:
        tiles = []
        for i, j, s in pairs[:DUPLICATE_SHEET]:
            first = Tile(thumbs(i), _pair_caption(e, i, f"{s:.4f}"))
            tiles += [first, Tile(thumbs(j), _pair_caption(e, j))]
        title = f"the most similar of {total:,} pairs with cosine similarity >= {threshold}"
        draw_sheet([tiles[r : r + 6] for r in range(0, len(tiles), 6)], sheet, title=title)
    elif sheet.exists():
        sheet.unlink()
    if total > len(pairs):
        log.info(
            "duplicates: %s pairs ≥ %s; the %s most similar listed (--max-pairs)",
            f"{total:,}",
            threshold,
            f"{len(pairs):,}",
        )
    return {
        "threshold": threshold,
        "pairs": total,
        "listed": len(pairs),
        "csv": "duplicates.csv",
        "sheet": sheet.name if pairs else None,
    }


def map_outputs(
    e: Embedded, thumbs: Thumbnails, out: Path, found: Tensor, *, tsne: bool, seed: int
) -> dict:
    """``map.png`` (PCA, coloured by class or group), ``map_thumbnails.png`` and, with
    scikit-learn, ``map_tsne.png`` on a sample."""
    xy, shares = pca_2d(e.features)
    if e.labels is not None:
        colour, names, by = e.labels, e.classes, "class"
    else:
        colour, names, by = found, [f"group {g}" for g in range(int(found.max()) + 1)], "group"
    scatter_png(xy, colour, names, out / "map.png", title=f"PCA of {len(e):,} images, by {by}")
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randperm(len(e), generator=gen)[:MAP_THUMBNAILS]
    thumbnail_map(xy, sample, thumbs, out / "map_thumbnails.png")
    result: dict[str, Any] = {
        "pca": "map.png",
        "variance": shares,
        "thumbnails": "map_thumbnails.png",
        "tsne": None,
    }
    if tsne and has_tsne() and len(e) >= 5:
        rows = torch.randperm(len(e), generator=gen)[:TSNE_SAMPLE].sort().values
        txy = tsne_2d(e.features, rows, seed)
        scatter_png(
            txy,
            colour[rows],
            names,
            out / "map_tsne.png",
            title=f"t-SNE of {len(rows):,} images, by {by}",
            axes=("", ""),
        )
        result.update(tsne="map_tsne.png", tsne_rows=len(rows))
    return result


def label_scores(e: Embedded, found: Tensor) -> dict | None:
    """The groups against the class folders (purity, adjusted Rand index) and the kNN
    classifier of evaluate.py, each image classified by the others (leave-one-out)."""
    if e.labels is None or len(e) < 2:
        return None
    knn = knn_evaluate(
        e.features,
        e.labels,
        e.features,
        e.labels,
        ks=(KNN_K,),
        leave_one_out=True,
        num_classes=len(e.classes),
    )
    return {
        "classes": len(e.classes),
        "purity": purity(found, e.labels),
        "ari": adjusted_rand_index(found, e.labels),
        "knn_top1": knn[KNN_K].top1,
        "knn_k": knn[KNN_K].k,
    }


# ---------------------------------------------------------------------------------------------
# The explorer


def _model(model: str, random_init: bool, size: int | None, seed: int):
    """(network, spec, untrained): a run folder, checkpoint or weights file; or a backbone
    name (resnet18, timm/…, torchvision/…), which is a random init at ``size``."""
    if Path(model).expanduser().exists():
        return (*backbone_to_evaluate(model, random_init, None, size, seed)[:2], random_init)
    if not model.startswith(("resnet", "timm/", "torchvision/")):
        raise UserError(
            f"{model} does not exist, and it is not a backbone name either (resnet18, "
            "timm/<model>, torchvision/<model>); pass a run folder, checkpoint or weights file"
        )
    net, spec, _ = backbone_to_evaluate(None, True, model, size, seed)
    return net, spec, True


def _check_link_folder(link_into: str | Path | None) -> Path | None:
    if link_into is None:
        return None
    into = Path(link_into).expanduser()
    if into.exists() and (not into.is_dir() or any(into.iterdir())):
        raise UserError(f"--link-into {into}: not an empty folder; pass a new or empty one")
    return into


def _check_settings(duplicates: float, **positive: int | None) -> None:
    if not -1.0 <= duplicates <= 1.0:
        raise UserError(f"--duplicates {duplicates}: a cosine similarity is between -1 and 1")
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be ≥ 1, got {value}")


def _about(e: Embedded, spec, source: str, size: int, untrained: bool) -> dict[str, Any]:
    """The head of the summary: the model, the folder and its features."""
    return {
        "model": {"source": source, "backbone": spec.backbone, "size": size,
                  "random_init": bool(untrained)},
        "folder": str(e.root),
        "images": len(e),
        "skipped": len(e.skipped),
        "features": int(e.features.shape[1]),
        "from_cache": e.from_cache,
        "extract_seconds": e.seconds,
    }  # fmt: skip


def explore(
    model: str,
    folder: str | Path,
    out: str | Path,
    *,
    random_init: bool = False,
    size: int | None = None,
    groups: int | None = None,
    k: int = 8,
    queries: int = 12,
    query: Sequence[str] = (),
    duplicates: float = 0.95,
    max_pairs: int = 10_000,
    link_into: str | Path | None = None,
    labels: str = "auto",
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 256,
    num_workers: int | None = None,
    cache: str = "disk",
    cache_dir: str | Path | None = None,
    feature_cache: bool = True,
    neighbours: str = "auto",
    tsne: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Explore ``folder`` with the backbone ``model``; write everything into ``out``; return
    the summary (also ``out/explore.json``)."""
    start = time.perf_counter()
    _check_settings(duplicates, k=k, queries=queries, max_pairs=max_pairs, groups=groups)
    into = _check_link_folder(link_into)
    using = backend(neighbours)
    net, spec, untrained = _model(model, random_init, size, seed)
    size = size or spec.image_size
    context = InferenceContext.choose(device, precision, spec.config, batch_size=batch_size,
                                      cache_dir=cache_dir, use_cache=feature_cache,
                                      num_workers=num_workers, progress=progress)  # fmt: skip
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    clock = StepClock()
    with clock.step("embeddings"):
        net = context.prepare(net)
        sha = state_sha256(net.state_dict())  # the feature cache's key
        e = embed_folder(net, sha, folder, size=size, labels=labels, context=context,
                         cache=cache)  # fmt: skip
        files = write_embeddings(out, e)
    n_groups = min(groups, len(e)) if groups else default_groups(len(e), len(e.classes))
    thumbs = Thumbnails(e)
    log.info("explore: %s images, %d groups, neighbours by %s", f"{len(e):,}", n_groups, using)
    summary = _about(e, spec, str(model), size, untrained)
    with clock.step("neighbours"):
        summary["neighbours"] = neighbour_sheets(e, thumbs, out, k=k, queries=queries,
                                                 using=using, seed=seed)  # fmt: skip
        summary["neighbours"]["backend"] = using
        summary["neighbours"]["query_sheets"] = query_sheets(
            e, thumbs, out, net, query, k=k, size=size, context=context, using=using
        )
    with clock.step("groups"):
        summary["groups"], found = group_outputs(e, thumbs, out, groups=n_groups, seed=seed)
        if into is not None:
            how = link_groups(e, found, into)
            summary["groups"].update(linked_into=str(into), linked_as=how)
    with clock.step("duplicates"):
        summary["duplicates"] = duplicate_outputs(e, thumbs, out, threshold=duplicates,
                                                  max_pairs=max_pairs)  # fmt: skip
    with clock.step("map"):
        summary["map"] = map_outputs(e, thumbs, out, found, tsne=tsne, seed=seed)
    with clock.step("labels"):
        summary["labels"] = label_scores(e, found)
    summary.update(timings=clock.seconds, peak_mib=clock.peak_mib,
                   seconds=time.perf_counter() - start)  # fmt: skip
    summary["files"] = [*files, "clusters.csv", "neighbours.csv", "duplicates.csv", "explore.json"]
    write_text_atomic(out / "explore.json", json.dumps(summary, indent=1) + "\n")
    write_page(out, summary)
    return summary


def exploration_line(s: dict[str, Any]) -> str:
    """The line for people about an :func:`explore` summary: the groups, the near-duplicates
    and, with class folders, how the groups match them."""
    line = (
        f"explored {s['images']:,} images: {s['groups']['n']} groups, "
        f"{s['duplicates']['pairs']:,} near-duplicate pairs (≥ {s['duplicates']['threshold']})"
    )
    if s.get("labels"):
        lab = s["labels"]
        line += (
            f"; against the folders: ARI {lab['ari']:.3f}, purity {lab['purity']:.3f}, "
            f"kNN top-1 {lab['knn_top1']:.3f}"
        )
    if s["skipped"]:
        line += f"; {s['skipped']} files skipped (skipped_files.txt)"
    return line


__all__ = ["default_groups", "exploration_line", "explore"]
