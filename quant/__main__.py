"""``python -m quant CONFIG.yaml --out DIR`` (see :mod:`quant.cli`)."""

import sys

from quant.cli import main

if __name__ == "__main__":
    sys.exit(main())
