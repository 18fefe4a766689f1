"""A small kNN sweep of SFRIK's settings at the ``cpu`` preset's scale, written as a table.

Each setting is a pre-training run of the ``cpu`` preset (ResNet-18 at 32 px, q = 2048) on a
folder of images, then ``evaluate.py knn`` on a labeled train / test pair; the same backbone at
random init is evaluated beside them. A CPU run takes minutes: start it in the background.

    python scripts/sweep_recipes.py --data ~/.cache/lowres_ssl/cifar10/train \\
        --train EVAL/train --test EVAL/test --out runs/sweep          # runs, then the table
    python scripts/sweep_recipes.py --out runs/sweep --report-only    # the table from the runs

Settings (``--settings``): ``NAME:KEY=VALUE,KEY=VALUE``, e.g. ``lam0.512:loss.lam=0.512`` or
``cache256:loss.lam=0.512,train.batch_size=256,train.micro_batch_size=32,train.max_steps=36``.
It prints the table (what ``docs/benchmarks/recipes.md`` holds) of every evaluated run: its
settings, seed, steps, wall time, and kNN top-1 at k = 200 and k = 20.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# after the path, so that the script runs from a checkout without installing the package
from lowres_ssl import bench  # noqa: E402
from lowres_ssl.run_layout import CONFIG_FILE, SUMMARY_FILE, eval_file  # noqa: E402

DEFAULT_SETTINGS = [
    "lam0.512:loss.lam=0.512",
    "lam2.05:loss.lam=2.05",
    "lam0.25:loss.lam=0.25",
    "lam1.0:loss.lam=1.0",
]


def parse_setting(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition(":")
    if not name or not rest:
        raise SystemExit(f"error: --settings expects NAME:KEY=VALUE[,KEY=VALUE], got {text!r}")
    return name, [f"--set={kv}" for kv in rest.split(",")]


def run(cmd: list[str], log: Path) -> None:
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[:3])}… failed; see {log}")


def evaluate(args: argparse.Namespace, target: list[str], log: Path) -> None:
    cmd = [sys.executable, str(REPO / "scripts/evaluate.py"), "knn", *target]
    run([*cmd, "--train", args.train, "--test", args.test, "--num-workers", "0"], log)


def sweep(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    random_json = out / "random_init.json"
    if not random_json.exists():
        log = out / "random_init.log"
        evaluate(args, ["--random-init", "--backbone", "resnet18", "--size", "32"], log)
        random_json.write_text(log.read_text().strip().splitlines()[-1] + "\n")
    for text in args.settings:
        name, sets = parse_setting(text)
        for seed in args.seeds:
            run_dir = out / f"{name}-seed{seed}"
            if (run_dir / eval_file("knn")).exists():
                continue
            cmd = [sys.executable, str(REPO / "scripts/train.py"), "--preset", "cpu"]
            cmd += ["--data", args.data, "--out", str(run_dir), "--max-steps", str(args.steps)]
            cmd += [*sets, f"--set=train.seed={seed}", "--set=train.log_every=10"]
            if (run_dir / CONFIG_FILE).exists():
                cmd.append("--resume")
            run(cmd, out / f"{name}-seed{seed}.train.log")
            evaluate(args, ["--checkpoint", str(run_dir)], out / f"{name}-seed{seed}.knn.log")


def report(out: Path) -> list[str]:
    """The table of every evaluated run under ``out`` (and ``random_init.json``)."""
    import yaml

    rows = []
    for run_dir in sorted(p for p in out.iterdir() if (p / eval_file("knn")).is_file()):
        knn = json.loads((run_dir / eval_file("knn")).read_text())
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
        cfg = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
        t, lo = cfg["train"], cfg["loss"]
        micro = t.get("micro_batch_size") or "–"
        rows.append(
            [run_dir.name, lo.get("lam"), f"{t['batch_size']} / {micro}", t["seed"],
             summary["steps"], f"{summary['wall_time_s']:.0f}", f"{knn['knn_top1']:.3f}",
             f"{knn['knn20_top1']:.3f}"]
        )  # fmt: skip
    random_json = out / "random_init.json"
    if random_json.exists():
        random = json.loads(random_json.read_text())
        knn = [f"{random['knn_top1']:.3f}", f"{random['knn20_top1']:.3f}"]
        rows.append(["random init", "–", "–", 0, 0, "–", *knn])
    header = ["run", "λ", "batch / micro-batch", "seed", "steps", "wall s", "kNN top-1 (k=200)"]
    return bench.markdown_table([*header, "(k=20)"], rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="the unlabeled training folder")
    p.add_argument("--train", help="labeled folder the kNN is fitted on")
    p.add_argument("--test", help="labeled folder the kNN is scored on")
    p.add_argument("--out", required=True, help="folder of the sweep's runs")
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--report-only", action="store_true", help="only write the table")
    args = p.parse_args()
    if not args.report_only:
        if not (args.data and args.train and args.test):
            p.error("--data, --train and --test are needed to run the sweep")
        os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        sweep(args)
    lines = report(Path(args.out))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
