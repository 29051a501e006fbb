"""IAB: the input-aware dynamic backdoor (Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS 2020).

Trains a pattern generator G and mask network M (datamodules/triggers/iab.py) with the classifier C: `mask_epochs`
train M alone (mask size + diversity loss), then C and G train together on backdoor, cross and clean samples with
CE + the reference's diversity loss (in normalised space, as the reference).
Differs from the reference (BackdoorBench's inputaware.py; docs/fidelity.md, "IAB"): pair partners from one batch
roll, G and M on 2n images at once; G's gradients zeroed each step (`accumulate_generator_grads: true` = the
survey's bug, set by configs/attack/survey/iab.yaml); float training, uint8 evaluation; p B < 1 poisons nothing.
Under DDP, stage 1 leaves C and G without gradients: use `strategy: ddp_find_unused_parameters_true`.
Defaults: configs/attack/iab.yaml.
Cost: per sample per epoch C 1 fwd + 1 bwd plus G and M (~4x victim training per epoch);
measured: benchmarks/README.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from core.backbones import PreActResNet18
from core.optim import Schedule, sgd_with_schedule
from datamodules.transforms import to_unit
from datamodules.triggers.iab import IABTrigger, apply_iab
from lightning_modules.attacks.base import TrainingControlledAttack

EPSILON = 1e-7  # the reference's, in the diversity ratio's denominator
ADAM_BETAS = (0.5, 0.9)


def rms_distance(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample root-mean-square distance between two batches (B, C, H, W) -> (B,)."""
    return (a - b).pow(2).mean(dim=(1, 2, 3)).add(1e-12).sqrt()


def diversity_loss(x1: Tensor, x2: Tensor, t1: Tensor, t2: Tensor) -> Tensor:
    """mean(|x1 - x2| / (|t1 - t2| + eps)): large when different images get similar triggers (patterns/masks)."""
    return (rms_distance(x1, x2) / (rms_distance(t1, t2) + EPSILON)).mean()


