"""The retuning attack's data: a small clean set plus k poisoned training images (Min et al., NeurIPS 2024).

RtA fine-tunes a defended model on clean images and a few poisons to see whether the backdoor was removed or
only put to sleep. Defaults from the authors' code (../shared/reviews/anchors.md 4.1): a fixed 2% of the clean
training set (1,000 images on CIFAR-10) of which the first k = 5 are poisoned training images labelled as the
target, shown without augmentation. Differences: the clean part is drawn (seed `seed`) from the images the attack
never poisoned, and a defense run drops the few that are also in its D_m (the reference rows keep them; the record
says how many went); `clean: dm` uses the defender's D_m instead (at SPC 2, 5 poisons are then 20% of the set).
The poisons are the first k of the attack's poisoned images in a seeded order, those whose label the attack changes
first, triggered as the attack triggers its test images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from datamodules.poisoning import attack_labels
from datamodules.splits import clean_pool
from datamodules.triggers.base import Trigger


@dataclass(frozen=True)
class Retuning:
    """Args:
        k: poisoned training images in the set (the paper: 5; also 1).
        epochs, lr, momentum, batch_size: plain SGD, no weight decay, no schedule (the paper's).
        clean: "split": a fixed `fraction` of the clean training set, k of its places taken by the poisons;
            "dm": the defender's D_m plus the k poisons.
        fraction: the split's share of the training set.
        seed: the draw of the split and of the poisons, and the retuning's own random stream.
        clean_model: checkpoint of a model of the same dataset and backbone trained without poisons (the grid's
            `clean` attack run): retuned as the "never backdoored" reference row; None: no such row.
    """

    k: int = 5
    epochs: int = 5
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 128
    clean: Literal["split", "dm"] = "split"
    fraction: float = 0.02
    seed: int = 0
    clean_model: str | None = None

    def __post_init__(self) -> None:
        bad = [f"{name}={value!r} (expected {rule})" for name, value, ok, rule in (
            ("k", self.k, self.k >= 1, "an integer >= 1"), ("epochs", self.epochs, self.epochs >= 1, ">= 1"),
            ("lr", self.lr, self.lr > 0, "> 0"), ("momentum", self.momentum, 0 <= self.momentum < 1, "in [0, 1)"),
            ("batch_size", self.batch_size, self.batch_size >= 1, ">= 1"),
            ("clean", self.clean, self.clean in ("split", "dm"), "split or dm"),
            ("fraction", self.fraction, 0 < self.fraction < 1, "in (0, 1)")) if not ok]
        if bad:
            raise ValueError("retuning: invalid " + "; ".join(bad) + " (data.init_args.retune)")

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "clean_model"}


def clean_split(labels: Tensor, poisoned: Tensor | None, r: Retuning) -> Tensor:
    """The split's clean indices (round(fraction * N) - k of the never-poisoned images, seeded), in draw order."""
    pool = clean_pool(len(labels), poisoned)
    size = round(r.fraction * len(labels)) - r.k
    if size < 1:
        raise ValueError(f"retuning: fraction {r.fraction} of {len(labels)} images leaves no room beside k={r.k} "
                         f"poisons; raise data.init_args.retune.fraction")
    gen = torch.Generator().manual_seed(r.seed)
    return pool[torch.randperm(len(pool), generator=gen)[:size]]


def poisons(x: Tensor, y: Tensor, attack: dict[str, Any], trigger: Trigger, num_classes: int, r: Retuning
            ) -> tuple[Tensor, Tensor]:
    """k poisoned training images and their attack labels."""
    indices = attack["poison_indices"]
    if len(indices) < r.k:
        raise ValueError(f"retuning: the attack poisoned {len(indices)} training images, fewer than k={r.k}; lower "
                         f"data.init_args.retune.k")
    gen = torch.Generator().manual_seed(r.seed)
    order = indices[torch.randperm(len(indices), generator=gen)]
    labels = attack_labels(y[order], attack["target"], attack["mode"], num_classes)
    changed = labels != y[order]
    order = torch.cat([order[changed], order[~changed]])[: r.k]  # images whose label the attack changes first
    target = y[order] if trigger.clean_label else attack_labels(y[order], attack["target"], attack["mode"],
                                                                num_classes)
    return trigger.apply_chunked(x[order]), target
