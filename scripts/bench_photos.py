"""The photo study: which loss, views and settings learn most on photos per minute of training.

Each variant is the ``cpu`` preset on the Imagewoof photos (``../shared/data/``: ten dog
breeds, 9,025 training and 3,929 validation photos at 128 px) with a few config keys changed,
trained for the same wall time (``--time-budget``), then evaluated with the project's own
evaluation on the validation split: kNN (k = 200) and a linear probe on the frozen backbone,
beside the same backbone at random init. A run is ``scripts/train.py`` then
``scripts/evaluate.py``, exactly the commands a user types; its figures are appended to
``docs/benchmarks/photos_runs.jsonl`` (one line per run, with the machine and the date), and
``report`` turns every line into ``docs/benchmarks/photos.md`` (mean and range per variant).

    python scripts/bench_photos.py list
    python scripts/bench_photos.py run sfrik-2v sfrik-mc6 simclr-2v --budget 10m --runs runs/photos
    python scripts/bench_photos.py report

Timings are only comparable on the same machine under the same load: run the variants one
after another on a quiet machine (a run records the load before it starts) and compare rows
measured on the same day.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lowres_ssl import bench, durations, run_layout  # noqa: E402
from lowres_ssl.device import cpu_has_native_bf16  # noqa: E402

RESULTS = REPO / "docs/benchmarks/photos_runs.jsonl"
REPORT = REPO / "docs/benchmarks/photos.md"
ARCHIVE = REPO.parent / "shared/data/imagewoof-128-jpg.tar.gz"

#: The cpu preset until 2026-12-04 (fp32, 8-bit optimizer state, the recipe's crops of 8–100 %)
#: as overrides on today's: the variants measured on it (:data:`ON_THE_FIRST_PRESET`) run on it.
FIRST_PRESET = ["train.precision=fp32", "optim.state_bits=8", "photos.data.views.large_scale=null"]

#: The Gaussian's degree weights b_ℓ ∝ 4^ℓ/ℓ! to L = 6 (the study's best kernel shape).
GAUSSIAN_WEIGHTS = "loss.kernel_weights=[10,20,26.7,26.7,21.3,14.2]"

#: name → (what it tests, the --set overrides on the cpu preset). ``random`` trains nothing.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "random": ("the same backbone at random init", []),
    "cpu": ("the cpu preset as it is (the README's command; on photos SimCLR, and since "
            "2026-12-08 from 120,000 images, a budget of 42 min, `sfrik-expw-q8192`: the "
            "rows of 30 and 60 min before that day are SimCLR)", []),
    "cpu-sfrik": ("the cpu preset with SFRIK on photos", ["loss.name=sfrik"]),
    "cpu-simclr": ("the cpu preset with SimCLR (τ = 0.2)", ["loss.name=simclr"]),
    "cpu-vicreg": ("the cpu preset with VICReg", ["loss.name=vicreg"]),
    "cpu-first": ("the cpu preset until 2026-12-04: fp32, 8-bit state, crops of 8–100 %", []),
    "sfrik-2v": ("SFRIK, two views of 96 px (what `cpu` does on photos)",
                 ["data.views.small=0"]),
    "sfrik-mc4": ("SFRIK, 2 × 96 + 4 × 48 px (SwAV layout)", ["data.views.small=4"]),
    "sfrik-mc6": ("SFRIK, 2 × 96 + 6 × 48 px (SwAV layout)", ["data.views.small=6"]),
    "sfrik-mc6-reg": ("SFRIK, 2 × 96 + 6 × 48 px, reg_small",
                      ["data.views.small=6", "loss.reg_small=true"]),
    "sfrik-obow": ("SFRIK, OBoW layout: the whole image + 2 × 96 + 5 × 48 px",
                   ["data.views.layout=obow", "data.views.large=2", "data.views.small=5"]),
    "sfrik-mc6-load128": ("SFRIK, 2 × 96 + 6 × 48 px cropped from the 128-px photos",
                          ["data.views.small=6", "data.load_size=128", "data.image_size=96"]),
    "sfrik-mc6-b128": ("SFRIK, 2 × 96 + 6 × 48 px, batch 128 in micro-batches of 32",
                       ["data.views.small=6", "train.batch_size=128",
                        "train.micro_batch_size=32"]),
    "sfrik-mc6-lam2": ("SFRIK, 2 × 96 + 6 × 48 px, λ = 2", ["data.views.small=6", "loss.lam=2.0"]),
    "sfrik-mc6-lr2": ("SFRIK, 2 × 96 + 6 × 48 px, base learning rate 2.4",
                      ["data.views.small=6", "optim.base_lr=2.4"]),
    "sfrik-2v-lr2": ("SFRIK, two views of 96 px, base learning rate 2.4",
                     ["data.views.small=0", "optim.base_lr=2.4"]),
    "sfrik-2v-lr06": ("SFRIK, two views of 96 px, base learning rate 0.6",
                      ["data.views.small=0", "optim.base_lr=0.6"]),
    "sfrik-2v-lam05": ("SFRIK, two views of 96 px, λ = 0.5",
                       ["data.views.small=0", "loss.lam=0.5"]),
    "sfrik-2v-lam2": ("SFRIK, two views of 96 px, λ = 2", ["data.views.small=0", "loss.lam=2.0"]),
    "sfrik-2v-b16": ("SFRIK, two views of 96 px, batch 16", ["data.views.small=0",
                                                           "train.batch_size=16"]),
    "sfrik-2v-b64": ("SFRIK, two views of 96 px, batch 64", ["data.views.small=0",
                                                           "train.batch_size=64"]),
    "sfrik-2v-b128": ("SFRIK, two views of 96 px, batch 128 in micro-batches of 32",
                      ["data.views.small=0", "train.batch_size=128",
                       "train.micro_batch_size=32"]),
    "sfrik-2v-bf16": ("SFRIK, two views of 96 px, bf16 autocast and 32-bit optimizer state",
                      ["data.views.small=0", "train.precision=bf16", "optim.state_bits=32"]),
    "sfrik-2v-bf16-lam05": ("SFRIK, two views of 96 px, bf16, 32-bit optimizer state, λ = 0.5",
                            ["data.views.small=0", "train.precision=bf16",
                             "optim.state_bits=32", "loss.lam=0.5"]),
    "sfrik-2v-bf16-s25": ("SFRIK, two views of 96 px, bf16, 32-bit state, crops of 25–100 % area",
                          ["data.views.small=0", "train.precision=bf16", "optim.state_bits=32",
                           "data.views.large_scale=[0.25,1.0]"]),
    "sfrik-2v-bf16-auh": ("SFRIK, two views of 96 px, bf16, 32-bit state, the paper's STL-10 views",
                          ["data.views.small=0", "train.precision=bf16", "optim.state_bits=32",
                           "data.recipe=auh"]),
    "simclr-2v-bf16": ("SimCLR (τ = 0.2), two views of 96 px, bf16, 32-bit optimizer state",
                       ["data.views.small=0", "loss.name=simclr", "train.precision=bf16",
                        "optim.state_bits=32"]),
    "sfrik-mc2": ("SFRIK, 2 × 96 + 2 × 48 px (SwAV layout)", ["data.views.small=2"]),
    "sfrik-2v-64": ("SFRIK, two views of 64 px (the small-image model: CIFAR stem, 7 × the step)",
                    ["data.views.small=0", "data.load_size=64"]),
    "sfrik-2v-80": ("SFRIK, two views of 80 px", ["data.views.small=0", "data.load_size=80"]),
    "sfrik-2v-128": ("SFRIK, two views of 128 px", ["data.views.small=0", "data.load_size=128"]),
    "simclr-2v": ("SimCLR (τ = 0.2), two views of 96 px",
                  ["data.views.small=0", "loss.name=simclr"]),
    "simclr-mc6": ("SimCLR (τ = 0.2), 2 × 96 + 6 × 48 px (multi-view NCE)",
                   ["data.views.small=6", "loss.name=simclr"]),
    "vicreg-2v": ("VICReg, two views of 96 px", ["data.views.small=0", "loss.name=vicreg"]),
    "vicreg-mc6": ("VICReg, 2 × 96 + 6 × 48 px", ["data.views.small=6", "loss.name=vicreg"]),
    # The study of issue 35 (2026-12-07): SFRIK's own knobs at a small card's batch, on today's
    # cpu preset (batch 32, q = 2048, λ = 1, kernel (1, 40, 40)).
    "sfrik-L4": ("SFRIK, kernel truncated at L = 4: weights (1, 40, 40, 40)",
                 ["loss.name=sfrik", "loss.kernel_weights=[1,40,40,40]"]),
    "sfrik-L2": ("SFRIK, kernel truncated at L = 2: weights (1, 40)",
                 ["loss.name=sfrik", "loss.kernel_weights=[1,40]"]),
    "sfrik-expw": ("SFRIK, the Gaussian's degree weights to L = 6, (10, 20, 26.7, 26.7, 21.3, "
                   "14.2): b_ℓ ∝ 4^ℓ/ℓ! as exp(4t), ψ' equal to (1, 40, 40)'s at t = 0.2–0.4",
                   ["loss.name=sfrik", GAUSSIAN_WEIGHTS]),
    "sfrik-expw-q8192": ("SFRIK, the Gaussian's degree weights to L = 6 and q = 8,192 (the two "
                         "best single changes together)",
                         ["loss.name=sfrik", GAUSSIAN_WEIGHTS,
                          "model.projector=1024-8192"]),
    "sfrik-expw-q16384": ("SFRIK, the Gaussian's degree weights to L = 6 and q = 16,384",
                          ["loss.name=sfrik", GAUSSIAN_WEIGHTS,
                           "model.projector=1024-16384"]),
    "sfrik-expw-lam2": ("SFRIK, the Gaussian's degree weights to L = 6, λ = 2 (the uniformity "
                        "loss's log raises its weight as the batch spreads; this doubles it)",
                        ["loss.name=sfrik", GAUSSIAN_WEIGHTS,
                         "loss.lam=2.0"]),
    "sfrik-q4096": ("SFRIK, projector 1024-4096 (q = 4,096)",
                    ["loss.name=sfrik", "model.projector=1024-4096"]),
    "sfrik-q8192": ("SFRIK, projector 1024-8192 (q = 8,192)",
                    ["loss.name=sfrik", "model.projector=1024-8192"]),
    "unif-lam025": ("Gaussian kernel (the uniformity loss, t = 2), weight 0.25",
                    ["loss.name=uniformity", "loss.options.unif_weight=0.25"]),
    "unif-lam05": ("Gaussian kernel (the uniformity loss, t = 2), weight 0.5",
                   ["loss.name=uniformity", "loss.options.unif_weight=0.5"]),
    "unif-lam1": ("Gaussian kernel (the uniformity loss, t = 2), weight 1",
                  ["loss.name=uniformity", "loss.options.unif_weight=1.0"]),
    "unif-lam2": ("Gaussian kernel (the uniformity loss, t = 2), weight 2",
                  ["loss.name=uniformity", "loss.options.unif_weight=2.0"]),
    "sfrik-mem4096": ("SFRIK, MMD over the batch and a memory of 4,096 detached embeddings",
                      ["loss.name=sfrik", "loss.memory=4096"]),
    "sfrik-ema1024": ("SFRIK, MMD over the batch and a memory of 1,024 momentum-encoder "
                      "embeddings (m = 0.99)",
                      ["loss.name=sfrik", "loss.memory=1024", "loss.memory_momentum=0.99"]),
    "sfrik-ema4096": ("SFRIK, MMD over the batch and a memory of 4,096 momentum-encoder "
                      "embeddings (m = 0.99)",
                      ["loss.name=sfrik", "loss.memory=4096", "loss.memory_momentum=0.99"]),
}  # fmt: skip

#: Variants measured on the first cpu preset: they run on :data:`FIRST_PRESET` (their rows say so).
ON_THE_FIRST_PRESET = set(list(VARIANTS)[: list(VARIANTS).index("sfrik-L4")]) - {
    "random",
    "cpu",
    "cpu-sfrik",
    "cpu-simclr",
    "cpu-vicreg",
}


def variant_sets(name: str) -> list[str]:
    """The --set overrides a variant runs with on today's cpu preset."""
    return (FIRST_PRESET if name in ON_THE_FIRST_PRESET else []) + VARIANTS[name][1]


