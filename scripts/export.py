#!/usr/bin/env python
"""A run's backbone as safetensors or for torchvision: ``python scripts/export.py --checkpoint
RUN --out resnet18.pth``. ``--help`` lists the flags."""

from lowres_ssl.cli_results import export_main

if __name__ == "__main__":
    raise SystemExit(export_main())
