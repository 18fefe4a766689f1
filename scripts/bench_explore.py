"""The explorer measured: what it finds on held-out photos (trained vs untrained backbone), and
its time and peak memory at 100,000 images on a CPU.

    python scripts/bench_explore.py repeat imagewoof/ /tmp/big100k --n 100000
    python scripts/explore.py runs/woof /tmp/big100k --out runs/big          # and so on
    python scripts/bench_explore.py report --photos runs/woof/explore runs/woof/explore_random \\
        --scale runs/big_cold runs/big_warm runs/big_warm_torch
    python scripts/bench_explore.py shapes docs_demo/     # the README's sheet: generated images

``repeat`` makes a folder of ``--n`` symbolic links that cycle through the images of a source
folder (a large folder without the disk space or the download: "repeated images" in the
report); ``report`` reads the ``explore.json`` of each explorer output folder and writes
``docs/benchmarks/explore.md``; ``shapes`` draws a folder of generated pictures (six kinds of
shape on noisy backgrounds, a few exact copies among them) whose sheets can be shown without
reproducing anyone's photos.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lowres_ssl import bench  # noqa: E402
from lowres_ssl.data.folders import IMAGE_EXTENSIONS  # noqa: E402

REPORT = REPO / "docs/benchmarks/explore.md"
SEEDS = 5  # k-means seeds for the spread of the adjusted Rand index
STEPS = ("embeddings", "neighbours", "groups", "duplicates", "map", "labels")


def repeat(source: Path, out: Path, n: int) -> int:
    """``out/NNNNNN.<ext>``: ``n`` links cycling through the images under ``source``."""
    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise SystemExit(f"no image under {source}")
    out.mkdir(parents=True, exist_ok=False)
    for i in range(n):
        f = files[i % len(files)].resolve()
        os.symlink(f, out / f"{i:06d}{f.suffix.lower()}")
    print(f"{n:,} links to {len(files):,} images of {source} in {out}")
    return n


def shapes(out: Path, per_kind: int = 40, copies: int = 4, seed: int = 0) -> int:
    """``out/<kind>/<i>.png``: generated 128-px pictures of six kinds, and a few copies."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    kinds = ("circle", "square", "triangle", "stripes", "rings", "dots")
    made = 0
    for kind in kinds:
        (out / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_kind):
            bg = rng.integers(0, 256, 3)
            ramp = np.linspace(0.6, 1.2, 128)[:, None, None] * bg[None, None, :]
            base = np.clip(ramp + rng.normal(0, 18, (128, 128, 3)), 0, 255).astype(np.uint8)
            im = Image.fromarray(base)
            draw = ImageDraw.Draw(im)
            fg = tuple(int(c) for c in rng.integers(0, 256, 3))
            cx, cy, r = rng.integers(40, 88), rng.integers(40, 88), int(rng.integers(18, 36))
            box = [cx - r, cy - r, cx + r, cy + r]
            if kind == "circle":
                draw.ellipse(box, fill=fg)
            elif kind == "square":
                draw.rectangle(box, fill=fg)
            elif kind == "triangle":
                a = rng.uniform(0, 2 * math.pi)
                pts = [(cx + r * math.cos(a + k * 2.094), cy + r * math.sin(a + k * 2.094))
                       for k in range(3)]  # fmt: skip
                draw.polygon(pts, fill=fg)
            elif kind == "stripes":
                width = int(rng.integers(5, 12))
                for x in range(-128, 256, 2 * width):
                    draw.line([(x, 0), (x + 128, 128)], fill=fg, width=width)
            elif kind == "rings":
                for rr in range(r, 4, -8):
                    draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], outline=fg, width=3)
            else:
                for _ in range(int(rng.integers(12, 30))):
                    x, y, s = rng.integers(0, 128), rng.integers(0, 128), rng.integers(3, 7)
                    draw.ellipse([x - s, y - s, x + s, y + s], fill=fg)
            im = im.filter(ImageFilter.GaussianBlur(0.6))
            im.save(out / kind / f"{i:03d}.png")
            made += 1
            if i < copies:
                im.save(out / kind / f"{i:03d}_copy.png")
                made += 1
    print(f"{made} generated pictures in {out}")
    return made


def _load(folder: Path) -> dict:
    s = json.loads((folder / "explore.json").read_text())
    s["where"] = str(folder)
    return s


def ari_over_seeds(folder: Path, groups: int, seeds: int = SEEDS) -> tuple[float, float]:
    """(lowest, highest) adjusted Rand index of k-means from ``seeds`` seeds on the embeddings
    an explorer wrote, against the classes of its ``clusters.csv``: how much of the gap
    between two backbones is the seed's."""
    import csv

    import numpy as np
    import torch

    from lowres_ssl.eval.groups import adjusted_rand_index, kmeans

    features = torch.from_numpy(np.load(folder / "embeddings.npy"))
    with open(folder / "clusters.csv", newline="", encoding="utf-8") as f:
        by_path = {r["path"]: r["class"] for r in csv.DictReader(f)}
    paths = (folder / "paths.txt").read_text().splitlines()
    names = sorted(set(by_path.values()))
    labels = torch.tensor([names.index(by_path[p]) for p in paths])
    scores = [adjusted_rand_index(kmeans(features, groups, seed=s)[0], labels)
              for s in range(seeds)]  # fmt: skip
    return min(scores), max(scores)