def photos(cache: Path) -> Path:
    """The Imagewoof folder, extracted from the shared archive on first use."""
    root = cache / "imagewoof"
    if not (root / "val").is_dir():
        if not ARCHIVE.is_file():
            raise SystemExit(f"no Imagewoof photos: {ARCHIVE} is missing (see ../shared/data)")
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(cache, filter="data")
    return root


def _python(script: str, args: list[str], log: Path) -> dict:
    """Run a script of this checkout, its output to ``log``; the last JSON line of stdout."""
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, str(REPO / "scripts" / script), *args],
            stdout=subprocess.PIPE, stderr=out, text=True, check=False,
        )  # fmt: skip
        out.write(done.stdout)
    if done.returncode:
        raise SystemExit(f"{script} failed (exit {done.returncode}): see {log}")
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def run_variant(name: str, index: int, budget: str, runs: Path, data: Path) -> dict:
    """Train one variant for ``budget`` and evaluate it (kNN, linear); its result line."""
    load = bench.load_average()
    run_dir = runs / f"{name}-{index}"
    started = time.time()
    evaluate = ["--train", str(data / "train"), "--test", str(data / "val")]
    if name == "random":
        target = ["--random-init", "--backbone", "resnet18", "--size", "96"]
        summary: dict = {}
    else:
        sets = [x for s in variant_sets(name) for x in ("--set", s)]
        _python(
            "train.py",
            ["--preset", "cpu", "--data", str(data / "train"), "--time-budget", budget,
             "--out", str(run_dir), *sets],
            runs / f"{name}-{index}.train.log",
        )  # fmt: skip
        summary = json.loads((run_dir / run_layout.SUMMARY_FILE).read_text())
        target = ["--checkpoint", str(run_dir)]
    knn = _python("evaluate.py", ["knn", *target, *evaluate], runs / f"{name}-{index}.knn.log")
    linear = _python(
        "evaluate.py", ["linear", *target, *evaluate], runs / f"{name}-{index}.linear.log"
    )
    return {
        "variant": name,
        "budget": budget,
        "steps": summary.get("steps"),
        "images_per_s": summary.get("images_per_s"),
        "precision": summary.get("precision"),  # Accelerate's name: "no" is fp32
        "optimizer": summary.get("optimizer"),
        "knn_top1": knn["knn_top1"],
        "knn20_top1": knn.get("knn20_top1"),
        "linear_top1": linear.get("top1"),
        **run_facts(load, started),
    }


