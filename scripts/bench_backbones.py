"""Backbones on photos at equal time: images/s, peak memory, the estimate, kNN top-1.

Each row is the ``cpu`` preset on the shared Imagewoof photos (96-px views) with
``model.backbone`` set, trained for the same wall time (``--time-budget``), then kNN-evaluated
(k = 200) on the validation split with the project's own evaluation, beside the same backbone
at random init — exactly the commands a user types:

    python scripts/train.py --preset cpu --data imagewoof/train --set model.backbone=B \\
        --time-budget 5m --out runs/backbones/B
    python scripts/evaluate.py knn --checkpoint runs/backbones/B --train imagewoof/train \\
        --test imagewoof/val
    python scripts/evaluate.py knn --random-init --backbone B --size 96 ...

Each run's figures are appended to ``docs/benchmarks/backbones_runs.jsonl`` (with the machine
and the date); ``report`` writes ``docs/benchmarks/backbones.md``. Run the backbones one after
another on a quiet machine.

    python scripts/bench_backbones.py run resnet18 timm/resnet10t timm/convnext_atto --budget 5m
    python scripts/bench_backbones.py report
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_photos import _python, photos, read_results, run_facts  # noqa: E402

from lowres_ssl import bench, run_layout  # noqa: E402

RESULTS = REPO / "docs/benchmarks/backbones_runs.jsonl"
REPORT = REPO / "docs/benchmarks/backbones.md"
DEFAULT = ["resnet18", "timm/resnet10t", "timm/convnext_atto", "timm/mobilenetv3_large_100",
           "timm/vit_tiny_patch16_224"]  # fmt: skip


def _estimate(backbone: str, data: Path, log: Path) -> float | None:
    """The memory estimator's peak for the run (``--dry-run``), in GiB."""
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, str(REPO / "scripts/train.py"), "--preset", "cpu", "--data",
             str(data / "train"), "--set", f"model.backbone={backbone}", "--dry-run"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False,
        )  # fmt: skip
        out.write(done.stdout)
    found = re.search(r"estimated peak ([0-9.]+) GiB", done.stdout)
    return float(found.group(1)) if found else None


def run_backbone(backbone: str, budget: str, runs: Path, data: Path) -> dict:
    """Train ``backbone`` for ``budget``, kNN-evaluate it and its random init; its result."""
    slug = backbone.replace("/", "-")
    load = bench.load_average()
    started = time.time()
    run_dir = runs / slug
    estimated = _estimate(backbone, data, runs / f"{slug}.dry-run.log")
    _python(
        "train.py",
        ["--preset", "cpu", "--data", str(data / "train"), "--set", f"model.backbone={backbone}",
         "--time-budget", budget, "--out", str(run_dir)],
        runs / f"{slug}.train.log",
    )  # fmt: skip
    summary = json.loads((run_dir / run_layout.SUMMARY_FILE).read_text())
    sets = ["--train", str(data / "train"), "--test", str(data / "val")]
    knn = _python("evaluate.py", ["knn", "--checkpoint", str(run_dir), *sets],
                  runs / f"{slug}.knn.log")  # fmt: skip
    random = _python(
        "evaluate.py",
        ["knn", "--random-init", "--backbone", backbone, "--size", "96", *sets],
        runs / f"{slug}.random.log",
    )
    return {
        "backbone": backbone,
        "budget": budget,
        "steps": summary.get("steps"),
        "images_per_s": summary.get("images_per_s"),
        "peak_rss_gib": summary.get("cpu_rss_gib"),
        "estimated_gib": estimated,
        "precision": summary.get("precision"),
        "knn_top1": knn["knn_top1"],
        "random_knn_top1": random["knn_top1"],
        **run_facts(load, started),
    }


def report_lines(results: list[dict]) -> list[str]:
    header = ["backbone", "budget", "steps", "images/s", "peak RSS GiB", "estimated GiB",
              "kNN top-1", "random init", "gain", "machine", "date"]  # fmt: skip
    rows, notes = [], []
    for r in results:
        est = r.get("estimated_gib")
        mark = ""
        if r.get("note"):
            notes.append(r["note"])
            mark = f" ({len(notes)})"
        rows.append(
            [f"`{r['backbone']}`{mark}", r["budget"], f"{r['steps']:,}", f"{r['images_per_s']:.0f}",
             f"{r['peak_rss_gib']:.2f}", "–" if est is None else f"{est:.2f}",
             f"{r['knn_top1']:.3f}", f"{r['random_knn_top1']:.3f}",
             f"{r['knn_top1'] - r['random_knn_top1']:+.3f}",
             f"{r['cpu']}, {r['cores']} cores", r["date"]]
        )  # fmt: skip
    return [
        "# Backbones on photos at equal time (cpu)",
        "",
        "Written by `python scripts/bench_backbones.py report` from "
        "`docs/benchmarks/backbones_runs.jsonl`.",
        "",
        "The `cpu` preset on the shared Imagewoof photos (ten dog breeds; 96-px views, SimCLR "
        "on photos, batch 32) with `model.backbone` set, each trained for the same wall time, "
        "one after another on the same machine; kNN top-1 (k = 200) on the 3,929 validation "
        "photos with `scripts/evaluate.py`, beside the same backbone at random init. Peak RSS: "
        "the training process's (`summary.json`), which also holds the pages of the "
        "memory-mapped decoded photos it has read (0.25 GB for all of them); "
        "estimated: the memory estimator's peak for the training step "
        "(`--dry-run`). The estimator against a measured step, per backbone: "
        "[presets.md](presets.md).",
        "",
        *bench.markdown_table(header, rows),
        "",
        *[f"({i}) {note}" for i, note in enumerate(notes, 1)],
        "",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate backbones, appending their results")
    run.add_argument("backbones", nargs="*", default=DEFAULT)
    run.add_argument("--budget", default="5m")
    run.add_argument("--runs", type=Path, default=REPO / "runs/backbones")
    run.add_argument("--cache", type=Path, default=Path.home() / ".cache/lowres_ssl")
    sub.add_parser("report", help="write docs/benchmarks/backbones.md")
    args = parser.parse_args()
    if args.command == "run":
        data = photos(args.cache)
        args.runs.mkdir(parents=True, exist_ok=True)
        for backbone in args.backbones:
            result = run_backbone(backbone, args.budget, args.runs, data)
            with RESULTS.open("a") as f:
                f.write(json.dumps(result) + "\n")
            print(json.dumps(result), flush=True)
    REPORT.write_text("\n".join(report_lines(read_results(RESULTS))))
    print(f"wrote {REPORT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
