"""Training curves of one or several run folders, drawn into one PNG.

``read_metrics`` reads a run's ``metrics.jsonl``; ``panels_for`` says which panels the runs have
data for; ``plot_runs`` draws them, one colour per run, with the x axis in optimizer steps:

* ``loss`` (per logged step, and each epoch's mean as a dotted line of markers),
* ``term:NAME``, one panel per loss term (``invariance``, ``mmd``, ``variance``, …): the terms
  of one objective differ by orders of magnitude from each other and from the loss, so each
  gets its own y axis, and runs of different objectives overlay on the terms they share,
* ``knn``: kNN top-1 accuracy of the evaluations (one line per k),
* ``lr``, ``images_per_s``, ``gpu_memory`` (peak allocated and reserved), ``cpu_memory``
  (peak RSS).

A panel is drawn only when at least one run has its metric. Epoch ends are faint vertical lines
in the run's colour. Drawing needs matplotlib, the optional ``plot`` extra.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from lowres_ssl.errors import UserError
from lowres_ssl.files import write_atomic
from lowres_ssl.run_layout import METRICS_FILE

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["panels_for", "plot_runs", "read_metrics"]

# Keys of a "step" record that are not loss terms; every other number is one.
MEMORY_KEYS = ("gpu_allocated_gib", "gpu_reserved_gib", "cpu_rss_gib")
NOT_TERMS = frozenset({"kind", "step", "epoch", "loss", "lr", "images_per_s", *MEMORY_KEYS})
# kNN accuracies: "knn_top1" at the record's own k, "knn20_top1" at k = 20.
KNN_TOP1 = re.compile(r"knn(\d*)_top1")
NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
MAX_EPOCH_LINES = 40  # beyond this the faint lines would grey the whole panel

# Panel name -> (title, y label with its unit); a "term:NAME" panel is titled after NAME.
PANEL_TITLES = {
    "loss": ("loss", "loss"),
    "knn": ("kNN top-1 accuracy", "top-1 accuracy (%)"),
    "lr": ("learning rate", "lr"),
    "images_per_s": ("throughput", "images / s"),
    "gpu_memory": ("GPU memory (peak)", "GiB"),
    "cpu_memory": ("CPU memory (peak RSS)", "GiB"),
}

Records = dict[str, list[dict[str, Any]]]


def read_metrics(run_dir: str | Path) -> Records:
    """The records of ``run_dir/metrics.jsonl``, grouped by their ``kind`` and sorted by step.

    Returns e.g. ``{"step": [...], "epoch": [...], "knn": [...]}``. Non-finite floats, which the
    trainer writes as the strings "nan", "inf", "-inf", come back as floats. A line that does not
    parse (the last one of a killed run, cut short) is skipped.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run folder {run} does not exist: pass the --out folder of a training run")
    path = run / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{run} holds no metrics.jsonl: pass the --out folder of a training run")
    groups: Records = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not (isinstance(record, dict) and "kind" in record and _is_number(record.get("step"))):
            continue
        record = {k: NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in record.items()}
        groups.setdefault(str(record["kind"]), []).append(record)
    if not groups:
        raise UserError(f"{path} has no records yet: plot it once the run has logged a step")
    for records in groups.values():
        records.sort(key=lambda r: r["step"])
    return groups


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _has(runs: Sequence[Records], kind: str, key: str) -> bool:
    return any(_is_number(r.get(key)) for run in runs for r in run.get(kind, []))


def _loss_terms(runs: Sequence[Records]) -> list[str]:
    """Loss-term keys of the step records, in order of first appearance."""
    terms: dict[str, None] = {}
    for run in runs:
        for record in run.get("step", []):
            for key, value in record.items():
                if key not in NOT_TERMS and _is_number(value):
                    terms[key] = None
    return list(terms)