class IAB(TrainingControlledAttack):
    """Args:
        backbone: the classifier C's network class, called with `num_classes`.
        schedule, milestones: C's schedule, stepped once per stage-2 epoch (the reference's multistep at 100, 200,
            300, 400, x gamma: constant within 100 epochs; a cosine spans the stage-2 epochs).
        mask_epochs: length of stage 1 (M alone); the rest of trainer.max_epochs is stage 2.
        mask_lr, mask_milestones: M's Adam lr and its x`gamma` epochs within stage 1.
        mask_density: the mask coverage above which the norm loss penalises (0.032 of the pixels).
        lambda_norm: weight of the mask norm loss.
        generator_lr, generator_milestones: G's Adam lr and its x`gamma` stage-2 epochs.
        lambda_div: weight of the diversity loss (both stages).
        trigger_width, trigger_seed: G's and M's first-stage channels (32) and initial-weight seed.
        accumulate_generator_grads: never zero G's gradients, as the reference (configs/attack/survey/iab.yaml).
        **kwargs: TrainingControlledAttack's and VictimTraining's other arguments: C's SGD (lr, momentum,
            weight_decay, nesterov), gamma (all three schedules), augment, channels_last, poison_ratio (at most
            0.5), target, mode, dataset.
    """

    def __init__(
        self,
        backbone: Callable[[int], nn.Module] = PreActResNet18,
        schedule: Schedule = "multistep",
        milestones: tuple[int, ...] = (100, 200, 300, 400),
        mask_epochs: int = 25,
        mask_lr: float = 0.01,
        mask_milestones: tuple[int, ...] = (10, 20),
        mask_density: float = 0.032,
        lambda_norm: float = 100.0,
        generator_lr: float = 0.01,
        generator_milestones: tuple[int, ...] = (200, 300, 400, 500),
        lambda_div: float = 1.0,
        trigger_width: int = 32,
        trigger_seed: int = 0,
        accumulate_generator_grads: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone=backbone, schedule=schedule, milestones=list(milestones), **kwargs)
        if self.poison_ratio > 0.5:
            raise ValueError(f"IAB turns int(p*B) samples of each batch into backdoor and as many into cross "
                             f"samples, so poison_ratio must be <= 0.5; got {self.poison_ratio}")
        if mask_epochs < 0:
            raise ValueError(f"mask_epochs must be >= 0 (epochs of mask training), got {mask_epochs}")
        if mask_lr <= 0 or generator_lr <= 0:
            raise ValueError(f"mask_lr and generator_lr must be > 0, got {mask_lr} and {generator_lr}")
        if not 0.0 <= mask_density <= 1.0:
            raise ValueError(f"mask_density is a fraction of the pixels, in [0, 1]; got {mask_density}")
        if lambda_norm < 0 or lambda_div < 0:
            raise ValueError(f"loss weights must be >= 0, got lambda_norm {lambda_norm}, lambda_div {lambda_div}")
        self.automatic_optimization = False  # three optimisers, two stages
        self.trigger = IABTrigger(width=trigger_width, seed=trigger_seed)

    @property
    def in_mask_stage(self) -> bool:
        return self.current_epoch < self.hparams.mask_epochs

    def setup(self, stage: str) -> None:
        super().setup(stage)
        max_epochs = self.trainer.max_epochs if self._trainer is not None else None
        if stage == "fit" and max_epochs is not None and 0 < max_epochs <= self.hparams.mask_epochs:
            rank_zero_warn(f"IAB: max_epochs {max_epochs} <= mask_epochs {self.hparams.mask_epochs}: the run "
                           f"only trains the mask network, the classifier stays untrained")

    # -- training -------------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        frozen = not self.in_mask_stage
        self.trigger.mask_net.requires_grad_(not frozen)
        if frozen:
            self.trigger.mask_net.eval()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        x = to_unit(self.augment(x) if self.use_augment else x)
        partner = x.roll(x.shape[0] // 2, dims=0)  # another image for each image of the batch
        if self.in_mask_stage:
            self.mask_step(x, partner)
        else:
            self.backdoor_step(x, y, partner)

    def mask_step(self, x: Tensor, partner: Tensor) -> None:
        masks = self.trigger.masks(x)
        norm = F.relu(masks - self.hparams.mask_density).mean()
        shift = x.shape[0] // 2
        div = diversity_loss(self.normalize(x), self.normalize(partner), masks, masks.roll(shift, dims=0))
        loss = self.hparams.lambda_norm * norm + self.hparams.lambda_div * div
        optimizer = self.optimizers()[2]
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.log_dict({"train/mask_loss": loss, "train/mask_norm": norm, "train/mask_div": div,
                       "train/mask_mean": masks.detach().mean()}, on_step=False, on_epoch=True, sync_dist=True)

    def backdoor_step(self, x: Tensor, y: Tensor, partner: Tensor) -> None:
        inputs, targets, div = self.poison_batch(x, y, partner)
        logits = self(inputs)
        ce = F.cross_entropy(logits, targets)
        loss = ce + self.hparams.lambda_div * div
        opt_c, opt_g, _ = self.optimizers()
        opt_c.zero_grad()
        if not self.hparams.accumulate_generator_grads:
            opt_g.zero_grad()
        self.manual_backward(loss)
        opt_c.step()
        opt_g.step()
        metrics = {"train/loss": loss, "train/ce": ce, "train/div": div}
        n = self.num_poisoned(x.shape[0])
        if n > 0:  # backdoor samples -> target, cross samples -> true label, with the generator being trained
            hits = logits[: 2 * n].argmax(1) == targets[: 2 * n]
            metrics["train/asr"], metrics["train/cross_acc"] = hits[:n].float().mean(), hits[n:].float().mean()
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)

    def poison_batch(self, x: Tensor, y: Tensor, partner: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A float 0..1 batch -> (inputs, targets, diversity loss): int(p*B) backdoor samples with the attack
        label, int(p*B) cross samples (x + (G(x') - x) * M(x'), x' = partner) with their true label, the rest
        clean. G stays differentiable; M is frozen."""
        n = self.num_poisoned(x.shape[0])
        if n == 0:
            return x, y, x.new_zeros(())
        sources = torch.cat([x[:n], partner[n : 2 * n]])  # backdoor images, then the cross samples' donors
        with torch.no_grad():
            masks = self.trigger.masks(sources)
        patterns = self.trigger.patterns(sources)
        backdoor = apply_iab(x[:n], patterns[:n], masks[:n])
        cross = apply_iab(x[n : 2 * n], patterns[n:], masks[n:])
        inputs = torch.cat([backdoor, cross, x[2 * n :]])
        targets = torch.cat([self.attack_targets(y[:n]), y[n:]])
        norm = self.normalize
        div = diversity_loss(norm(x[:n]), norm(sources[n:]), norm(patterns[:n]), norm(patterns[n:]))
        return inputs, targets, div

    def on_train_epoch_end(self) -> None:
        sched_c, sched_g, sched_m = self.lr_schedulers()
        for scheduler in [sched_m] if self.in_mask_stage else [sched_c, sched_g]:
            scheduler.step()

    def configure_optimizers(self) -> Any:
        h = self.hparams
        max_epochs = self.trainer.max_epochs or 0
        stage2 = max_epochs - h.mask_epochs
        classifier = sgd_with_schedule(self.net.parameters(), self.trainer, h.lr, h.momentum, h.weight_decay,
                                       h.nesterov, h.schedule, h.milestones, h.gamma,
                                       cosine_t_max=stage2 if stage2 > 0 else None)
        opt_c = classifier["optimizer"]
        sched_c = classifier.get("lr_scheduler", {}).get("scheduler")
        if sched_c is None:  # constant lr: a no-op scheduler keeps the list positional
            sched_c = torch.optim.lr_scheduler.ConstantLR(opt_c, factor=1.0, total_iters=0)
        opt_g = torch.optim.Adam(self.trigger.generator.parameters(), lr=h.generator_lr, betas=ADAM_BETAS)
        opt_m = torch.optim.Adam(self.trigger.mask_net.parameters(), lr=h.mask_lr, betas=ADAM_BETAS)
        sched_g = torch.optim.lr_scheduler.MultiStepLR(opt_g, list(h.generator_milestones), h.gamma)
        sched_m = torch.optim.lr_scheduler.MultiStepLR(opt_m, list(h.mask_milestones), h.gamma)
        return [opt_c, opt_g, opt_m], [sched_c, sched_g, sched_m]

    def attack_settings(self) -> dict[str, Any]:
        return {**super().attack_settings(), "epsilon": EPSILON, "cross_ratio": 1.0,
                "diversity_space": "dataset-normalised images and patterns, 0..1 masks",
                "network_input": "pixels scaled to [-1, 1]"}