def _photos_table(runs: list[dict]) -> list[str]:
    rows = []
    for s in runs:
        lab = s.get("labels") or {}
        m = s["model"]
        low, high = ari_over_seeds(Path(s["where"]), s["groups"]["n"]) if lab else (math.nan,) * 2
        rows.append(
            [
                f"`{m['source']}`" + (" at random init" if m["random_init"] else ""),
                f"{s['images']:,}",
                s["groups"]["n"],
                f"{lab.get('ari', float('nan')):.3f}",
                f"{low:.3f}–{high:.3f}",
                f"{lab.get('purity', float('nan')):.3f}",
                f"{lab.get('knn_top1', float('nan')):.3f}",
                f"{s['duplicates']['pairs']:,}",
                f"{s['seconds']:.0f}",
            ]
        )
    head = ["backbone", "images", "groups", "ARI", f"ARI, k-means seeds 0–{SEEDS - 1}",
            "purity", "kNN top-1 (k=20, LOO)", "pairs ≥ 0.95", "seconds"]  # fmt: skip
    return bench.markdown_table(head, rows)


def _scale_table(runs: list[dict]) -> list[str]:
    rows = []
    for s in runs:
        t, peak = s["timings"], s.get("peak_mib", {})
        features = "read from the cache" if s["from_cache"] else "decoded + extracted"
        cells = [f"{s['images']:,}", s["neighbours"]["backend"], features]
        cells += [f"{t.get(k, 0):.0f} s / {peak.get(k, 0) / 1024:.2f}" for k in STEPS[:5]]
        cells += [f"{s['seconds'] / 60:.1f} min", f"{max(peak.values(), default=0) / 1024:.2f}"]
        rows.append(cells)
    head = ["images", "neighbours", "features", *[f"{k} (s / GiB)" for k in STEPS[:5]],
            "total", "peak GiB"]  # fmt: skip
    return bench.markdown_table(head, rows)


def report(photos: list[Path], scale: list[Path], output: Path = REPORT) -> Path:
    lines = [
        "# The explorer: what it finds, and its cost at 100,000 images",
        "",
        "`python scripts/bench_explore.py report --photos … --scale …` (this page), from the",
        "`explore.json` of each `scripts/explore.py` output folder; how each part works is in",
        "[explore.md](../explore.md).",
        "",
        f"Written {datetime.date.today().isoformat()} on:",
        "",
        *bench.machine_lines("cpu"),
        "",
        "## On held-out photos: trained against untrained",
        "",
        "The 3,929 Imagewoof validation photos (10 dog breeds, 128 px; class folders, so the",
        "groups are scored against the breeds). ARI: adjusted Rand index of the k-means groups",
        "against the breeds (0: chance, 1: the breeds); purity: the share of photos whose breed",
        "is their group's most common; kNN: each photo classified by its 20 nearest others.",
        "The ARI's spread: k-means again from five seeds on the same embeddings (the lowest and",
        "highest), so a gap between the rows larger than it is the backbone's, not the seed's.",
        "The trained backbone: the README's results command (the `cpu` preset, 10 minutes on the",
        "9,025 training photos: `scripts/train.py --preset cpu --data imagewoof/train",
        "--time-budget 10m --out runs/woof`); the untrained one: `--random-init`, the same",
        "architecture at seed 0.",
        "",
        *_photos_table([_load(p) for p in photos]),
        "",
        "## 100,000 images on 2 CPU cores",
        "",
        "`bench_explore.py repeat` links: the 12,954 Imagewoof photos repeated to 100,000 files",
        "(so every photo has 7–8 exact copies: millions of pairs above 0.95, the heaviest case for",
        "the duplicate listing, which stays capped at `--max-pairs` 10,000), one flat folder, no",
        "labels, 100 groups, the `cpu` preset's ResNet-18 at 96 px in fp32. Each cell: the step's",
        "seconds and the process's peak resident memory during it (the high-water mark reset at",
        "the start of each step). The duplicate scan is exact blocked products in torch on every",
        "row (the upper triangle, 2.6·10¹² multiply-adds); `neighbours` is the search for the",
        "sampled queries, by faiss or by torch.",
        "",
        *_scale_table([_load(p) for p in scale]),
        "",
    ]
    return bench.write_report(lines, output)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("repeat", help="a folder of N links cycling through a folder's images")
    r.add_argument("source", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--n", type=int, default=100_000)
    s = sub.add_parser("shapes", help="a folder of generated pictures (the README's sheet)")
    s.add_argument("out", type=Path)
    s.add_argument("--per-kind", type=int, default=40)
    t = sub.add_parser("report", help="docs/benchmarks/explore.md from explorer output folders")
    t.add_argument("--photos", type=Path, nargs="+", required=True)
    t.add_argument("--scale", type=Path, nargs="+", required=True)
    t.add_argument("--output", type=Path, default=REPORT)
    args = p.parse_args(argv)
    if args.what == "repeat":
        repeat(args.source, args.out, args.n)
    elif args.what == "shapes":
        shapes(args.out, args.per_kind)
    else:
        print(f"wrote {report(args.photos, args.scale, args.output)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
