"""FT-SAM: fine-tuning with sharpness-aware minimisation (Zhu, Wei, Shen, Fan, Wu, "Enhancing Fine-Tuning Based
Backdoor Defense with Sharpness-Aware Minimization", ICCV 2023).

Adaptive SAM (T = diag(|theta|), radius rho) with labels smoothed over the K - 1 wrong classes (torch's own
label_smoothing spreads over all K); manual optimisation; the perturbed pass does not update BN statistics.
Differs from the reference (details: docs/fidelity.md, "FT-SAM"):
- cosine stepped per epoch over the run (the reference: per batch, T_max 100);
- theta restored from a copy (exact); no gradient decomposition (alpha 0 there too).
Defaults: configs/defense/ftsam.yaml (rho 2, s 0.1 on every dataset, the survey's values).
Cost: 2 fwd + 2 bwd per D_m sample per epoch (2x FT); measured: benchmarks/README.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from core.optim import sgd_with_schedule
from lightning_modules.defenses.base import Defense


def smoothed_targets(y: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """Soft labels: 1 - smoothing on the true class, smoothing / (K - 1) on each of the K - 1 others."""
    target = torch.full((len(y), num_classes), smoothing / (num_classes - 1), device=y.device)
    return target.scatter_(1, y[:, None], 1.0 - smoothing)


def smooth_cross_entropy(logits: Tensor, y: Tensor, smoothing: float) -> Tensor:
    """Mean cross-entropy against `smoothed_targets` (the reference's KL divergence plus the target's constant
    entropy: the same gradient)."""
    return F.cross_entropy(logits.float(), smoothed_targets(y, logits.shape[1], smoothing))


@torch.no_grad()
def asam_perturbation(params: list[Tensor], grads: list[Tensor], rho: float, eps: float = 1e-12) -> list[Tensor]:
    """xi = rho * T^2 g / ||T g||_2 with T = diag(|theta|): the ascent step of ASAM, ||T^-1 xi||_2 = rho."""
    scaled = [p.abs() * g for p, g in zip(params, grads)]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
    scale = rho / (norm + eps)
    return [p.abs() * s * scale for p, s in zip(params, scaled)]


@contextmanager
def frozen_bn_statistics(net: nn.Module) -> Iterator[None]:
    """BatchNorm layers keep normalising with batch statistics (train mode) but leave their running statistics
    (and the batch counter) untouched."""
    saved = [(m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in net.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m, _, _ in saved:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


class FTSAM(Defense):
    """Args:
        rho: radius of the adaptive neighbourhood, ||T_theta^-1 xi||_2 <= rho.
        label_smoothing: mass spread over the K - 1 wrong classes (0: plain cross-entropy).
        lr, momentum, weight_decay: SGD over all weights.
        cosine_t_max: T_max of the per-epoch cosine schedule; None: the run's max_epochs.
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    family = "fine-tuning"
    measure_dm_acc = True
    display_name = "FT-SAM"
    smoke_args = ["--trainer.max_epochs", "2"]

    def __init__(
        self,
        backdoored: str,
        rho: float = 2.0,
        label_smoothing: float = 0.1,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        cosine_t_max: int | None = None,
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        self.check(
            ("rho", rho, rho > 0, "> 0"), ("label_smoothing", label_smoothing, 0 <= label_smoothing < 1, "in [0, 1)"),
            ("lr", lr, lr > 0, "> 0"), ("momentum", momentum, 0 <= momentum < 1, "in [0, 1)"),
            ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
            ("cosine_t_max", cosine_t_max, cosine_t_max is None or cosine_t_max >= 1, ">= 1 or null (max_epochs)"),
            finite=True,
        )
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.history: list[dict[str, float]] = []

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        return sgd_with_schedule(self.net.parameters(), self.trainer, h.lr, h.momentum, h.weight_decay,
                                 cosine_t_max=h.cosine_t_max)

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        return smooth_cross_entropy(self(x), y, self.hparams.label_smoothing)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        x, y = batch
        x = self.augment(x)
        params = [p for p in self.net.parameters() if p.requires_grad]
        optimizer.zero_grad()
        loss = self.loss(x, y)
        self.manual_backward(loss)
        with torch.no_grad():
            live = [p for p in params if p.grad is not None]
            xi = asam_perturbation(live, [p.grad for p in live], self.hparams.rho)
            saved = [p.detach().clone() for p in live]
            for p, e in zip(live, xi):
                p.add_(e)
        optimizer.zero_grad()
        with frozen_bn_statistics(self.net):
            perturbed = self.loss(x, y)
            self.manual_backward(perturbed)
        with torch.no_grad():
            for p, original in zip(live, saved):
                p.copy_(original)
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None and self.trainer.lr_scheduler_configs[0].interval == "step":
            scheduler.step()  # a run bounded only by max_steps anneals per step (optim.sgd_with_schedule)
        self.track(len(y), loss=loss, perturbed_loss=perturbed)
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, sync_dist=True)
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None and self.trainer.lr_scheduler_configs[0].interval == "epoch":
            scheduler.step()
        self.history.append({"epoch": self.current_epoch, **self.epoch_means()})

    def info(self) -> dict[str, Any]:
        return {"dm_acc_after": self.dm_acc_after, "epochs": self.history}
