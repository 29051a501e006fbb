"""Data poisoning per protocol.md: which training images get the trigger, their labels, the backdoor test set.

- `round(ratio * N)` indices drawn uniformly from the whole training set with a seeded generator
  (target-class images may be drawn: they keep label `target` and get the trigger).
- Clean-label triggers (SIG) draw only from the target class and keep labels; a ratio the target class
  cannot supply is an error naming the largest feasible ratio, unless `ratio_over_target` says the
  ratio is a fraction of the target class.
- all-to-one: every poisoned label becomes `target`; all-to-all: y -> (y + 1) mod K.
- Backdoor test set: every test image whose label differs from its attack label (all-to-one: the
  non-target images), triggered, carrying the attack label (ASR) and the true label (RA).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from datamodules.triggers.base import Trigger

Mode = Literal["all_to_one", "all_to_all"]
MODES = ("all_to_one", "all_to_all")


def check_attack_args(ratio: float, target: int, num_classes: int, mode: str) -> None:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"poison_ratio must lie in [0, 1] (a fraction of the training set), got {ratio}")
    if not 0 <= target < num_classes:
        raise ValueError(f"target must be a class index in 0..{num_classes - 1}, got {target}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")


def attack_labels(y: Tensor, target: int, mode: str, num_classes: int) -> Tensor:
    """The label an attacker wants for each image."""
    if mode == "all_to_one":
        return torch.full_like(y, target)
    return (y + 1) % num_classes


def poison_indices(
    labels: Tensor,
    ratio: float,
    seed: int,
    target: int = 0,
    clean_label: bool = False,
    ratio_over_target: bool = False,
) -> Tensor:
    """Sorted int64 indices of the training images to poison."""
    gen = torch.Generator().manual_seed(seed)
    if not clean_label:
        count = round(ratio * len(labels))
        return torch.randperm(len(labels), generator=gen)[:count].sort().values
    pool = torch.nonzero(labels == target).flatten()
    count = round(ratio * len(pool)) if ratio_over_target else round(ratio * len(labels))
    if count > len(pool):
        feasible = len(pool) / len(labels)
        raise ValueError(
            f"a clean-label attack can only poison target-class images: ratio {ratio} asks for {count} of "
            f"{len(labels)} training images but class {target} has {len(pool)}. Use poison_ratio <= "
            f"{feasible:.4f}, or set ratio_over_target: true to read the ratio as a fraction of class {target}."
        )
    return pool[torch.randperm(len(pool), generator=gen)[:count]].sort().values


def poison_training_set(
    x: Tensor, y: Tensor, trigger: Trigger, indices: Tensor, target: int, mode: str, num_classes: int,
    triggered: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Copies of (x, y) with the trigger applied once, in uint8, to `x[indices]` and their labels set.
    `triggered`: `trigger` already applied to `x[indices]` (BackdoorDataModule reads it from its disk cache)."""
    x, y = x.clone(), y.clone()
    if len(indices):
        x[indices] = trigger.apply_chunked(x[indices]) if triggered is None else triggered
        if not trigger.clean_label:
            y[indices] = attack_labels(y[indices], target, mode, num_classes)
    return x, y


def backdoor_candidates(x: Tensor, y: Tensor, target: int, mode: str, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """(images, attack labels, true labels) of the test images whose label the attack changes, untriggered
    (training-controlled attacks trigger them at evaluation)."""
    y_attack = attack_labels(y, target, mode, num_classes)
    keep = y_attack != y
    return x[keep], y_attack[keep], y[keep]


def backdoor_test_set(
    x: Tensor, y: Tensor, trigger: Trigger, target: int, mode: str, num_classes: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(triggered images, attack labels, true labels) over the test images whose label would change."""
    x_bd, y_attack, y_true = backdoor_candidates(x, y, target, mode, num_classes)
    return trigger.apply_chunked(x_bd), y_attack, y_true
