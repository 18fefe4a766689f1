"""The README stays true: its Python examples run, and CI runs its test command."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
    assert blocks, "the README shows no Python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    section = re.search(
        r"<!-- test-command:start -->\n```\n(.*?)\n```\n<!-- test-command:end -->",
        README,
        flags=re.DOTALL,
    )
    assert section is not None, "the README has no marked test command"
    printed = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run"), "--print-test-command"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert printed == section.group(1)
    assert "pytest" in printed
