"""Training-controlled attacks, one per file. `ATTACKS` is their registry (core/registry.py): each file's name
(wanet, iab, bpp, lira) -> the attack system it defines, found by scanning this package. The attack's trigger, of
the same file name in datamodules/triggers/, carries its metadata (display name, static or dynamic)."""

from __future__ import annotations

from core.registry import Registry
from lightning_modules.attacks.base import TrainingControlledAttack

ATTACKS: Registry[type[TrainingControlledAttack]] = Registry("attack system", TrainingControlledAttack)
ATTACKS.discover(__name__, skip={"base", "batch_augment"}, required=False)
globals().update({cls.__name__: cls for cls in ATTACKS.values()})

__all__ = ["ATTACKS", "TrainingControlledAttack", *(cls.__name__ for cls in ATTACKS.values())]