def _knn_keys(runs: Sequence[Records]) -> list[str]:
    """The ``knn*_top1`` keys, the record's own k ("knn_top1") first."""
    keys = {k for run in runs for r in run.get("knn", []) for k in r if KNN_TOP1.fullmatch(k)}
    return sorted(keys, key=lambda k: (k != "knn_top1", k))


def panels_for(runs: Sequence[Records]) -> list[str]:
    """Names of the panels ``plot_runs`` draws for these runs (outputs of ``read_metrics``).

    In drawing order: "loss", "term:NAME" per loss term, "knn", "lr", "images_per_s",
    "gpu_memory", "cpu_memory"; each only when at least one run has that metric.
    """
    panels = []
    if _has(runs, "step", "loss") or _has(runs, "epoch", "loss_mean"):
        panels.append("loss")
    panels += [f"term:{term}" for term in _loss_terms(runs)]
    if _knn_keys(runs):
        panels.append("knn")
    panels += [key for key in ("lr", "images_per_s") if _has(runs, "step", key)]
    if _has(runs, "step", "gpu_allocated_gib") or _has(runs, "step", "gpu_reserved_gib"):
        panels.append("gpu_memory")
    if _has(runs, "step", "cpu_rss_gib"):
        panels.append("cpu_memory")
    return panels


def _run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Each folder's name, with as many parent folders as it takes to tell it from the others."""
    parts = [p.resolve().parts for p in run_dirs]
    depth = [1] * len(parts)
    while True:
        labels = [PurePath(*p[-d:]).as_posix() for p, d in zip(parts, depth, strict=True)]
        # A folder given twice clashes at every depth: stop once its full path is shown.
        clashes = [
            i for i, lab in enumerate(labels) if labels.count(lab) > 1 and depth[i] < len(parts[i])
        ]
        if not clashes:
            return labels
        for i in clashes:
            depth[i] += 1


def _series(
    records: list[dict[str, Any]], key: str, scale: float = 1.0
) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that have ``key``; non-finite values become gaps."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if _is_number(value):
            steps.append(record["step"])
            values.append(value * scale if math.isfinite(value) else math.nan)
    return steps, values


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, *, dpi: int = 120) -> Path:
    """Draw the training curves of ``run_dirs`` (overlaid, one colour each) into the PNG ``out``.

    The PNG is written under a temporary name and renamed, so a reader (a browser refreshing it
    during training) never sees half a file. Returns the path of the PNG.
    """
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install -e '.[plot]'") from None
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"the plot is written as PNG: name it *.png, not {out.name}")
    if dpi < 1:
        raise UserError(f"dpi must be a positive number of dots per inch, not {dpi}")
    if not run_dirs:
        raise UserError("no run folder to plot: pass at least one --out folder of a training run")
    paths = [Path(d) for d in run_dirs]
    runs = [read_metrics(p) for p in paths]
    panels = panels_for(runs)
    if not panels:
        raise UserError(f"nothing to plot in {', '.join(map(str, paths))}: no loss, lr or kNN yet")
    labels = _run_labels(paths)
    n = len(runs)
    # Past tab10's ten colours, sample a continuous map rather than repeat a colour.
    colours = (
        [f"C{i}" for i in range(n)]
        if n <= 10
        else [matplotlib.colormaps["turbo"](i / (n - 1)) for i in range(n)]
    )

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    style = {"font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8}
    with matplotlib.rc_context(style):
        # A bare Figure on the Agg canvas: no window, and no pyplot state left behind.
        fig = Figure(figsize=(4.6 * cols, 3.1 * rows + 0.5), layout="constrained")
        FigureCanvasAgg(fig)
        first = None
        for index, panel in enumerate(panels):
            ax = fig.add_subplot(rows, cols, index + 1, sharex=first)
            first = first or ax
            _draw_panel(ax, panel, runs, colours)
            ax.set_xlabel("optimizer step")
            # Horizontal grid only: the vertical lines are the epoch ends.
            ax.grid(axis="y", alpha=0.3)
            for run, colour in zip(runs, colours, strict=True):
                epoch_steps = [r["step"] for r in run.get("epoch", [])]
                stride = math.ceil(len(epoch_steps) / MAX_EPOCH_LINES) or 1
                for step in epoch_steps[stride - 1 :: stride]:
                    ax.axvline(step, color=colour, alpha=0.18, linewidth=0.8, zorder=0)
        handles = [
            Line2D([], [], color=c, linewidth=2, label=lab)
            for c, lab in zip(colours, labels, strict=True)
        ]
        if any(run.get("epoch") for run in runs):
            handles.append(
                Line2D([], [], color="grey", alpha=0.5, linewidth=0.8, label="epoch end")
            )
        # No suptitle: constrained layout draws it over an "outside" legend, and the legend
        # already names the runs.
        fig.legend(handles=handles, loc="outside upper center", ncol=min(len(handles), 4))

        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi), what="the plot")
    return out


