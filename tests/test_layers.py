"""The shape of the code: imports point one way down the floors, no module imports itself back
through others, no function is longer than a screen, and one module names the run folder's
files. ``python tests/test_layers.py`` prints each module's imports and the longest functions.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lowres_ssl"

#: Lowest first; a module may import its own floor and those below. ``config`` sits above the
#: building blocks because it validates names against their registries (loss, backbone,
#: recipe, optimizer names); the blocks never import it.
FLOORS = [
    ["errors", "files", "durations", "run_layout", "small_images"],
    ["device", "losses", "models", "data", "augment", "optim"],
    ["config", "presets", "memory", "length"],
    ["weights", "eval", "plan", "plots", "predict"],
    ["engine"],
    ["tasks", "bench", "explore"],
    ["cli", "cli_results"],
]
MAX_FUNCTION_LINES = 80  # docstring excluded
#: The run folder's file names, spelled only in lowres_ssl/run_layout.py.
RUN_FILES = (
    "config.yaml", "metrics.jsonl", "summary.json", "skipped_files.txt", "backbone.safetensors",
    "classifier.safetensors", "classifier_last.safetensors", "train_subset.json",
    "trainer_state.json", "model.safetensors",
)  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_in(source: str, module: str, known: set[str], *, is_package: bool = False) -> set[str]:
    """The package's modules ``source`` (the text of ``module``) imports, at its top or inside
    functions; a relative import counts as the absolute module it names. ``is_package``: the
    source is a package's ``__init__.py``, its own package for ``from .x import y``."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:  # `.` is the importing module's package, each further dot its parent
                parts = package.split(".")
                target = ".".join([*parts[: len(parts) - node.level + 1], *filter(None, [target])])
            if target.split(".")[0] != "lowres_ssl":
                continue
            for alias in node.names:  # `from lowres_ssl.engine import steps` is the module
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "lowres_ssl")
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package's modules the file ``path`` imports (see :func:`imports_in`)."""
    source = path.read_text(encoding="utf-8")
    return imports_in(source, module_name(path), known, is_package=path.name == "__init__.py")


def test_relative_imports_count_as_the_module_they_name():
    known = {
        "lowres_ssl.data", "lowres_ssl.data.sizes", "lowres_ssl.models",
        "lowres_ssl.models.backbones", "lowres_ssl.models.library", "lowres_ssl.errors",
    }  # fmt: skip
    source = (
        "from .library import LibraryBackbone\n"
        "from . import library\n"
        "from ..data.sizes import SMALL_MAX\n"
        "from ..data import sizes\n"
        "def f():\n"
        "    from ..errors import UserError\n"
        "from torch import nn\n"
    )
    assert imports_in(source, "lowres_ssl.models.backbones", known) == {
        "lowres_ssl.models.library", "lowres_ssl.data.sizes", "lowres_ssl.errors",
    }  # fmt: skip
    # A package's __init__ is its own package: `.backbones` is its child, `..` its parent.
    init = "from .backbones import build_backbone\nfrom .. import errors\n"
    assert imports_in(init, "lowres_ssl.models", known, is_package=True) == {
        "lowres_ssl.models.backbones", "lowres_ssl.errors",
    }  # fmt: skip
    assert imports_in(init, "lowres_ssl.models.projector", known) == {
        "lowres_ssl.models.backbones", "lowres_ssl.errors",
    }  # fmt: skip


