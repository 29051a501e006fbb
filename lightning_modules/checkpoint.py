"""Moved to `datamodules.checkpoint` (kept so that old imports work)."""

from datamodules.checkpoint import *  # noqa: F401,F403
from datamodules.checkpoint import NET_PREFIX, AttackedRun, load_attacked, network_state  # noqa: F401