def _draw_panel(ax: Axes, panel: str, runs: Sequence[Records], colours: list) -> None:
    """Draw one panel's curves of every run, with its title and y label."""
    from matplotlib.lines import Line2D  # present: plot_runs checked the import

    term = panel.removeprefix("term:")
    title, ylabel = PANEL_TITLES.get(panel, (f"loss term: {term}", term))
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    legend = []
    if panel == "loss":
        for run, colour in zip(runs, colours, strict=True):
            ax.plot(*_series(run.get("step", []), "loss"), color=colour, linewidth=1.2)
            means = _series(run.get("epoch", []), "loss_mean")
            every = math.ceil(len(means[0]) / MAX_EPOCH_LINES) or 1
            ax.plot(*means, ":D", color=colour, linewidth=1, markersize=3.5, markevery=every)
        if any(_series(run.get("epoch", []), "loss_mean")[0] for run in runs):
            legend = [
                Line2D([], [], color="black", linewidth=1.2, label="logged step"),
                Line2D([], [], color="black", ls=":", marker="D", ms=3.5, label="epoch mean"),
            ]
    elif panel == "knn":
        for i, key in enumerate(_knn_keys(runs)):
            style = {"linestyle": "-" if i == 0 else "--", "marker": "os^vD"[i % 5]}
            for run, colour in zip(runs, colours, strict=True):
                ax.plot(*_series(run.get("knn", []), key, 100.0), color=colour, **style)
            legend.append(Line2D([], [], color="black", label=_knn_label(runs, key), **style))
    elif panel == "gpu_memory":
        styles = {"gpu_allocated_gib": ("-", "allocated"), "gpu_reserved_gib": ("--", "reserved")}
        for run, colour in zip(runs, colours, strict=True):
            for key, (ls, _) in styles.items():
                ax.plot(*_series(run.get("step", []), key), color=colour, linestyle=ls)
        legend = [Line2D([], [], color="black", ls=ls, label=lab) for ls, lab in styles.values()]
    else:  # one key of the step records: a loss term, lr, images/s, CPU memory
        key = "cpu_rss_gib" if panel == "cpu_memory" else term
        for run, colour in zip(runs, colours, strict=True):
            ax.plot(*_series(run.get("step", []), key), color=colour, linewidth=1.2)
    if legend:
        # In-panel legends explain line styles only (black); the figure legend maps colours.
        ax.legend(handles=legend, loc="best")


def _knn_label(runs: Sequence[Records], key: str) -> str:
    """ "k = 200" for ``knn_top1`` (k read from the records), "k = 20" for ``knn20_top1``."""
    k = KNN_TOP1.fullmatch(key).group(1)
    if k:
        return f"k = {k}"
    ks = sorted({r["k"] for run in runs for r in run.get("knn", []) if key in r and "k" in r})
    return "k = " + "/".join(map(str, ks)) if ks else "k not logged"
