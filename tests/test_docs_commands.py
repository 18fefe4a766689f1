"""The commands on the README and the docs pages run as written.

Every ``python scripts/X.py …`` / ``accelerate launch scripts/X.py …`` line of a fenced block in
README.md and docs/*.md (not docs/design.md, not docs/benchmarks/) is parsed by its script's own
parser; the train.py and finetune.py lines without ``--resume`` also resolve their config with
``--dry-run`` added (presets, ``--set`` keys, types and ranges: what a dry run resolves), in a
scratch folder where the placeholder folders (``~/my_photos``, ``DIR``, ``…/cifar10/train``)
exist and ``--checkpoint`` holds a backbone. Nothing trains. The relative links of those pages
are checked too: each target exists, each ``#anchor`` is a heading of its page.
"""

from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest

from lowres_ssl import cli, cli_results
from lowres_ssl.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    ROOT / "README.md",
    *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "design.md"),
]
SHELL_LANGUAGES = {"", "sh", "bash", "shell", "console"}
PARSERS = {
    "train": cli.train_parser,
    "finetune": cli.finetune_parser,
    "evaluate": cli_results.evaluate_parser,
    "predict": cli_results.predict_parser,
    "export": cli_results.export_parser,
    "plot": cli_results.plot_parser,
    "explore": cli_results.explore_parser,
}
#: Flags whose value is a folder of images (or a dataset name) that the config checks exists.
FOLDER_FLAGS = ("--data", "--train", "--val", "--test")
FOLDER_KEYS = ("data.path", "eval.train", "eval.test", "finetune.val")


@dataclass(frozen=True)
class Call:
    page: str
    line: int
    script: str  # scripts/NAME.py
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.script} {shlex.join(self.args)}"


def fenced_blocks(text: str):
    """(language, first line number of the body, body) of every fenced code block."""
    for m in re.finditer(r"^ *```([^\n`]*)\n(.*?)^ *```", text, flags=re.M | re.S):
        yield m.group(1).strip(), text.count("\n", 0, m.start(2)) + 1, m.group(2)


def shell_commands(body: str, first_line: int):
    """(line number, command) of a shell block: continuation lines joined, ``&&`` chains split;
    where some lines start with ``$ `` (a transcript), only those are commands."""
    lines, number, pending = [], first_line, ""
    for i, raw in enumerate(body.splitlines()):
        if not pending:
            number = first_line + i
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append((number, pending + raw))
        pending = ""
    if any(line.lstrip().startswith("$ ") for _, line in lines):
        lines = [(n, line.lstrip()[2:]) for n, line in lines if line.lstrip().startswith("$ ")]
    for number, line in lines:
        for part in line.split("&&"):
            if part.strip():
                yield number, part.strip()


