"""Defenses, one per file. `DEFENSES` is their registry (core/registry.py): each file's name (ft, fp, anp, ...) ->
the Defense subclass it defines, found by scanning this package, so adding a defense is adding a file (and its
config); its class carries the metadata (`family`, `display_name`, `smoke_args`) that grids, reports, tables and
tests read."""

from __future__ import annotations

import importlib
from pathlib import Path

from core.registry import Registry
from datamodules.record import load_checkpoint
from lightning_modules.defenses.base import Defense

DEFENSES: Registry[type[Defense]] = Registry(
    "defense", Defense, {"family": None, "display_name": None, "smoke_args": [], "changes_architecture": False})
DEFENSES.discover(__name__, skip={"base", "evaluation", "pruning", "hooks", "retuning"})  # helper modules, not defenses
globals().update({cls.__name__: cls for cls in DEFENSES.values()})  # lightning_modules.defenses.FT, ...


def load_defended(path: str | Path, map_location: str = "cpu") -> Defense:
    """A defended model from its checkpoint alone: the checkpoint carries its attacked model's record (backbone,
    data, attack), so the attacked checkpoint may have moved or be gone; `backdoored` then names this file."""
    ckpt = load_checkpoint(path, map_location)
    info = ckpt.get("defense")
    if not info:
        raise ValueError(f"{path} is not a defense checkpoint (no 'defense' entry); use load_attacked")
    module_name, _, name = info["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    if not (isinstance(cls, type) and issubclass(cls, Defense)):
        raise ValueError(f"{info['class_path']} is not a Defense")
    return cls.load_from_checkpoint(path, map_location=map_location, backdoored=str(path)).eval()


__all__ = ["DEFENSES", "Defense", "load_defended", *(cls.__name__ for cls in DEFENSES.values())]
