"""Triggers, one per file. `TRIGGERS` is their registry (core/registry.py): each file's name (badnets, blended,
sig, wanet, ...) -> the Trigger subclass it defines, found by scanning this package, so adding a data-poisoning
attack is adding a trigger file (and its config in configs/attack/). The class carries the attack's metadata:
`display_name` and `dynamic` (static vs dynamic in the report)."""

from __future__ import annotations

from core.registry import Registry
from datamodules.triggers.base import Trigger, build_trigger

TRIGGERS: Registry[type[Trigger]] = Registry("trigger", Trigger, {"display_name": None, "dynamic": False,
                                                                 "clean_label": False})
TRIGGERS.discover(__name__, skip={"base"})
globals().update({cls.__name__: cls for cls in TRIGGERS.values()})  # datamodules.triggers.BadNets, ...

from datamodules.triggers.badnets import apply_badnets  # noqa: E402
from datamodules.triggers.blended import apply_blended  # noqa: E402
from datamodules.triggers.sig import apply_sig  # noqa: E402

__all__ = ["TRIGGERS", "Trigger", "apply_badnets", "apply_blended", "apply_sig", "build_trigger",
           *(cls.__name__ for cls in TRIGGERS.values())]
