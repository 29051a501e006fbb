"""Moved to `core.optim` (kept so that old imports work)."""

from core.optim import *  # noqa: F401,F403