def run_facts(load: float | None, started: float) -> dict:
    """Where and when a run ran, for its result line: the load before it, its wall time, the
    date and the machine."""
    return {
        "load_before": load,
        "wall_s": round(time.time() - started),
        "date": datetime.date.today().isoformat(),
        "cpu": bench.cpu_model(),
        "cores": os.cpu_count(),
        "bf16_native": cpu_has_native_bf16(),
    }


def read_results(path: Path = RESULTS) -> list[dict]:
    """The result lines of a ``*_runs.jsonl`` file (none yet: an empty list)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _spread(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ({min(values):.3f}–{max(values):.3f})"


def _variant_rows(results: list[dict], every: list[dict] | None = None) -> list[list]:
    """One row per variant, machine and training time of ``results``: runs, kNN and linear
    mean (range), steps; the gain over the random init's kNN (its runs among ``every``: it
    trains nothing, so any day's)."""
    rows = []
    machines = sorted({_machine(r) for r in results})
    base = [r["knn_top1"] for r in every or results if r["variant"] == "random"]
    base_mean = statistics.fmean(base) if base else None
    budgets = sorted({r["budget"] for r in results}, key=durations.parse_budget)
    for (name, (what, sets)), machine, budget in itertools.product(
        VARIANTS.items(), machines, budgets
    ):
        mine = [r for r in results if (r["variant"], _machine(r), r["budget"]) == (
            name, machine, budget)]  # fmt: skip
        if not mine or (name == "random" and budget != budgets[0]):
            continue
        knn = [r["knn_top1"] for r in mine]
        knn20 = [r["knn20_top1"] for r in mine if r.get("knn20_top1") is not None]
        linear = [r["linear_top1"] for r in mine if r.get("linear_top1") is not None]
        gain = "" if base_mean is None or name == "random" else (
            f"{100 * (statistics.fmean(knn) - base_mean):+.1f}")  # fmt: skip
        steps = [r["steps"] for r in mine if r.get("steps")]
        rows.append([
            f"`{name}`", what, mine[0]["cpu"] + _bf16(mine[0]), "–" if name == "random" else budget,
            len(mine), _spread(knn), gain,
            _spread(knn20), _spread(linear),
            f"{statistics.fmean(steps):.0f}" if steps else "–",
            " ".join(["(first preset)"] * (name in ON_THE_FIRST_PRESET) + [f"`{s}`" for s in sets])
            or "–",
        ])  # fmt: skip
    return rows


