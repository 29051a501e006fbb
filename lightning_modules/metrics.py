"""Moved to `core.metrics` (kept so that old imports work)."""

from core.metrics import *  # noqa: F401,F403
