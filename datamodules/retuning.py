"""The retuning attack's data: a small clean set plus k poisoned training images (Min et al., NeurIPS 2024).

RtA fine-tunes a defended model on clean images and a few poisons to see whether the backdoor was removed or
only put to sleep. Defaults from the authors' code (../shared/reviews/anchors.md 4.1): a fixed 2% of the clean
training set (1,000 images on CIFAR-10) of which the first k = 5 are poisoned training images labelled as the
target, shown without augmentation. Differences: the clean part is drawn (seed `seed`) from the images the attack
never poisoned, skipping the defender's D_m (the next images in the draw take their places; the record says how
many), and the defended, the attacked and the clean model are all retuned on that same set; `clean: dm` uses the
defender's D_m instead (at SPC 2, 5 poisons are then 20% of the set).
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
        qra: also run the query-based reactivation attack (QRA, lightning_modules/defenses/retuning.py; needs
            clean_model): a generator of input-specific perturbations within `qra_eps` (L-inf, pixels in 0..1)
            trained so that the defended model on x + p imitates the retuned one on x while the clean model still
            classifies x + p right; `qra_alpha`, `qra_epochs`, `qra_lr`: its loss weight and plain SGD
            (momentum 0.9, batch 128); `qra_clean`, `qra_poison`: its clean and poisoned training images (the
            split's first clean images; poisoned training images of non-target classes; fewer where fewer exist).
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
    qra: bool = False
    qra_eps: float = 16 / 255
    qra_alpha: float = 0.2
    qra_epochs: int = 50
    qra_lr: float = 0.1
    qra_clean: int = 500
    qra_poison: int = 500

    def __post_init__(self) -> None:
        bad = [f"{name}={value!r} (expected {rule})" for name, value, ok, rule in (
            ("k", self.k, self.k >= 1, "an integer >= 1"), ("epochs", self.epochs, self.epochs >= 1, ">= 1"),
            ("lr", self.lr, self.lr > 0, "> 0"), ("momentum", self.momentum, 0 <= self.momentum < 1, "in [0, 1)"),
            ("batch_size", self.batch_size, self.batch_size >= 1, ">= 1"),
            ("clean", self.clean, self.clean in ("split", "dm"), "split or dm"),
            ("fraction", self.fraction, 0 < self.fraction < 1, "in (0, 1)"),
            ("qra_eps", self.qra_eps, 0 < self.qra_eps <= 1, "in (0, 1] (pixels in 0..1)"),
            ("qra_alpha", self.qra_alpha, self.qra_alpha >= 0, ">= 0"),
            ("qra_epochs", self.qra_epochs, self.qra_epochs >= 1, ">= 1"), ("qra_lr", self.qra_lr, self.qra_lr > 0, "> 0"),
            ("qra_clean", self.qra_clean, self.qra_clean >= 1, ">= 1"),
            ("qra_poison", self.qra_poison, self.qra_poison >= 1, ">= 1"),
            ("clean_model", self.clean_model, self.clean_model or not self.qra,
             "a clean model's checkpoint: QRA needs one")) if not ok]
        if bad:
            raise ValueError("retuning: invalid " + "; ".join(bad) + " (data.init_args.retune)")

    def settings(self) -> dict[str, Any]:
        """The retuning's settings (the QRA's in `qra_settings`)."""
        return {k: v for k, v in asdict(self).items() if k != "clean_model" and not k.startswith("qra")}

    def qra_settings(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k.startswith("qra_")}


def clean_split(labels: Tensor, poisoned: Tensor | None, r: Retuning, exclude: Tensor | None = None) -> Tensor:
    """The split's clean indices: round(fraction * N) - k of the never-poisoned images in a seeded order, skipping
    `exclude` (the defender's D_m) and taking the next ones in their place, so the set keeps its size."""
    pool = clean_pool(len(labels), poisoned)
    size = round(r.fraction * len(labels)) - r.k
    gen = torch.Generator().manual_seed(r.seed)
    order = pool[torch.randperm(len(pool), generator=gen)]
    if exclude is not None:
        order = order[~torch.isin(order, exclude)]
    if size < 1 or size > len(order):
        raise ValueError(f"retuning: fraction {r.fraction} of {len(labels)} images makes a clean part of {size} "
                         f"images beside k={r.k} poisons, of {len(order)} available; change "
                         f"data.init_args.retune.fraction")
    return order[:size]


def poison_pool(attack: dict[str, Any], n: int, exclude: Tensor | None = None) -> Tensor:
    """The training images the retuning may poison: the attack's poisoned ones; for a training-controlled attack
    (WaNet, BPP, IAB, LIRA: it poisons on the fly and records none) every training image outside `exclude` (the
    retuning's clean part and D_m), triggered by the same trigger as its backdoor test set."""
    if attack["poison_indices"] is not None:
        return attack["poison_indices"]
    pool = torch.arange(n)
    return pool if exclude is None else pool[~torch.isin(pool, exclude)]


def poisons(x: Tensor, y: Tensor, attack: dict[str, Any], trigger: Trigger, num_classes: int, r: Retuning,
            k: int | None = None, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """k (default: r.k) poisoned training images and their attack labels (`exclude`: see poison_pool)."""
    indices = poison_pool(attack, len(y), exclude)
    k = r.k if k is None else k
    if len(indices) < k:
        raise ValueError(f"retuning: the attack poisoned {len(indices)} training images, fewer than k={r.k}; lower "
                         f"data.init_args.retune.k")
    gen = torch.Generator().manual_seed(r.seed)
    order = indices[torch.randperm(len(indices), generator=gen)]
    labels = attack_labels(y[order], attack["target"], attack["mode"], num_classes)
    changed = labels != y[order]
    order = torch.cat([order[changed], order[~changed]])[:k]  # images whose label the attack changes first
    target = y[order] if trigger.clean_label else attack_labels(y[order], attack["target"], attack["mode"],
                                                                num_classes)
    return trigger.apply_chunked(x[order]), target


def qra_set(x: Tensor, y: Tensor, split: Tensor, attack: dict[str, Any], trigger: Trigger, num_classes: int,
            r: Retuning) -> tuple[Tensor, Tensor]:
    """QRA's training images (the split's first qra_clean clean images, then up to qra_poison poisoned training
    images whose label the attack changes) and their true labels."""
    indices = poison_pool(attack, len(y), exclude=split)
    changed = attack_labels(y[indices], attack["target"], attack["mode"], num_classes) != y[indices]
    count = min(r.qra_poison, int(changed.sum()))
    gen = torch.Generator().manual_seed(r.seed)
    chosen = indices[changed][torch.randperm(int(changed.sum()), generator=gen)[:count]]
    clean = split[: r.qra_clean]
    return torch.cat([x[clean], trigger.apply_chunked(x[chosen])]), torch.cat([y[clean], y[chosen]])
