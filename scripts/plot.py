#!/usr/bin/env python
"""Training curves of run folders in one PNG: ``python scripts/plot.py RUN [RUN …] --out
curves.png`` (needs the ``plot`` extra). ``--help`` lists the flags."""

from lowres_ssl.cli_results import plot_main

if __name__ == "__main__":
    raise SystemExit(plot_main())
