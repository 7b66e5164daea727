"""``python -m export ...``: the ``nh-serve export`` command."""

import sys

from export.cli import main

sys.exit(main())
