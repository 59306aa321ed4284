"""``python -m medanomaly``: the ``medanomaly`` command."""

import sys

from medanomaly.cli import main

if __name__ == "__main__":
    sys.exit(main())
