"""``python -m vaelib``: see :mod:`vaelib.cli`."""

import sys

from vaelib.cli import main

sys.exit(main())
