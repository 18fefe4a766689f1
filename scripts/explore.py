#!/usr/bin/env python
"""What a backbone learned about a folder of images:
``python scripts/explore.py runs/NAME ~/photos --out runs/NAME/explore``, then open
``runs/NAME/explore/index.html``. ``--help`` lists the flags; docs/explore.md explains them.
"""

from lowres_ssl.cli_results import explore_main

if __name__ == "__main__":
    raise SystemExit(explore_main())
