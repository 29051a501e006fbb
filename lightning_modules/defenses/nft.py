"""NFT: neural fine-tuning (Karim et al., "Augmented Neural Fine-Tuning for Efficient Backdoor Purification",
ECCV 2024), as the survey's fork of BackdoorBench runs it (defense/nft.py there; not in the survey's paper).

A mask per BatchNorm2d channel scales the BN weight (not the bias); only the masks train, on MixUp (Beta(1, 1)) of
augmented D_m, against MixUp CE + l1_weight * sum |1 - m| / SPC; after each step the k-th BN layer's masks (module
order, k from 1 as in the fork and the authors' code) are clamped to [alpha e^(-beta k), 1]. `finish()` folds the
masks into the BN weights, so the defended model is the plain backbone.
Family "pruning", by mechanism (a BN-channel mask, weights frozen), like the survey's masking-based pruning (ANP,
AWM, RNP), although its objective is clean-loss tuning with a drift penalty and no sparsity term.
Differs from the fork (details: docs/fidelity.md, "NFT"): SPC in the L1 term is |D_m minus D_v| / K (the fork: the
configured SPC); `restore_bn_statistics: true` keeps the attacked model's running BN statistics (default false = the
fork: train mode re-estimates them on the MixUp batches, an ARR risk at SPC 2).
Defaults: configs/defense/nft.yaml (the fork's default.yaml; cosine over the run, 100 epochs there).
Cost: 1 fwd + 1 bwd (to the masks only) per D_m sample per epoch, as FT;
measured: benchmarks/README.md, "Newer defenses".
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from core.optim import sgd_with_schedule
from datamodules.transforms import to_unit
from lightning_modules.defenses.base import Defense
from lightning_modules.defenses.pruning import BNMasks, mask_summary
from lightning_modules.defenses.rnp import MaskedNet


def mask_floors(layers: int, alpha: float, beta: float) -> list[float]:
    """The lower clamp of each BN layer's masks: alpha * e^(-beta * k) for the k-th layer, k = 1..layers."""
    return [alpha * math.exp(-beta * k) for k in range(1, layers + 1)]


