"""WaNet (Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021), outsourced training.

Per batch in `training_step`: int(p B) images warped (datamodules/triggers/wanet.py) and relabelled, cross_ratio x
that many "noise-mode" warps keeping their labels (so the network learns this warp, not warps in general), then
the reference's per-batch augmentation (batch_augment.py) and CE.
Differs from the reference (BackdoorBench's wanet.py; docs/fidelity.md, "WaNet"): warped images rounded to uint8;
poisoning in pixel space (same up to rounding); p B < 1 poisons nothing, with a warning.
Defaults: configs/attack/wanet.yaml.
Cost: 1 fwd + 1 bwd per sample per epoch, as victim training, plus one grid_sample per batch;
measured: benchmarks/README.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from core.backbones import PreActResNet18
from core.optim import Schedule
from datamodules.triggers.wanet import WaNetTrigger, cross_grids, warp
from lightning_modules.attacks.base import TrainingControlledAttack
from lightning_modules.attacks.batch_augment import post_poison_augment

REFERENCE_MILESTONES = [100, 200, 300, 400]


class WaNet(TrainingControlledAttack):
    """Args:
        backbone: the network class, called with `num_classes`.
        schedule, milestones: lr schedule; the reference's MultiStep at [100, 200, 300, 400] (x gamma),
            constant over 100 epochs (milestones None = those).
        k: side of the warp's control field.
        strength: s, the warp magnitude.
        seed: seed of the control field.
        cross_ratio: noise-mode samples per backdoor sample.
        augment: the batch augmentation after poisoning (crop, rotation, CIFAR-10 flip).
        same_on_batch: one augmentation draw per batch (BackdoorBench) instead of one per image.
        **kwargs: TrainingControlledAttack's and VictimTraining's other arguments (lr, momentum, weight_decay,
            nesterov, gamma, channels_last, poison_ratio, target, mode, dataset).
    """

    def __init__(
        self,
        backbone: Callable[[int], nn.Module] = PreActResNet18,
        schedule: Schedule = "multistep",
        milestones: list[int] | None = None,
        k: int = 4,
        strength: float = 0.5,
        seed: int = 0,
        cross_ratio: float = 2.0,
        augment: bool = True,
        same_on_batch: bool = True,
        **kwargs: Any,
    ) -> None:
        if milestones is None and schedule == "multistep":
            milestones = list(REFERENCE_MILESTONES)
        if cross_ratio < 0:
            raise ValueError(f"WaNet cross_ratio (noise-mode samples per backdoor sample) must be >= 0, got {cross_ratio}")
        super().__init__(backbone=backbone, schedule=schedule, milestones=milestones, augment=augment, **kwargs)
        self.trigger = WaNetTrigger(k=k, strength=strength, seed=seed)
        self.cross_ratio, self.same_on_batch = cross_ratio, same_on_batch

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.post_augment = post_poison_augment(self.spec, self.same_on_batch)

    def poison(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(backdoor | noise-mode | clean) images of a uint8 batch and their labels (attack | true | true)."""
        n_bd = self.num_poisoned(len(x))
        n_cross = min(int(n_bd * self.cross_ratio), len(x) - n_bd)
        grid = self.trigger.grid(x.shape[-2], x.shape[-1])
        backdoor = warp(x[:n_bd], grid)
        cross = warp(x[n_bd : n_bd + n_cross], cross_grids(grid, n_cross))
        inputs = torch.cat([backdoor, cross, x[n_bd + n_cross :]])
        return inputs, torch.cat([self.attack_targets(y[:n_bd]), y[n_bd:]])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = self.poison(*batch)
        if self.use_augment:
            x = self.post_augment(x)
        return self.cross_entropy_step(x, y, augment=False)
