"""Environment variables read outside the settings classes (``ml`` does not import ``core``)."""

from __future__ import annotations

import os


def env_setting(name: str, default: str) -> str:
    """``name``'s value, or ``default`` when it is unset or empty: an empty ``DRSCREEN_`` variable
    counts as unset everywhere (as in core.settings), not as an empty path or precision."""
    return os.environ.get(name, "").strip() or default
