"""Where the tests find the small real recordings (IBL, human MTL, rat CA1): one place for all of them.

They live next to the repository, in ``../shared/data/real`` (never copied into it);
``NH_SERVE_REAL_DATA`` points elsewhere. Tests that need them skip when the folder is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

REAL = Path(os.environ.get("NH_SERVE_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "real"))
