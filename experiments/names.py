"""What tables and figures call the registered methods, read from the registries (core/registry.py): a defense's
family and display name, an attack's key, display name and static/dynamic kind. Records name a method by its
class (FT, MMBD, BadNets, LowFrequency); the grid by its file key (ft, mmbd, badnets, lf); both are accepted."""

from __future__ import annotations

from collections.abc import Iterable

from datamodules.triggers import TRIGGERS
from lightning_modules.attacks import ATTACKS
from lightning_modules.defenses import DEFENSES

FAMILIES = ("pruning", "fine-tuning")


def defense_key(name: str) -> str | None:
    try:
        return DEFENSES.name_of(name)
    except KeyError:
        return None


def defense_family(name: str) -> str | None:
    key = defense_key(name)
    return DEFENSES[key].family if key else None


def defense_display(name: str) -> str:
    key = defense_key(name)
    return DEFENSES.display(key) if key else name


def defense_order(names: Iterable[str]) -> list[str]:
    """Pruning family, then fine-tuning (FT, the baseline, first), each in registry order; unknown names last."""
    keys = list(DEFENSES)

    def rank(name: str) -> tuple[int, int, str]:
        key = defense_key(name)
        if key is None:
            return len(FAMILIES), 0, name
        return FAMILIES.index(DEFENSES[key].family), -1 if key == "ft" else keys.index(key), name

    return sorted(dict.fromkeys(names), key=rank)


def family_members(family: str, records: bool = True) -> list[str]:
    """The defenses of a family in `defense_order`, by class name (as records spell them) or by file key."""
    keys = defense_order(DEFENSES.where(lambda cls: cls.family == family))
    return [DEFENSES[k].__name__ for k in keys] if records else keys


def attack_key(name: str) -> str:
    """The file key (badnets) of an attack that records name by its trigger or system class; "clean" stays."""
    for registry in (TRIGGERS, ATTACKS):
        try:
            return registry.name_of(name)
        except KeyError:
            pass
    return name


def attack_display(name: str) -> str:
    key = attack_key(name)
    if key == "clean":
        return "clean (no attack)"
    return TRIGGERS.display(key) if key in TRIGGERS else name


def attack_kind(name: str) -> str:
    """"dynamic" when the attack's trigger depends on the image (TRIGGERS' `dynamic`), else "static"."""
    key = attack_key(name)
    return "dynamic" if key in TRIGGERS and TRIGGERS[key].dynamic else "static"
