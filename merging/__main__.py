"""``python -m merging CONFIG.yaml --out DIR`` (see :mod:`merging.cli`)."""

import sys

from merging.cli import main

if __name__ == "__main__":
    sys.exit(main())
