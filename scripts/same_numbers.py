#!/usr/bin/env python
"""Same numbers before and after a change of the engine: three short runs from one seed.

    python scripts/same_numbers.py run OUT --cifar DIR     # the three runs into OUT
    python scripts/same_numbers.py compare OUT_A OUT_B     # every logged number, side by side

The runs (through the command-line front ends only):
(a) the ``cpu`` preset on CIFAR-10 for 30 steps, (b) the same with the embedding cache
(``train.micro_batch_size=8``, below the batch of 32), (c) ``finetune.py`` for 30 steps from
(a)'s backbone. Every step is logged (``train.log_every=1``). ``compare`` lists, per run, the
per-step losses and every other logged number that does not measure time or memory, and exits
1 if any differs.

``DIR`` is an ImageFolder CIFAR-10 with ``train/`` and ``test/`` (the shared set, extracted).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lowres_ssl.run_layout import METRICS_FILE

RUNS = ("a_cpu", "b_micro", "c_finetune")
#: Logged values that measure the machine (time, memory), not what was learnt.
TIMING = ("images_per_s", "eval_s", "gpu_", "rss_", "cpu_")


def run_all(out: Path, cifar: Path) -> None:
    from lowres_ssl.cli import finetune_main, train_main

    train, test = str(cifar / "train"), str(cifar / "test")
    common = ["--preset", "cpu", "--data", train, "--max-steps", "30"]
    common += ["--set", "train.log_every=1", "--set", f"eval.test={test}"]
    common += ["--set", f"data.cache_dir={out / 'cache'}"]
    common += _new_keys_off()
    assert train_main([*common, "--out", str(out / "a_cpu")]) == 0
    micro = ["--set", "train.micro_batch_size=8"]
    assert train_main([*common, *micro, "--out", str(out / "b_micro")]) == 0
    ft = ["--checkpoint", str(out / "a_cpu"), "--train", train, "--val", test, "--preset", "cpu"]
    ft += ["--max-steps", "30", "--set", "train.log_every=1"]
    ft += ["--set", f"data.cache_dir={out / 'cache'}"]
    assert finetune_main([*ft, "--out", str(out / "c_finetune")]) == 0


def _new_keys_off() -> list[str]:
    """Keys the kit gained since the first runs, set to what those runs did (so a later tree
    runs the same three runs): the cpu preset's kNN of the untrained backbone, which adds a
    record of its own."""
    from lowres_ssl.config import EvalConfig

    return ["--set", "eval.untrained=false"] if hasattr(EvalConfig, "untrained") else []


def numbers(run_dir: Path) -> list[tuple[str, int, str, float]]:
    """(kind, step, key, value) of every logged number that is not a timing."""
    rows = []
    for line in (run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key in ("kind", "step") or key.startswith(TIMING):
                continue
            if isinstance(value, (int, float)):
                rows.append((record["kind"], record["step"], key, float(value)))
    return rows


def compare(a: Path, b: Path) -> int:
    differ = 0
    for name in RUNS:
        ra, rb = numbers(a / name), numbers(b / name)
        losses_a = [v for kind, _, key, v in ra if kind == "step" and key == "loss"]
        losses_b = [v for kind, _, key, v in rb if kind == "step" and key == "loss"]
        same = ra == rb
        differ += not same
        print(
            f"{name}: {len(losses_a)} / {len(losses_b)} step losses, {len(ra)} / {len(rb)} "
            f"numbers; {'identical' if same else 'DIFFERENT'}"
        )
        print(f"  first {losses_a[:1]} / {losses_b[:1]}, last {losses_a[-1:]} / {losses_b[-1:]}")
        for kind, step, key, value in ra:
            if kind != "step":
                print(f"  {kind} step {step} {key} = {value:.6g}")
        if not same:
            for x, y in zip(ra, rb, strict=False):
                if x != y:
                    print(f"  first difference: {x} / {y}")
                    break
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("out")
    r.add_argument("--cifar", required=True, help="CIFAR-10 as folders: DIR/train, DIR/test")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = p.parse_args(argv)
    if args.command == "run":
        run_all(Path(args.out), Path(args.cifar).expanduser())
        return 0
    return compare(Path(args.a), Path(args.b))


if __name__ == "__main__":
    sys.exit(main())