def mixup(x: Tensor, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """MixUp of a batch with a permutation of itself: (lam x + (1 - lam) x[perm], perm, lam), one
    lam ~ Beta(alpha, alpha) per batch (alpha 0: lam = 1, no mixing); the labels are y and y[perm]."""
    if alpha > 0:
        lam = torch.distributions.Beta(alpha, alpha).sample().to(x.device)
    else:
        lam = torch.ones((), device=x.device)
    perm = torch.randperm(len(x), device=x.device)
    return lam * x + (1 - lam) * x[perm], perm, lam


def mixup_cross_entropy(logits: Tensor, y_a: Tensor, y_b: Tensor, lam: Tensor) -> Tensor:
    """lam CE(logits, y_a) + (1 - lam) CE(logits, y_b), batch means."""
    logits = logits.float()
    return lam * F.cross_entropy(logits, y_a) + (1 - lam) * F.cross_entropy(logits, y_b)


class NFT(Defense):
    """Args:
        lr, momentum: SGD on the masks (no weight decay: the fork's `weight_decay` key is unused).
        lr_min: the cosine schedule's final lr (eta_min), annealed over the run.
        l1_weight: weight of sum |1 - m| / SPC, the pull of the masks toward 1 (the attacked model).
        alpha, beta: the k-th BN layer's masks stay in [alpha e^(-beta k), 1], k = 1, 2, ... in module order.
        mixup_alpha: MixUp's Beta(mixup_alpha, mixup_alpha) (0: no mixing).
        restore_bn_statistics: give the defended model the attacked model's running BN statistics back; false: keep
            those re-estimated by the train-mode MixUp forwards (the fork).
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    family = "pruning"
    measure_dm_acc = True
    smoke_args = ["--trainer.max_epochs", "2"]

    def __init__(
        self,
        backdoored: str,
        lr: float = 0.1,
        lr_min: float = 0.02,
        momentum: float = 0.95,
        l1_weight: float = 1e-3,
        alpha: float = 0.8,
        beta: float = 0.5,
        mixup_alpha: float = 1.0,
        restore_bn_statistics: bool = False,
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        self.check(
            ("lr", lr, lr > 0, "> 0"), ("lr_min", lr_min, 0 <= lr_min <= lr, "in [0, lr]"),
            ("momentum", momentum, 0 <= momentum < 1, "in [0, 1)"),
            ("l1_weight", l1_weight, l1_weight >= 0, ">= 0"), ("alpha", alpha, 0 < alpha <= 1, "in (0, 1]"),
            ("beta", beta, beta >= 0, ">= 0"), ("mixup_alpha", mixup_alpha, mixup_alpha >= 0, ">= 0"),
            finite=True,
        )
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        # the learned masks (kept in the checkpoint for the record; finish() folds them into the BN weights)
        self.neuron_masks = BNMasks(self.net, "NFT")
        self.floors = mask_floors(len(self.neuron_masks), alpha, beta)
        self.net.requires_grad_(False)  # NFT learns the masks only
        self.samples_per_class = float("nan")  # SPC of the L1 term, |D_m minus D_v| / K (prepare)
        self._bn_buffers: dict[str, Tensor] = {}
        self._history: list[dict[str, float]] = []
        self._epoch_lr = float("nan")
        self._facts: dict[str, Any] = {}

    def masks(self) -> dict[str, Tensor]:
        return self.neuron_masks.as_dict()

    def prepare(self) -> None:
        _, y = self.mitigation_data("train")
        self.samples_per_class = len(y) / self.spec.num_classes
        self._bn_buffers = {name: b.clone() for name, b in self.net.named_buffers()}

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        schedule = sgd_with_schedule(self.neuron_masks.parameters(), self.trainer, h.lr, h.momentum, 0.0)
        schedule["lr_scheduler"]["scheduler"].eta_min = h.lr_min  # cosine to lr_min, not to 0 (set before any step)
        return schedule

    def objective(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """The loss on a batch of augmented pixels x and its terms, with the MixUp draw (lam, perm)."""
        h = self.hparams
        mixed, perm, lam = mixup(to_unit(x), h.mixup_alpha)
        masks = self.masks()
        ce = mixup_cross_entropy(self.classify(mixed, MaskedNet(self.net, masks)), y, y[perm], lam)
        l1 = torch.stack([(1 - m).abs().sum() for m in masks.values()]).sum()
        return {"loss": ce + h.l1_weight * l1 / self.samples_per_class, "mixup_ce": ce, "l1": l1,
                "lam": lam, "perm": perm}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        terms = self.objective(self.augment(x), y)
        self.track(len(y), loss=terms["loss"], mixup_ce=terms["mixup_ce"], l1=terms["l1"])
        self.log("train/loss", terms["loss"].detach(), on_step=False, on_epoch=True, sync_dist=True)
        return terms["loss"]

    @torch.no_grad()
    def clamp_masks(self) -> None:
        for m, floor in zip(self.neuron_masks, self.floors):
            m.clamp_(floor, 1.0)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.clamp_masks()  # after every step, before any callback reads the masks

    def on_train_epoch_start(self) -> None:
        self._epoch_lr = self.trainer.optimizers[0].param_groups[0]["lr"]  # the epoch's schedule steps before its end

    def on_train_epoch_end(self) -> None:
        self._history.append({"epoch": self.current_epoch, "lr": self._epoch_lr, **self.epoch_means()})

    # -- the defended model ------------------------------------------------------------------------------------
    @torch.no_grad()
    def finish(self) -> None:
        if self.hparams.restore_bn_statistics:
            for name, buffer in self.net.named_buffers():
                buffer.copy_(self._bn_buffers[name])
        masks = {n: m.detach().clone() for n, m in self.masks().items()}
        modules = dict(self.net.named_modules())
        for name, m in masks.items():
            modules[name].weight.mul_(m)
        at_floor = {n: int((m <= floor + 1e-6).sum()) for (n, m), floor in zip(masks.items(), self.floors)}
        self._facts = {
            "mask": mask_summary(masks),
            "floors": dict(zip(masks, self.floors)),
            "at_floor": sum(at_floor.values()),
            "at_floor_per_layer": {n: c for n, c in at_floor.items() if c},
            "samples_per_class": self.samples_per_class,
            "bn_statistics": "restored (the attacked model's)" if self.hparams.restore_bn_statistics
            else "re-estimated by the train-mode MixUp forwards (the fork)",
            "epochs": self._history,
        }

    def info(self) -> dict[str, Any]:
        return {**self._facts, "dm_acc_after": self.dm_acc_after}
