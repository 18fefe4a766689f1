"""The README stays true: its Python examples (and those of the docs pages) run, and CI runs
its test command."""

import re
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
#: The pages whose Python examples run: the README and the user pages docs/*.md (not
#: docs/design.md, the contributors' page, nor the measured reports under docs/benchmarks/).
PAGES = [
    ROOT / "README.md",
    *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "design.md"),
]


def _photos(folder: Path, n: int = 150) -> None:
    """What the data example expects in ./photos: images of mixed sizes and two bad files."""
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = (60 + i % 7, 80 - i % 5, 3)
        path = folder / f"album{i % 3}" / f"IMG_{i:04d}.{'JPG' if i % 2 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    (folder / "album0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    (folder / "empty.png").write_bytes(b"")


def _torchvision_file(path: Path) -> None:
    """What the export example loads: a ResNet-18 with the CIFAR stem, exported by the kit."""
    from lowres_ssl.models import build_backbone
    from lowres_ssl.weights import export, load_weights, save_safetensors, spec_of

    net = build_backbone("resnet18", image_size=32)
    file = save_safetensors(net.state_dict(), spec_of(net, 32, None), path.parent / "b.safetensors")
    export(load_weights(file), path, "torchvision")


def _python_blocks() -> list[tuple[str, str]]:
    """(page, code) of every ```python block of the README and the docs pages."""
    return [
        (str(page.relative_to(ROOT)), block)
        for page in PAGES
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
    ]


def test_python_examples_run(tmp_path, monkeypatch):
    """Each example runs as written, in a folder that holds ./photos (cache there too) and the
    ./resnet18.pth the export example loads."""
    blocks = _python_blocks()
    assert any(page == "README.md" for page, _ in blocks), "the README shows no Python example"
    _photos(tmp_path / "photos")
    _torchvision_file(tmp_path / "resnet18.pth")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOWRES_SSL_CACHE", str(tmp_path / "cache"))
    for page, block in blocks:
        exec(compile(block, page, "exec"), {})
    listed = (tmp_path / "skipped_files.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed[1:]] == ["album0/broken.jpg", "empty.png"]


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
