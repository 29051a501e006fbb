"""Moved to `core.backbones` (kept so that old imports and configs naming lightning_modules.backbones.X work)."""

from core.backbones import *  # noqa: F401,F403
from core.backbones import __all__  # noqa: F401
