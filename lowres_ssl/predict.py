"""Predictions for new images: a fine-tuned classifier over a folder → a CSV (or features).

>>> predict("runs/ft", "~/new_photos", "predictions.csv")  # doctest: +SKIP

Every image of the folder (recursive) is decoded as validation decodes it (the centred square
resized to the classifier's image size, ImageNet normalisation) and classified in fp32; files
that cannot be read are skipped and listed, as in training. Where the folder is laid out as
``root/<class>/…`` with the classifier's class names, the accuracy against those names is
reported too. With ``embeddings`` the backbone's features are written instead (``.npy``,
float32, one row per image in the order of a ``.paths.txt`` file beside it).
"""

from __future__ import annotations

import csv
import logging
import struct
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lowres_ssl.data import FolderImages, SkipLog, make_loader, scan_folder
from lowres_ssl.errors import UserError
from lowres_ssl.eval.context import InferenceContext
from lowres_ssl.eval.features import to_input
from lowres_ssl.files import write_atomic, write_text_atomic
from lowres_ssl.weights import load_backbone, load_classifier

log = logging.getLogger("lowres_ssl")


def write_npy(path: Path, array: torch.Tensor) -> None:
    """A float32 2-D tensor as a ``.npy`` file (format version 1.0), atomically."""
    a = array.detach().float().cpu().contiguous()
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple(a.shape)}, }}"
    pad = 64 - (10 + len(header) + 1) % 64
    header = header + " " * pad + "\n"

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1"))
            f.write(a.numpy().tobytes() if a.numel() else b"")

    write_atomic(path, write)


def _batches(images: FolderImages, context: InferenceContext, skips: SkipLog):
    loader = make_loader(
        images,
        context.batch_size,
        device=context.device,
        shuffle=False,
        drop_last=False,
        num_workers=context.num_workers,
        skip_log=skips,
    )
    yield from loader.iterate(0)


def predict(
    checkpoint: str | Path,
    images_dir: str | Path,
    out: str | Path,
    *,
    embeddings: bool = False,
    batch_size: int = 256,
    device: str = "auto",
    num_workers: int | None = None,
    topk: int = 5,
    progress: bool = False,
) -> dict[str, Any]:
    """Classify (or embed) every image under ``images_dir``; write ``out``; return a summary
    (``images``, ``skipped``, ``accuracy`` where the folder names the classes, ``out``)."""
    # fp32 in the default memory format: the predictions of the fine-tuning's validation
    context = InferenceContext.choose(
        device, "fp32", batch_size=batch_size, channels_last=False, use_cache=False,
        num_workers=num_workers, progress=progress,
    )  # fmt: skip
    out = Path(out).expanduser()
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: the folder {out.parent} does not exist")
    files = scan_folder(images_dir)  # a missing folder fails before the weights are read
    if embeddings:
        backbone, weights = load_backbone(checkpoint)
        model, size, classes = backbone, weights.spec.image_size, None
    else:
        clf = load_classifier(checkpoint)
        model, size, classes = clf.build(), clf.spec.image_size, clf.classes
    model = context.prepare(model)
    images = FolderImages(files, size)
    skips = SkipLog(files.root)
    rows: list[tuple[int, torch.Tensor]] = []
    bar = tqdm(total=-(-len(files) // batch_size), unit="batch", disable=not progress)
    with torch.no_grad():
        for batch in _batches(images, context, skips):
            y = model(to_input(batch.images))
            if not embeddings:
                y = y.float().softmax(dim=1)
            rows.append((batch.indices, y.float().cpu()))
            bar.update(1)
    bar.close()
    order = torch.cat([i for i, _ in rows]) if rows else torch.zeros(0, dtype=torch.long)
    values = torch.cat([v for _, v in rows]) if rows else torch.zeros(0, 1)
    paths = [files.paths[i] for i in order.tolist()]
    summary: dict[str, Any] = {"images": len(paths), "skipped": len(skips), "out": str(out)}
    if embeddings:
        write_npy(out, values)
        listing = out.with_name(out.stem + ".paths.txt")
        write_text_atomic(listing, "".join(p + "\n" for p in paths))
        summary.update(features=values.shape[1] if len(paths) else 0, paths=str(listing))
    else:
        summary.update(_write_csv(out, paths, values, classes, topk))
    if len(skips):
        listing = out.with_name(out.stem + ".skipped.txt")
        skips.write(listing)
        summary["skipped_list"] = str(listing)
        for skip in list(skips)[:10]:
            log.warning("skipped %s", skip.line())
    return summary


def _write_csv(out: Path, paths, probs: torch.Tensor, classes: list[str], topk: int) -> dict:
    k = min(topk, len(classes))
    top_p, top_i = probs.topk(k, dim=1) if len(paths) else (probs, probs.long())
    names = set(classes)
    labeled = bool(paths) and all(p.split("/", 1)[0] in names and "/" in p for p in paths)
    best = [classes[i] for i in top_i[:, 0].tolist()]
    hits = sum(b == p.split("/", 1)[0] for b, p in zip(best, paths, strict=True)) if labeled else 0

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path", "class", "probability", f"top{k}"])
            for n, path in enumerate(paths):
                pairs = zip(top_i[n].tolist(), top_p[n].tolist(), strict=True)
                top = ";".join(f"{classes[i]}:{p:.4f}" for i, p in pairs)
                w.writerow([path, best[n], f"{top_p[n, 0].item():.6f}", top])

    write_atomic(out, write)
    result: dict[str, Any] = {"classes": len(classes)}
    if labeled:
        result["accuracy"] = hits / len(paths)
    return result


def prediction_line(s: dict[str, Any]) -> str:
    """The line for people about a :func:`predict` summary: what was written where, the
    accuracy where the folder names the classes, the files skipped."""
    what = "features of" if "features" in s else "predictions for"
    line = f"wrote {what} {s['images']:,} images to {s['out']}"
    if "accuracy" in s:
        line += f"; accuracy against the folder names {s['accuracy']:.4f}"
    if s["skipped"]:
        line += f"; {s['skipped']} files skipped (listed in {s['skipped_list']})"
    return line


__all__ = ["predict", "prediction_line", "write_npy"]
