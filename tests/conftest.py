"""The whole suite: one precision on every machine.

``train.precision: auto`` picks bf16 on a CPU that computes it natively (AVX512-BF16, AMX) and
fp32 on others, so the same test would run a different path on a developer's laptop and in CI.
The suite pins fp32 for ``auto`` on the CPU (subprocesses inherit it); the tests of the choice
itself set the variable they need.
"""

import os

from lowres_ssl.device import CPU_BF16_VARIABLE

os.environ[CPU_BF16_VARIABLE] = "0"
