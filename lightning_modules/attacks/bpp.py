"""BPP (Wang et al., "BppAttack: Stealthy and Efficient Trojan Attacks against Deep Neural Networks via Image
Quantization and Contrastive Adversarial Learning", CVPR 2022), outsourced training.

Per batch in `training_step`: int(p B) images quantised (datamodules/triggers/bpp.py) and relabelled,
int(neg_ratio B) "negatives" get another image's quantisation residual and keep their labels, then WaNet's
per-batch augmentation and CE. Like BackdoorBench, the paper's contrastive adversarial step is omitted.
Differs from the reference (BackdoorBench's bpp.py; docs/fidelity.md, "BPP"): residuals from another image of the
same batch (same distribution); whole grey levels; p B < 1 poisons nothing, with a warning.
Defaults: configs/attack/bpp.yaml.
Cost: 1 fwd + 1 bwd per sample per epoch, as victim training; measured: benchmarks/README.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from core.backbones import PreActResNet18
from core.optim import Schedule
from datamodules.triggers.bpp import BPPTrigger
from lightning_modules.attacks.base import TrainingControlledAttack
from lightning_modules.attacks.batch_augment import post_poison_augment

REFERENCE_MILESTONES = [100, 200, 300, 400]


class BPP(TrainingControlledAttack):
    """Args:
        backbone: the network class, called with `num_classes`.
        schedule, milestones: lr schedule; the reference's MultiStep at [100, 200, 300, 400] (x gamma),
            constant over 100 epochs (milestones None = those).
        levels: values kept per channel (squeeze_num).
        dithering: Floyd-Steinberg error diffusion when quantising.
        neg_ratio: fraction of each batch made negative samples (another image's residual, true label).
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
        levels: int = 8,
        dithering: bool = False,
        neg_ratio: float = 0.1,
        augment: bool = True,
        same_on_batch: bool = True,
        **kwargs: Any,
    ) -> None:
        if milestones is None and schedule == "multistep":
            milestones = list(REFERENCE_MILESTONES)
        if not 0.0 <= neg_ratio <= 1.0:
            raise ValueError(f"BPP neg_ratio (fraction of a batch made negative samples) must lie in [0, 1], got {neg_ratio}")
        super().__init__(backbone=backbone, schedule=schedule, milestones=milestones, augment=augment, **kwargs)
        self.trigger = BPPTrigger(levels=levels, dithering=dithering)
        self.neg_ratio, self.same_on_batch = neg_ratio, same_on_batch

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.post_augment = post_poison_augment(self.spec, self.same_on_batch)

    def poison(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(backdoor | negative | clean) images of a uint8 batch and their labels (attack | true | true)."""
        b = len(x)
        n_bd = self.num_poisoned(b)
        n_neg = min(int(self.neg_ratio * b), b - n_bd) if n_bd > 0 else 0  # as the reference: none without backdoor
        backdoor = self.trigger(x[:n_bd])
        negative = x[n_bd : n_bd + n_neg]
        if n_neg > 0 and b > 1:
            # donor j != i for every negative sample i: i + a random shift in 1..B-1, modulo B
            own = torch.arange(n_bd, n_bd + n_neg, device=x.device)
            donors = x[(own + torch.randint(1, b, (n_neg,), device=x.device)) % b]
            residual = self.trigger(donors).to(torch.int16) - donors.to(torch.int16)
            negative = (negative.to(torch.int16) + residual).clamp_(0, 255).to(torch.uint8)
        inputs = torch.cat([backdoor, negative, x[n_bd + n_neg :]])
        return inputs, torch.cat([self.attack_targets(y[:n_bd]), y[n_bd:]])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = self.poison(*batch)
        if self.use_augment:
            x = self.post_augment(x)
        return self.cross_entropy_step(x, y, augment=False)
