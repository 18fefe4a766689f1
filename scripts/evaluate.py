#!/usr/bin/env python
"""kNN or linear-probe accuracy of a backbone: ``python scripts/evaluate.py knn --checkpoint RUN``.

``--help`` lists the flags; ``docs/evaluation.md`` shows what it prints.
"""

from lowres_ssl.cli_results import evaluate_main

if __name__ == "__main__":
    raise SystemExit(evaluate_main())