def _bf16(result: dict) -> str:
    """One CPU name covers models with and without bf16 in hardware (2.5× apart here): runs
    that recorded it (``bf16_native``) say which."""
    return {True: ", bf16", False: ", no bf16"}.get(result.get("bf16_native"), "")


def _machine(result: dict) -> str:
    """The machine of a run, in words (what groups runs)."""
    return f"{result['cpu']} ({result['cores']} cores{_bf16(result)})"


def _run_rows(results: list[dict]) -> list[list]:
    """One row per run, in the order they ran."""
    return [
        [r["date"], r["cpu"], f"`{r['variant']}`", r["budget"], r.get("steps") or "–",
         f"{r['knn_top1']:.3f}",
         f"{r['knn20_top1']:.3f}" if r.get("knn20_top1") is not None else "–",
         f"{r['linear_top1']:.3f}" if r.get("linear_top1") is not None else "–",
         # Records before the field: every variant then ran the preset's fp32.
         {"no": "fp32", None: "–"}.get(r.get("precision", "no"), r.get("precision")),
         "–" if r.get("load_before") is None else f"{r['load_before']:.2f}",
         "transcribed" if r.get("transcribed") else "recorded"]
        for r in results
    ]  # fmt: skip


def latest_sitting(results: list[dict]) -> list[dict]:
    """The runs of the latest run's machine on its day and the days just before it without a
    day's gap: one sitting that ran past midnight stays one comparison."""
    if not results:
        return []

    def day_of(r: dict) -> datetime.date:  # "2026-12-03/04" (a transcribed sitting): its first day
        return datetime.date.fromisoformat(r["date"][:10])

    machine = _machine(results[-1])
    mine = [r for r in results if _machine(r) == machine]
    days = {day_of(r) for r in mine}
    first = day_of(results[-1])
    while first - datetime.timedelta(days=1) in days:
        first -= datetime.timedelta(days=1)
    return [r for r in mine if day_of(r) >= first]


