"""``python -m medanomaly.cli`` (e.g. under ``torchrun``)."""

import sys

from medanomaly.cli import main

sys.exit(main())
