"""FT-SAM: fine-tuning with sharpness-aware minimisation (Zhu, Wei, Shen, Fan, Wu, "Enhancing Fine-Tuning Based
Backdoor Defense with Sharpness-Aware Minimization", ICCV 2023).

Backdoor neurons sit in sharp regions of the loss surface (large weight norms); minimising the worst-case loss
in a neighbourhood of the weights shrinks them and fine-tuning then forgets the backdoor. Adaptive SAM (ASAM):
    min_theta  max_{||T_theta^-1 xi||_2 <= rho}  L(D_m; theta + xi),   T_theta = diag(|theta|),
L the cross-entropy against labels smoothed over the K - 1 wrong classes (true class 1 - s, every other class
s / (K - 1); `label_smoothing` s = 0.1; torch's own label_smoothing spreads s over all K classes instead).
Per batch of augmented D_m (manual optimisation):
  1. ascent: g = grad L(theta) over all weights; xi = rho * T^2 g / ||T g||_2, the maximiser of the first-order
     expansion on the ellipsoid (so ||T^-1 xi||_2 = rho: the bound is met with equality);
  2. descent: the gradient at theta + xi, computed with the BN running statistics frozen (batch statistics,
     momentum 0: the perturbed pass must not leak into the model's statistics), then theta is restored exactly and
     SGD takes the step with that gradient.
Defaults (configs/defense/ftsam.yaml; the survey's values on every dataset): rho 2, s 0.1, SGD lr 0.01, momentum
0.9, wd 5e-4, batch 256, 100 epochs, cosine over the run stepped per epoch. BackdoorBench uses rho 8 and s 0 on
GTSRB and Tiny-ImageNet (not the survey's choice, so no per-dataset configs).

Differences from the reference (BackdoorBench's / the fork's ft-sam with its SAM optimiser, adaptive, alpha 0):
- the cosine schedule is stepped per epoch with T_max = the run's epochs; the reference steps it per batch with
  T_max 100, which matches only when D_m fits in one batch (SPC <= 25 on CIFAR-10 at batch 256);
- theta is restored from a copy instead of subtracting xi (exact, no rounding drift);
- none in T: |theta| on every parameter (BN weights and biases included) with no offset, as the reference
  (Kwon et al.'s ASAM uses |theta| + 0.01 on weights only, identity on biases);
- no gradient decomposition (the reference's alpha = 0 disables it too); the rho scheduler with rho_min =
  rho_max is a constant rho;
- its per-epoch test-set evaluation is dropped (never used for a choice there either).

Cost: a step is 2 forward + 2 backward passes (2x FT's). 2 CPU cores shared with other jobs (load ~10), SmallCNN
width 32 of configs/quickstart.yaml on digits, SPC 10 = 100 images, full defaults (100 epochs of one batch): the
method 251 s wall; the whole `train.py fit` process 300 s wall, 48.6 s CPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_modules.defenses.base import Defense
from lightning_modules.optim import sgd_with_schedule


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
        for name, value, ok, rule in (
            ("rho", rho, rho > 0, "> 0"), ("label_smoothing", label_smoothing, 0 <= label_smoothing < 1, "in [0, 1)"),
            ("lr", lr, lr > 0, "> 0"), ("momentum", momentum, 0 <= momentum < 1, "in [0, 1)"),
            ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
            ("cosine_t_max", cosine_t_max, cosine_t_max is None or cosine_t_max >= 1, ">= 1 or null (max_epochs)"),
        ):
            if not ok or (value is not None and not math.isfinite(value)):
                raise ValueError(f"FTSAM: {name}={value!r}, expected {rule}; fix model.init_args.{name}")
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.history: list[dict[str, float]] = []
        self._sums: dict[str, Tensor] = {}
        self._dm_acc: float | None = None

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        return sgd_with_schedule(self.net.parameters(), self.trainer, h.lr, h.momentum, h.weight_decay,
                                 cosine_t_max=h.cosine_t_max)

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        return smooth_cross_entropy(self(x), y, self.hparams.label_smoothing)

    def on_train_epoch_start(self) -> None:
        self._sums = {}

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
        for k, v in {"loss": loss, "perturbed_loss": perturbed}.items():  # epoch sums, no host sync
            self._sums[k] = self._sums.get(k, 0) + v.detach() * len(y)
        self._sums["n"] = self._sums.get("n", 0) + len(y)
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, sync_dist=True)
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None and self.trainer.lr_scheduler_configs[0].interval == "epoch":
            scheduler.step()
        n = self._sums.pop("n", 0)
        self.history.append({"epoch": self.current_epoch, **{k: float(v) / max(1, n) for k, v in self._sums.items()}})

    def finish(self) -> None:
        self._dm_acc = self.accuracy(*self.mitigation_data("train"))

    def info(self) -> dict[str, Any]:
        return {"dm_acc_after": self._dm_acc, "epochs": self.history}