def script_call(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(scripts/X.py, its arguments) of ``python scripts/X.py …`` or ``accelerate launch [its
    options] scripts/X.py …``; None for any other command."""
    at = next((i for i, t in enumerate(tokens) if re.fullmatch(r"scripts/\w+\.py", t)), None)
    if at is None:
        return None
    launcher = tokens[:at]
    assert launcher == ["python"] or launcher[:2] == ["accelerate", "launch"], (
        f"{shlex.join(tokens)}: a script is run with python or accelerate launch"
    )
    return tokens[at], tokens[at + 1 :]


def documented_calls() -> list[Call]:
    calls = []
    for page in PAGES:
        for language, first, body in fenced_blocks(page.read_text()):
            if language not in SHELL_LANGUAGES:
                continue
            for number, command in shell_commands(body, first):
                if not re.search(r"(^|\s)scripts/\w+\.py", command):
                    continue  # another command, or a listing (the run folder's files)
                where = f"{page.relative_to(ROOT)}:{number}"
                try:
                    tokens = shlex.split(command, comments=True)
                except ValueError as err:
                    raise AssertionError(
                        f"{where}: {command!r} is not a shell line: {err}"
                    ) from None
                found = script_call(tokens)
                if found:
                    calls.append(Call(where.rpartition(":")[0], number, found[0], tuple(found[1])))
    return calls


CALLS = documented_calls()


def test_the_pages_show_commands_of_every_front_end():
    shown = {Path(c.script).stem for c in CALLS}
    assert set(PARSERS) <= shown, f"no command shown for {sorted(set(PARSERS) - shown)}"


def _declared_options(script: Path) -> set[str]:
    """The option strings of every ``add_argument`` call in a script without a cli parser."""
    options = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            for arg in node.args:
                if isinstance(arg, ast.Constant) and str(arg.value).startswith("-"):
                    options.add(arg.value)
    return options


def _parse(call: Call, extra: tuple[str, ...] = ()):
    parser = PARSERS[Path(call.script).stem]()
    try:
        return parser.parse_args([*call.args, *extra])
    except SystemExit:
        pytest.fail(f"{call}: its script's parser refuses these arguments")


@pytest.mark.parametrize("call", CALLS, ids=str)
def test_each_command_parses(call):
    script = ROOT / call.script
    assert script.is_file(), f"{call}: no such script"
    if Path(call.script).stem not in PARSERS:  # a benchmark or helper script: its own argparse
        declared = _declared_options(script)
        used = {a.split("=")[0] for a in call.args if a.startswith("--")}
        assert used <= declared, f"{call}: {sorted(used - declared)} not declared"
        return
    args = _parse(call)
    if getattr(args, "resume", False):
        assert args.out, f"{call}: --resume needs --out, the run folder to continue"


# ---------------------------------------------------------------------------------------------
# train.py and finetune.py: the config a dry run resolves


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    """One pre-trained-looking backbone file, linked into every run folder a line names."""
    from lowres_ssl.models import build_backbone
    from lowres_ssl.weights import save_safetensors, spec_of

    net = build_backbone("resnet18", image_size=32)
    file = tmp_path_factory.mktemp("weights") / "backbone.safetensors"
    return save_safetensors(net.state_dict(), spec_of(net, 32, None), file)


def _folder_values(args: tuple[str, ...]) -> list[str]:
    values = [b for a, b in pairwise(args) if a in FOLDER_FLAGS]
    for a, b in pairwise(args):
        key, _, value = b.partition("=")
        if a == "--set" and key in FOLDER_KEYS:
            values.append(value)
    return values


def _make_placeholders(call: Call, backbone: Path) -> None:
    """The folders a line names, created empty (the config checks only that they exist), and a
    backbone in the folder --checkpoint names."""
    from lowres_ssl.data import DATASETS

    for value in _folder_values(call.args):
        if value.partition(":")[0].lower() not in DATASETS:
            Path(value).expanduser().mkdir(parents=True, exist_ok=True)
    if "--checkpoint" in call.args:
        target = Path(call.args[call.args.index("--checkpoint") + 1]).expanduser()
        target.mkdir(parents=True, exist_ok=True)
        if not (target / "backbone.safetensors").exists():
            (target / "backbone.safetensors").symlink_to(backbone)


RESOLVED = [
    c for c in CALLS if Path(c.script).stem in ("train", "finetune") and "--resume" not in c.args
]


@pytest.mark.parametrize("call", RESOLVED, ids=str)
def test_train_and_finetune_lines_resolve_their_config(call, tmp_path, monkeypatch, backbone_file):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LOWRES_SSL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    _make_placeholders(call, backbone_file)
    args = _parse(call, ("--dry-run",))
    assert args.dry_run
    try:
        if Path(call.script).stem == "train":
            cfg, _, _ = cli.train_request(args)
        else:
            cfg, _, _ = cli.finetune_request(args)
    except UserError as err:
        pytest.fail(f"{call}: error: {err}")
    assert cfg.preset, f"{call}: resolved without a preset"


# ---------------------------------------------------------------------------------------------
# Links between the pages


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return {_slug(m) for m in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def _links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"\w+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_point_at_files_and_headings_that_exist(page):
    for link in _links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: {link} does not exist"
        if anchor and target.suffix == ".md":
            assert anchor in _anchors(target), f"{page.name}: {link}: no such heading"


def test_the_readme_links_every_page_and_every_page_links_back():
    readme = {link.partition("#")[0] for link in _links(ROOT / "README.md")}
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, f"the README does not link docs/{page.name}"
        back = {link.partition("#")[0] for link in _links(page)}
        assert "../README.md" in back, f"docs/{page.name} does not link back to the README"
