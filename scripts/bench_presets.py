"""Every preset against its card: the memory estimator's prediction beside measured peaks.

    python scripts/bench_presets.py --device cpu    # writes docs/benchmarks/presets.md
    python scripts/bench_presets.py --device cuda   # writes docs/benchmarks/presets_cuda.md
    python scripts/bench_presets.py --device cuda --presets 8gb --steps 3 --output out.md

(The last: the trimmed grid of ``scripts/gpu_checks.sh``; ``--max-cases N`` trims each table.)

CPU: the estimate of every preset (at 32 px, CIFAR-size images, and at its photo size) for its
own card, and a few small real cases measured here (peak RSS growth of two real steps against
the estimate without the weights, which exist before the steps).

CUDA (on a large GPU): every GPU preset on an emulated card of its size
(``LOWRES_SSL_GPU_GIB``: the allocator is capped there), a fixed number of real steps at
32 px and at the photo size on random images (the decoded set kept on the card as in a CIFAR-10
run): peak reserved and allocated, images/s, the estimate, and whether reserved stays within
90 % of the card. Then, side by side on the 8 GB card: the embedding cache against the same
batch in one pass, checkpointing on and off, 8-bit against 32-bit optimizer state.

Each case runs in its own process, so that its peak is its own, and the report is saved after
every case, so that a run killed part-way keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# after the path, so that the script runs from a checkout without installing the package
import torch  # noqa: E402

from lowres_ssl import bench  # noqa: E402
from lowres_ssl.memory import HEADROOM, Setting, estimate  # noqa: E402

OUTPUTS = {
    "cpu": REPO / "docs/benchmarks/presets.md",
    "cuda": REPO / "docs/benchmarks/presets_cuda.md",
}
#: Small real cases measured on the CPU: (view size, projector, batch, micro-batch or 0,
#: gradient checkpointing, small crops at half the view size).
CPU_CASES = [
    (32, "256-512", 64, 0, False, 0),
    (32, "256-512", 64, 16, False, 0),
    (32, "256-512", 128, 0, False, 0),
    (32, "256-512", 128, 0, True, 0),
    (32, "1024-2048", 128, 0, False, 0),
    (32, "1024-2048", 128, 32, False, 0),
    (96, "512-1024", 32, 0, False, 0),
    (96, "512-1024", 32, 0, False, 6),
    (96, "512-1024", 64, 16, False, 6),
    (96, "1024-2048", 32, 0, False, 6),  # the cpu preset on photos with 6 crops
    (96, "1024-8192", 32, 0, False, 0),  # the cpu preset's long runs on photos (q = 8,192)
]

#: The same measurement per backbone: timm and torchvision models beside ResNet-18 (96 px,
#: batch 32, projector 512-1024), checkpointing off and on.
BACKBONE_CASES = ["resnet18", "timm/resnet10t", "timm/convnext_atto", "timm/mobilenetv3_large_100",
                  "timm/vit_tiny_patch16_224", "torchvision/mobilenet_v3_small"]  # fmt: skip


def measure(setting, steps: int) -> dict:
    """Run ``steps`` real training steps of ``setting`` (a :class:`lowres_ssl.memory.Setting`)
    in this process; its peak memory, time per step and the estimate."""
    s = setting
    est = estimate(s)
    rig = bench.step_rig(s)
    cache = None
    if rig.cuda and s.cached_images:  # the decoded set on the card, as data.cache auto keeps it
        side = s.load_size
        cache = torch.zeros(s.cached_images, 3, side, side, dtype=torch.uint8, device="cuda")
    before = rig.reset_peak()
    try:
        times = [rig.run() for _ in range(steps)]
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory", "estimated_gib": est.total_gib}
    del cache
    timed = sorted(times[1:] or times)  # the first step allocates the optimizer state
    out = {
        "estimated_gib": est.total_gib,
        "step_s": timed[len(timed) // 2],
        "images_per_s": s.batch_size / timed[len(timed) // 2],
    }
    peak = rig.peak()
    if rig.cuda:
        out.update(peak)
    else:
        out["measured_gib"] = peak["rss_gib"] - before
        out["estimated_gib"] = (est.total - est.parts["weights"]) / 2**30
    return out


def run_isolated(setting: Setting, steps: int, env: dict[str, str] | None = None) -> dict:
    """:func:`measure` in a fresh process of this script (``--one``), with ``env`` set."""
    payload = json.dumps(dataclasses.asdict(setting))
    child = bench.run_fresh_process(__file__, ["--one", payload, "--steps", str(steps)], env=env)
    if child.failure:
        return {"error": child.failure[:160]}
    return child.result


def preset_settings(name: str, size: str):
    """(config, estimate, card GiB) of preset ``name`` for its card (0: the CPU, sized for the
    RAM), at 32 px (``size`` "small") or at its photo size."""
    from lowres_ssl import plan, presets
    from lowres_ssl.config import config_at_size
    from lowres_ssl.device import ram_gib
    from lowres_ssl.tasks import Pretraining

    _, values, meta = presets.load_preset(name)
    values.setdefault("data", {})["path"] = "cifar10"
    photo_size = ((values.get("photos") or {}).get("data") or {}).get("load_size", plan.PHOTO_SIZE)
    cfg = config_at_size(values, 32 if size == "small" else photo_size)
    card = float(meta.get("vram_gib") or 0)
    machine = plan.Machine.card(card) if card else plan.Machine("cpu", ram_gib())
    planned = plan.resolve(cfg, machine, defaults=Pretraining.defaults)
    return planned.cfg, planned.estimate, card


@dataclass
class Report:
    """The report's finished lines, saved with the table being measured after every case, so
    that a run killed part-way keeps what it measured."""

    output: Path
    lines: list[str]

    def add(self, *lines: str) -> None:
        self.lines += lines
        bench.save_report(self.lines, self.output)

    def show_row(self, header: list[str], rows: list[list]) -> None:
        """Print the newest row and save the report with the table so far."""
        print(bench.markdown_row(rows[-1]), flush=True)
        bench.save_report([*self.lines, *bench.markdown_table(header, rows)], self.output)


def estimate_table(report: Report, names: list[str] | None) -> list[str]:
    """The estimate of each preset (``names``; None: all) for its card, at both sizes."""
    from lowres_ssl import presets

    header = ["preset", "card", "backbone", "views", "batch / micro-batch", "q"]
    header += ["estimated peak GiB", "of the card"]
    rows = []
    for name in names or presets.available():
        for size in ("small", "photo"):
            _, est, card = preset_settings(name, size)
            s = est.setting
            micro = s.micro if s.micro < s.batch_size else "one pass"
            share = f"{est.total_gib / card:.0%}" if card else "–"
            rows.append(
                [name, f"{card:g} GB" if card else "CPU", s.backbone, f"{s.view_size} px",
                 f"{s.batch_size} / {micro}", f"{s.q:,}", f"{est.total_gib:.2f}", share]
            )  # fmt: skip
            report.show_row(header, rows)
    return bench.markdown_table(header, rows)


def cpu_cases(steps: int, report: Report, max_cases: int | None) -> list[str]:
    """The estimate against the measured RSS growth of each of :data:`CPU_CASES`."""
    header = ["views", "projector", "batch / micro-batch", "checkpointing", "estimated GiB"]
    header += ["measured GiB", "measured / estimated"]
    rows = []
    for size, projector, batch, micro, checkpointing, crops in CPU_CASES[:max_cases]:
        s = Setting(
            projector=projector, view_size=size, load_size=size, batch_size=batch,
            micro_batch_size=micro or None, mixed=False, cuda=False, state_bits=32,
            checkpointing=checkpointing, small_views=crops, small_size=size // 2,
            positive_blocks=2 * (1 + crops),
        )  # fmt: skip
        r = run_isolated(s, steps, env={"OMP_NUM_THREADS": "1"})
        ck = "on" if checkpointing else "off"
        views = f"2 × {size} px" + (f" + {crops} × {size // 2} px" if crops else "")
        if "error" in r:
            rows.append([views, projector, f"{batch} / {micro or '–'}", ck, r["error"]])
        else:
            ratio = r["measured_gib"] / r["estimated_gib"]
            rows.append(
                [views, projector, f"{batch} / {micro or 'one pass'}", ck,
                 f"{r['estimated_gib']:.3f}", f"{r['measured_gib']:.3f}", f"{ratio:.2f}"]
            )  # fmt: skip
        report.show_row(header, rows)
    return bench.markdown_table(header, rows)


def _backbone_case_list() -> list[tuple[str, bool | None]]:
    """(backbone, checkpointing) of each case; None: timm is missing, one row says so."""
    import importlib.util

    timm = importlib.util.find_spec("timm") is not None
    return [
        (backbone, checkpointing)
        for backbone in BACKBONE_CASES
        for checkpointing in (
            (False, True) if timm or not backbone.startswith("timm/") else (None,)
        )
    ]


def backbone_cases(steps: int, report: Report, max_cases: int | None) -> list[str]:
    """The estimate against the measured RSS growth per backbone (:data:`BACKBONE_CASES`)."""
    header = ["backbone", "checkpointing", "estimated GiB", "measured GiB", "measured / estimated"]
    rows = []
    for backbone, checkpointing in _backbone_case_list()[:max_cases]:
        if checkpointing is None:
            rows.append([f"`{backbone}`", "–", "timm not installed (pip install -e '.[timm]')"])
            report.show_row(header, rows)
            continue
        s = Setting(
            backbone=backbone, projector="512-1024", view_size=96, load_size=96,
            batch_size=32, mixed=False, cuda=False, state_bits=32, loss="simclr",
            checkpointing=checkpointing, kernel_degree=None,
        )  # fmt: skip
        r = run_isolated(s, steps, env={"OMP_NUM_THREADS": "1"})
        ck = "on" if checkpointing else "off"
        if "error" in r:
            rows.append([f"`{backbone}`", ck, r["error"]])
        else:
            ratio = r["measured_gib"] / r["estimated_gib"]
            rows.append([f"`{backbone}`", ck, f"{r['estimated_gib']:.3f}",
                         f"{r['measured_gib']:.3f}", f"{ratio:.2f}"])  # fmt: skip
        report.show_row(header, rows)
    return bench.markdown_table(header, rows)


def emulated_card_table(
    steps: int, report: Report, names: list[str] | None, max_cases: int | None
) -> list[str]:
    """Every GPU preset (of ``names``; None: all) on an emulated card of its size, at 32 px and
    at its photo size."""
    from lowres_ssl import presets

    header = ["preset", "views", "batch / micro-batch", "estimated GiB", "allocated GiB"]
    header += ["reserved GiB", "reserved ≤ 90 % of the card", "img/s"]
    rows = []
    cards = {n: c for n, c in presets.card_sizes().items() if c and (not names or n in names)}
    for name, size in itertools.islice(itertools.product(cards, ("small", "photo")), max_cases):
        card = cards[name]
        _, est, _ = preset_settings(name, size)
        s = est.setting
        r = run_isolated(s, steps, env={"LOWRES_SSL_GPU_GIB": str(card)})
        head = [name, f"{s.view_size} px", f"{s.batch_size} / {s.micro}", f"{est.total_gib:.2f}"]
        if "error" in r:
            rows.append([*head, r["error"]])
        else:
            fits = "yes" if r["reserved_gib"] <= HEADROOM * card else "**no**"
            rows.append(
                [*head, f"{r['allocated_gib']:.2f}", f"{r['reserved_gib']:.2f}", fits,
                 f"{r['images_per_s']:.0f}"]
            )  # fmt: skip
        report.show_row(header, rows)
    return bench.markdown_table(header, rows)


def variants_table(steps: int, report: Report, max_cases: int | None) -> list[str]:
    """The 8gb preset at 32 px side by side with one thing changed each, uncapped."""
    base = preset_settings("8gb", "small")[1].setting
    variants = {
        "as the preset": base,
        "one pass (no cache)": dataclasses.replace(base, micro_batch_size=None),
        "checkpointing on": dataclasses.replace(base, checkpointing=True),
        "32-bit optimizer state": dataclasses.replace(base, state_bits=32),
    }
    header = ["variant", "estimated GiB", "allocated GiB", "reserved GiB", "img/s"]
    rows = []
    for label, s in list(variants.items())[:max_cases]:
        r = run_isolated(s, steps)
        e = estimate(s).total_gib
        if "error" in r:
            rows.append([label, f"{e:.2f}", r["error"]])
        else:
            rows.append(
                [label, f"{e:.2f}", f"{r['allocated_gib']:.2f}", f"{r['reserved_gib']:.2f}",
                 f"{r['images_per_s']:.0f}"]
            )  # fmt: skip
        report.show_row(header, rows)
    return bench.markdown_table(header, rows)


def add_cpu_sections(report: Report, steps: int, max_cases: int | None) -> None:
    report.add(
        "## The estimator against measured CPU peaks",
        "",
        "Two real steps each (fp32, 32-bit LARS, SFRIK; built by the pre-training task as a "
        "run builds them), each case in a fresh process: peak RSS growth during the steps "
        "against the estimate without the weights (allocated before). The CPU's heap and "
        "oneDNN overhead in the estimate is calibrated on these.",
        "",
    )
    report.add(
        *cpu_cases(steps, report, max_cases),
        "",
        "Per backbone (2 × 96 px, projector 512-1024, batch 32, SimCLR, fp32, 32-bit LARS; "
        "the same measurement): the activations of a timm or torchvision model are counted "
        "the same way, by running it once on the CPU, stage by stage.",
        "",
    )
    report.add(
        *backbone_cases(steps, report, max_cases),
        "",
        "Not measured here: the GPU. The CUDA context (600 MiB) and the allocator's slack "
        "(10 %) are assumptions until `--device cuda` runs on a GPU.",
    )


def add_cuda_sections(
    report: Report, steps: int, names: list[str] | None, max_cases: int | None
) -> None:
    report.add("## Measured on emulated cards", "")
    report.add(*emulated_card_table(steps, report, names, max_cases), "")
    if names and "8gb" not in names:
        return  # the variants are the 8gb preset's
    report.add("8gb preset at 32 px (uncapped: what each variant needs):", "")
    report.add(*variants_table(steps, report, max_cases))


def parse_args() -> argparse.Namespace:
    from lowres_ssl import presets

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--steps", type=int, help="real steps per case (default 2 CPU, 6 CUDA)")
    p.add_argument(
        "--presets",
        help="comma-separated presets to estimate and, on CUDA, measure (default: all; the 8gb "
        "preset's variants only where 8gb is among them)",
    )
    p.add_argument("--max-cases", type=int, help="at most this many measured cases per table")
    p.add_argument("--output", type=Path, help="markdown report (default under docs/benchmarks)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one case, JSON out
    args = p.parse_args()
    args.presets = args.presets.split(",") if args.presets else None
    unknown = set(args.presets or ()) - set(presets.available())
    if unknown:
        p.error(f"unknown preset {', '.join(sorted(unknown))}; choose from {presets.available()}")
    return args


def main() -> int:
    args = parse_args()
    steps = args.steps or (2 if args.device == "cpu" else 6)
    if args.one:
        bench.send_result_to_parent(measure(Setting(**json.loads(args.one)), steps))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda needs a CUDA GPU; run --device cpu here", file=sys.stderr)
        return 2
    load = bench.load_average()
    output = args.output or OUTPUTS[args.device]
    report = Report(output, [
        f"# Presets and the memory estimator ({args.device})",
        "",
        f"Written by `python scripts/bench_presets.py --device {args.device}`.",
        "",
        *bench.machine_lines(args.device),
        *bench.load_lines(load),
        "",
        "## Every preset on its card: **estimates** (`lowres_ssl.memory`, not measurements)",
        "",
        "The micro-batch is the one `train.micro_batch_size: auto` fits to the card (90 % of "
        "it, the CUDA context counted); CIFAR-size images are kept on the card "
        "(`data.cache: auto`).",
        "",
    ])  # fmt: skip
    report.add(*estimate_table(report, args.presets), "")
    if args.device == "cpu":
        add_cpu_sections(report, steps, args.max_cases)
    else:
        add_cuda_sections(report, steps, args.presets, args.max_cases)
    bench.write_report(report.lines, output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