def floor_of(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    for level, names in enumerate(FLOORS):
        if part in names:
            return level
    raise AssertionError(f"{module} is on no floor: add it to FLOORS in {__file__}")


def import_graph() -> dict[str, set[str]]:
    known = set(modules())
    return {m: imports_of(p, known) - {m} for m, p in modules().items() if m != "lowres_ssl"}


def test_every_import_points_down_the_floors():
    upward = [
        f"{m} (floor {floor_of(m)}) imports {t} (floor {floor_of(t)})"
        for m, targets in import_graph().items()
        for t in sorted(targets)
        if t != "lowres_ssl" and floor_of(t) > floor_of(m)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = import_graph()
    # A package's __init__ re-exports its modules: a module importing its own package's
    # __init__ is not a cycle of meaning, so edges into a package's own __init__ are left out.
    edges = {
        m: {t for t in ts if t in graph and not (m.startswith(t + ".") and t != m)}
        for m, ts in graph.items()
    }
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(" → ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def function_lengths() -> list[tuple[int, str]]:
    """(lines without the docstring, file:function) of every function in lowres_ssl/, scripts/."""
    rows = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(ROOT / "scripts").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            first = node.body[0]
            doc = 0
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                doc = (
                    first.end_lineno - first.lineno + 1 if isinstance(first.value.value, str) else 0
                )
            length = node.end_lineno - node.lineno + 1 - doc
            rows.append((length, f"{path.relative_to(ROOT)}:{node.name}"))
    return sorted(rows, reverse=True)


def test_no_function_longer_than_a_screen():
    long = [f"{n} lines: {where}" for n, where in function_lengths() if n > MAX_FUNCTION_LINES]
    assert not long, "\n".join(long)


def test_the_training_loop_fits_on_one_screen():
    lengths = {where: n for n, where in function_lengths()}
    assert lengths["lowres_ssl/engine/trainer.py:run_loop"] <= 60


def test_run_folder_files_are_named_in_one_module():
    spelled = re.compile("|".join(re.escape(f'"{name}"') for name in RUN_FILES))
    found = [
        f"{path.relative_to(ROOT)}:{i}"
        for path in sorted([*PACKAGE.rglob("*.py"), *(ROOT / "scripts").glob("*.py")])
        if path.name != "run_layout.py"
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if spelled.search(line)
    ]
    assert not found, found


def test_the_engine_never_imports_a_task():
    graph = import_graph()
    engine = {m: ts for m, ts in graph.items() if m.startswith("lowres_ssl.engine")}
    assert engine, "no engine modules found"
    assert not [m for m, ts in engine.items() if any(t.startswith("lowres_ssl.tasks") for t in ts)]


def _names_a_device(node: ast.AST) -> bool:
    """Whether an expression reads as a device: ``x.device``, ``device``, ``self.device``,
    ``train_device``, ``torch.device(...)``."""
    if isinstance(node, ast.Attribute):
        return node.attr == "device" or node.attr.endswith("_device")
    if isinstance(node, ast.Name):
        return node.id == "device" or node.id.endswith("_device")
    if isinstance(node, ast.Call):
        return _names_a_device(node.func)
    return False


#: Where devices may be compared: the helper that makes two names of one device equal.
DEVICE_HELPER = "lowres_ssl/device.py"


def device_comparisons() -> list[str]:
    """``file:line: expression`` for each ``==``, ``!=``, ``in`` or ``is`` between devices, and
    each ``device.index``, in the package outside :data:`DEVICE_HELPER`. ``cuda`` and
    ``cuda:0`` (Accelerate's device and a tensor's on one GPU) compare unequal, as do ``cpu``
    and ``cpu:0``: comparisons go through ``lowres_ssl.device.same_device``."""
    eq = (ast.Eq, ast.NotEq, ast.Is, ast.IsNot, ast.In, ast.NotIn)
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = str(path.relative_to(ROOT))
        if where == DEVICE_HELPER:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare) and any(isinstance(op, eq) for op in node.ops):
                sides = [node.left, *node.comparators]
                against_none = any(isinstance(x, ast.Constant) and x.value is None for x in sides)
                if not against_none and any(_names_a_device(x) for x in sides):
                    found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
            elif (
                isinstance(node, ast.Attribute)
                and node.attr == "index"
                and _names_a_device(node.value)
            ):
                found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_devices_are_compared_only_through_the_helper():
    found = device_comparisons()
    assert not found, "compare devices with lowres_ssl.device.same_device:\n" + "\n".join(found)


if __name__ == "__main__":
    for module, targets in sorted(import_graph().items()):
        print(f"{module} [{floor_of(module)}] → {', '.join(sorted(targets)) or '-'}")
    print("longest functions (docstring excluded):")
    for n, where in function_lengths()[: int(sys.argv[1]) if len(sys.argv) > 1 else 3]:
        print(f"  {n:4d}  {where}")
    found = device_comparisons()
    print(f"device comparisons outside {DEVICE_HELPER}: {len(found)}")
    for line in found:
        print(f"  {line}")
