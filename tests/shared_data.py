"""The shared real images (CIFAR-10 as JPEG files), found beside the project and extracted once.

CI puts ``../shared`` beside the checkout; a user's clone has none, and the tests that need the
images then skip with a reason.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
ARCHIVE = PROJECT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


#: Where the shared images are extracted (once per machine); tests/conftest.py sets it before
#: it points the kit's caches at a folder of the session.
SHARED_DIR_VARIABLE = "LOWRES_SSL_TEST_SHARED"


def extract_dir() -> Path:
    base = (
        os.environ.get(SHARED_DIR_VARIABLE)
        or os.environ.get("LOWRES_SSL_CACHE")
        or Path.home() / ".cache" / "lowres_ssl"
    )
    return Path(base) / "shared-cifar10"


def cifar10_root() -> Path:
    """``…/cifar10`` (with ``train/`` and ``test/`` class folders), extracting on first use."""
    if not ARCHIVE.exists():
        pytest.skip(f"shared CIFAR-10 images not found at {ARCHIVE}")
    final = extract_dir()
    done = final / "cifar10" / ".complete"
    if not done.exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".shared-cifar10-", dir=final.parent))
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(tmp, filter="data")
        (tmp / "cifar10" / ".complete").touch()
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return final / "cifar10"
