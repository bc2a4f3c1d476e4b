"""Where Meadow keeps what it computes once per machine (throughput measurements, GGUF conversions, the bench model)."""

from __future__ import annotations

import os
from pathlib import Path


def meadow_home() -> Path:
    """Meadow's cache folder: $MEADOW_HOME, else ~/.cache/meadow."""
    return Path(os.environ.get("MEADOW_HOME", "~/.cache/meadow")).expanduser()
