"""``python -m fusionkit`` = the ``fusionkit`` command (works under ``torchrun -m fusionkit``)."""

import sys

from fusionkit.cli import main

sys.exit(main())
