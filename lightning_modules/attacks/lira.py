"""LIRA (Doan et al., "LIRA: Learnable, Imperceptible and Robust Backdoor Attacks", ICCV 2021), outsourced
training. Optional in the survey, which dropped it for poor performance.

Stage 1 (`joint_epochs`): per batch a trainable generator copy g' takes an Adam step towards the target, then the
classifier an SGD step on alpha CE(clean) + (1 - alpha) CE(x + eps g(x), target); g <- g' each epoch. Stage 2
fine-tunes the classifier alone with g frozen; the checkpoint holds that classifier (manual optimisation).
Pitfall: eps 0.01 (normalised units) is below one grey level, so the uint8 backdoor test images lose most of it.
Differs from the reference (BackdoorBench's lira.py; docs/fidelity.md, "LIRA"): classifier gradients zeroed before
its step; the fine-tuned classifier saved; per-channel clipping in pixel space; mean-colour padding.
Defaults: configs/attack/lira.yaml (poison_ratio 1.0 = the reference's copy of every image).
Cost: per sample per epoch, stage 1 about 3 fwd + 2 bwd (generator and classifier steps), stage 2 2 fwd + 1 bwd;
measured: benchmarks/README.md.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from core.backbones import PreActResNet18
from datamodules.poisoning import Mode
from datamodules.transforms import to_unit
from datamodules.triggers.lira import LIRATrigger
from lightning_modules.attacks.base import TrainingControlledAttack
from lightning_modules.attacks.batch_augment import PostPoisonAugment
from lightning_modules.victim import CompileMode


class LIRA(TrainingControlledAttack):
    """Its classifier recipe is fixed (no nesterov, schedule or milestones), so unlike the other attacks it lists
    every argument rather than passing VictimTraining's on as **kwargs.

    Args:
        backbone: the classifier's network class, called with `num_classes`.
        lr, momentum: SGD of the classifier in both stages.
        weight_decay: the fine-tuning stage's weight decay (the joint stage uses `joint_weight_decay`).
        joint_epochs: length of stage 1 (joint training); the rest of trainer.max_epochs fine-tunes.
        joint_weight_decay: the classifier's weight decay in stage 1 (0 in the reference).
        finetune_milestones, gamma: stage-2 epochs at which the lr is multiplied by gamma.
        eps: the trigger's scale in normalised units.
        alpha: weight of the clean loss (1 - alpha: the backdoor loss).
        generator_lr: Adam lr of the generator.
        trigger_seed: seed of the generator's initial weights.
        augment: the reference's batch augmentation (crop pad 5, rotation 10 degrees, CIFAR-10 flip).
        same_on_batch: one augmentation draw per batch (the reference) instead of one per image.
        one_forward: classify the clean batch and its backdoor copies in one forward pass (one set of
            BatchNorm batch statistics); False: two passes, as the reference.
        channels_last: NHWC memory format.
        poison_ratio, target, mode: the poisoning (see TrainingControlledAttack); dataset, compile_mode: see
            VictimTraining.
    """

    def __init__(
        self,
        backbone: Callable[[int], nn.Module] = PreActResNet18,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        joint_epochs: int = 50,
        joint_weight_decay: float = 0.0,
        finetune_milestones: tuple[int, ...] = (50, 100, 150, 200),
        gamma: float = 0.1,
        eps: float = 0.01,
        alpha: float = 0.5,
        generator_lr: float = 1e-4,
        trigger_seed: int = 0,
        augment: bool = True,
        same_on_batch: bool = True,
        one_forward: bool = False,
        channels_last: bool = True,
        poison_ratio: float = 0.1,
        target: int = 0,
        mode: Mode = "all_to_one",
        dataset: str | None = None,
        compile_mode: CompileMode | None = None,
    ) -> None:
        super().__init__(poison_ratio=poison_ratio, target=target, mode=mode, backbone=backbone, lr=lr,
                         momentum=momentum, weight_decay=weight_decay, nesterov=False, schedule="multistep",
                         milestones=list(finetune_milestones), gamma=gamma, augment=augment,
                         channels_last=channels_last, dataset=dataset, compile_mode=compile_mode)
        if joint_epochs < 0:
            raise ValueError(f"LIRA joint_epochs (stage-1 epochs) must be >= 0, got {joint_epochs}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"LIRA alpha weighs the clean loss against the backdoor loss: it must lie in [0, 1], "
                             f"got {alpha}")
        if generator_lr <= 0 or joint_weight_decay < 0:
            raise ValueError(f"LIRA needs generator_lr > 0 and joint_weight_decay >= 0, got {generator_lr} and "
                             f"{joint_weight_decay}")
        self.automatic_optimization = False  # generator, joint classifier and fine-tuning optimisers
        self.trigger = LIRATrigger(eps=eps, seed=trigger_seed)
        self.trigger.requires_grad_(False)  # g changes only by copying g' into it
        # g', trained in stage 1 in train mode (BN batch statistics), as the reference's tgtmodel
        self.generator = copy.deepcopy(self.trigger.generator).requires_grad_(True).train()
        self.alpha, self.same_on_batch, self.one_forward = alpha, same_on_batch, one_forward

    @property
    def in_joint_stage(self) -> bool:
        return self.current_epoch < self.hparams.joint_epochs

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.trigger.set_normalization(self.spec.mean, self.spec.std)
        self.post_augment = PostPoisonAugment(
            crop_padding=5, crop_p=1.0, rotation=10.0, rotation_p=1.0, hflip=self.spec.hflip,
            fill=tuple(255.0 * m for m in self.spec.mean), same_on_batch=self.same_on_batch)
        max_epochs = self.trainer.max_epochs if self._trainer is not None else None
        if stage == "fit" and max_epochs is not None and 0 < max_epochs <= self.hparams.joint_epochs:
            rank_zero_warn(f"LIRA: max_epochs {max_epochs} <= joint_epochs {self.hparams.joint_epochs}: no "
                           f"fine-tuning stage; the checkpoint holds the jointly trained classifier")

    # -- training -------------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        if not self.in_joint_stage:
            self.generator.requires_grad_(False).eval()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        x = to_unit(x)
        if self.use_augment:
            x = self.post_augment(x)
        n = self.num_poisoned(len(x))
        y_bd = self.attack_targets(y[:n])
        opt_joint, opt_gen, opt_finetune = self.optimizers()
        joint = self.in_joint_stage
        if joint and n > 0:
            with self.toggled_optimizer(opt_gen):  # only g' gets gradients
                loss_gen = F.cross_entropy(self(self.trigger.perturb(x[:n], self.generator)), y_bd)
                opt_gen.zero_grad()
                self.manual_backward(loss_gen)
                opt_gen.step()
            self.log("train/generator_loss", loss_gen, on_step=False, on_epoch=True, sync_dist=True)
        if n == 0:
            loss_clean, loss_poison = F.cross_entropy(self(x), y), x.new_zeros(())
        else:
            with torch.no_grad():
                x_bd = self.trigger.perturb(x[:n])
            if self.one_forward:  # one BatchNorm batch: no batch-level cue tells backdoor images apart
                logits = self(torch.cat([x, x_bd]))
                logits_clean, logits_bd = logits[: len(x)], logits[len(x) :]
            else:
                logits_clean, logits_bd = self(x), self(x_bd)
            loss_clean, loss_poison = F.cross_entropy(logits_clean, y), F.cross_entropy(logits_bd, y_bd)
        loss = self.alpha * loss_clean + (1 - self.alpha) * loss_poison
        optimizer = opt_joint if joint else opt_finetune
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.log_dict({"train/loss": loss, "train/loss_clean": loss_clean, "train/loss_poison": loss_poison},
                      on_step=False, on_epoch=True, sync_dist=True)

    def on_train_epoch_end(self) -> None:
        if self.in_joint_stage:
            self.trigger.generator.load_state_dict(self.generator.state_dict())
        else:
            self.lr_schedulers().step()

    def configure_optimizers(self) -> Any:
        h = self.hparams
        opt_joint = torch.optim.SGD(self.net.parameters(), lr=h.lr, momentum=h.momentum,
                                    weight_decay=h.joint_weight_decay)
        opt_gen = torch.optim.Adam(self.generator.parameters(), lr=h.generator_lr)
        opt_finetune = torch.optim.SGD(self.net.parameters(), lr=h.lr, momentum=h.momentum,
                                       weight_decay=h.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt_finetune, list(h.finetune_milestones), h.gamma)
        return [opt_joint, opt_gen, opt_finetune], [sched]

    def attack_settings(self) -> dict[str, Any]:
        return {**super().attack_settings(), "eps_space": "normalised (x - mean) / std",
                "saved_classifier": "fine-tuned (stage 2)"}
