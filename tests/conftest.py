"""The whole suite: one precision on every machine, and caches of its own.

``train.precision: auto`` picks bf16 on a CPU that computes it natively (AVX512-BF16, AMX) and
fp32 on others, so the same test would run a different path on a developer's laptop and in CI.
The suite pins fp32 for ``auto`` on the CPU (subprocesses inherit it); the tests of the choice
itself set the variable they need.

The decoded images and features the kit caches by default (``~/.cache/lowres_ssl``) go to a
folder of the session, removed when it ends: the test folders' caches (new names each run)
would otherwise pile up in the user's cache. The shared CIFAR-10 images are still extracted
once per machine, where they were.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from lowres_ssl.device import CPU_BF16_VARIABLE
from tests.shared_data import SHARED_DIR_VARIABLE

os.environ[CPU_BF16_VARIABLE] = "0"
os.environ.setdefault(
    SHARED_DIR_VARIABLE,
    os.environ.get("LOWRES_SSL_CACHE") or str(Path.home() / ".cache" / "lowres_ssl"),
)
_CACHE = tempfile.mkdtemp(prefix="lowres_ssl-test-cache-")
os.environ["LOWRES_SSL_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)
