#!/usr/bin/env python
"""Predictions for a folder of images:
``python scripts/predict.py --checkpoint runs/ft --images DIR --out predictions.csv``.

``--embeddings features.npy`` writes the backbone's features instead. ``--help`` lists the flags.
"""

from lowres_ssl.cli_results import predict_main

if __name__ == "__main__":
    raise SystemExit(predict_main())
