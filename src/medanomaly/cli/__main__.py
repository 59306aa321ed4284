"""``python -m medanomaly.cli`` (e.g. under ``torchrun``)."""

import sys

from medanomaly.cli import main

if __name__ == "__main__":  # worker processes import the main module again: do not rerun
    sys.exit(main())
