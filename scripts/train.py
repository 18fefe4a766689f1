#!/usr/bin/env python
"""Self-supervised training: ``accelerate launch scripts/train.py --preset 8gb --data DIR``.

Plain ``python scripts/train.py …`` runs one process. ``--help`` lists the flags;
``docs/training.md`` documents presets, the run folder and resuming.
"""

from lowres_ssl.cli import train_main

if __name__ == "__main__":
    raise SystemExit(train_main())
