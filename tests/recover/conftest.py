"""Make the shared set-up module (``lpd_setup``, also used by the ``run_lpd.py`` subprocess) importable under
pytest's ``--import-mode=importlib``."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