def report_lines(results: list[dict]) -> list[str]:
    """The study's page: the variants measured in the latest sitting on one machine (the
    comparisons at equal time hold within one machine and day), the variants over every run,
    every run."""
    header = ["variant", "what", "machine", "training", "runs", "kNN top-1, k = 200 (range)",
              "points over random", "kNN, k = 20 (range)", "linear top-1 (range)", "steps",
              "--set on the cpu preset"]  # fmt: skip
    machines = sorted({_machine(r) for r in results})
    dates = sorted({r["date"] for r in results})
    budgets = sorted({r["budget"] for r in results if r["variant"] != "random"})
    latest = latest_sitting(results)
    days = sorted({r["date"] for r in latest})
    span = " to ".join(dict.fromkeys(days[:1] + days[-1:]))
    day = f"{span}, {_machine(latest[-1])}" if latest else "–"
    return [
        "# Photos: what learns most per minute (Imagewoof, the `cpu` preset)",
        "",
        "`python scripts/bench_photos.py run VARIANT… --budget 10m` then `report` (this page). "
        "Each run: `scripts/train.py --preset cpu --data imagewoof/train --time-budget "
        f"{', '.join(budgets) or '10m'} --set …`, then `scripts/evaluate.py knn` (k = 200) and "
        "`linear` on imagewoof/val (3,929 photos of 10 dog breeds; chance 0.100).",
        "",
        f"- Machine: {'; '.join(machines)}",
        f"- Dates: {', '.join(dates)}",
        "",
        f"## Same machine, one sitting ({day})",
        "",
        *bench.markdown_table(header, _variant_rows(latest, results), "llllrrrrrrl"),
        "",
        "## Every run, by variant and machine",
        "",
        *bench.markdown_table(header, _variant_rows(results), "llllrrrrrrl"),
        "",
        "## Every run",
        "",
        "`transcribed`: figures copied from a session's notes after its machine, and the raw "
        "records with it, were lost; `recorded`: the line `run` appended.",
        "",
        *bench.markdown_table(
            [
                "date",
                "machine",
                "variant",
                "training",
                "steps",
                "kNN",
                "kNN, k = 20",
                "linear",
                "precision",
                "load before",
                "record",
            ],
            _run_rows(results),
            "llllrrrrlrl",
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the variants")
    run = sub.add_parser("run", help="train and evaluate variants, one after another")
    run.add_argument("variants", nargs="+", choices=list(VARIANTS))
    run.add_argument("--budget", default="10m", help="the training time of each run")
    run.add_argument("--runs", default="runs/photos", help="where the run folders go")
    run.add_argument("--cache", default=str(Path.home() / ".cache/lowres_ssl"))
    sub.add_parser("report", help=f"write {REPORT.relative_to(REPO)} from every result")
    args = parser.parse_args()
    if args.command == "list":
        for name, (what, _) in VARIANTS.items():
            print(f"{name:20} {what}  [{' '.join(variant_sets(name))}]")
        return 0
    if args.command == "report":
        bench.write_report(report_lines(read_results()), REPORT)
        return 0
    data, runs = photos(Path(args.cache)), Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    for name in args.variants:
        index = sum(r["variant"] == name for r in read_results())
        while (runs / f"{name}-{index}").exists():  # a run not recorded (failed, or set aside)
            index += 1
        result = run_variant(name, index, args.budget, runs, data)
        with RESULTS.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
