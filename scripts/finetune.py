#!/usr/bin/env python
"""Supervised fine-tuning on a labeled folder:
``accelerate launch scripts/finetune.py --checkpoint runs/NAME --train DIR --val DIR``.

``--help`` lists the flags; ``docs/finetuning.md`` ("Two paths") explains the two
paths (continued self-supervised training, then supervised fine-tuning).
"""

from lowres_ssl.cli import finetune_main

if __name__ == "__main__":
    raise SystemExit(finetune_main())
