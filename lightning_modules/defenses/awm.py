"""AWM: adversarial weight masking (Chai & Chen, "One-shot Neural Backdoor Erasing via Adversarial Weight
Masking", NeurIPS 2022), in the version of the survey's fork of BackdoorBench.

Each epoch fits one universal input perturbation delta on D_m (`on_train_epoch_start`), then trains soft masks on
the BN weights against clean and delta-shifted D_m (manual optimisation, network in eval mode); after the last
epoch the masks are baked into the BN weights, so the defended model is the plain backbone.
Differs from the fork (details: docs/fidelity.md, "AWM"):
- x + delta is clamped to valid pixels, not to [0, 1] in normalised space (a bug there);
- the original AWM (element-wise conv masks, Adam, 500 images) is not what the survey ran, nor is it here.
Defaults: configs/defense/awm.yaml.
Cost: 4 fwd + 2 bwd per D_m sample per epoch (delta pass 2 fwd + 1 bwd, mask pass 2 fwd + 1 bwd);
measured: benchmarks/README.md.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.defenses.base import Defense
from lightning_modules.defenses.pruning import BNMasks, mask_summary, masked_forward


class AWM(Defense):
    """Args:
        lr: SGD (no momentum) on the masks.
        lr_decay: ExponentialLR factor per epoch.
        alpha: weight of the clean loss; 1 - alpha weighs the loss on x + delta.
        l1_weight: weight of ||m||_1 (the fork's hyper_gamma).
        delta_lr: SGD step on the universal perturbation, one per batch.
        delta_norm: L1 bound of the perturbation in network-input (normalised) units (the fork's trigger_norm).
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    family = "pruning"
    smoke_args = ["--trainer.max_epochs", "2"]

    def __init__(
        self,
        backdoored: str,
        lr: float = 0.01,
        lr_decay: float = 0.9,
        alpha: float = 0.9,
        l1_weight: float = 1e-8,
        delta_lr: float = 10.0,
        delta_norm: float = 1000.0,
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        self.check(
            ("lr", lr, lr > 0, "> 0"), ("lr_decay", lr_decay, 0 < lr_decay <= 1, "in (0, 1]"),
            ("alpha", alpha, 0 <= alpha <= 1, "in [0, 1]"), ("l1_weight", l1_weight, l1_weight >= 0, ">= 0"),
            ("delta_lr", delta_lr, delta_lr > 0, "> 0"), ("delta_norm", delta_norm, delta_norm > 0, "> 0"),
        )
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        self.automatic_optimization = False
        # the learned masks (kept in the checkpoint for the record; finish() bakes them into the BN weights)
        self.neuron_masks = BNMasks(self.net, "AWM")
        self.bn_names = self.neuron_masks.names
        self.net.requires_grad_(False)  # AWM learns the masks only
        self.delta: Tensor | None = None  # this epoch's universal perturbation
        self._history: list[dict[str, float]] = []
        self._fitted_l1 = float("nan")
        self._facts: dict[str, Any] = {}

    def masks(self) -> dict[str, Tensor]:
        return self.neuron_masks.as_dict()

    def inputs(self, x: Tensor) -> Tensor:
        """Pixels -> the network's input (normalised, in the configured memory format)."""
        x = self.normalize(x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def perturb(self, z: Tensor, delta: Tensor) -> Tensor:
        """Network input z plus delta, clipped to the inputs of valid pixels [0, 1] (per channel)."""
        low = self.normalize(torch.zeros_like(delta))
        high = self.normalize(torch.ones_like(delta))
        return torch.maximum(torch.minimum(z + delta, high), low)

    # -- step 1: the universal perturbation, once per epoch ---------------------------------------------------
    def on_train_start(self) -> None:
        self.net.eval()  # the fork masks the model in eval mode: running BN statistics, no dropout

    def on_train_epoch_start(self) -> None:
        fitted = self.fit_delta()
        self._fitted_l1 = float(fitted.abs().sum())
        self.delta = scale_l1(fitted, self.hparams.delta_norm)

    def fit_delta(self) -> Tensor:
        """The perturbation before scaling: from zero, one ascent step per augmented batch of D_m."""
        h = self.hparams
        x, y = self.mitigation_data("train")
        masks = {n: m.detach() for n, m in self.masks().items()}
        delta = torch.zeros(1, *x.shape[1:], device=self.device, requires_grad=True)
        with torch.enable_grad(), self.autocast():
            for xb, _ in self.batches(x, y, shuffle=True, augment=True):
                z = self.inputs(xb)
                with torch.no_grad():
                    own = masked_forward(self.net, z, masks).argmax(1)
                loss = F.cross_entropy(masked_forward(self.net, z + delta, masks), own)
                (grad,) = torch.autograd.grad(loss, delta)
                with torch.no_grad():
                    delta.add_(grad, alpha=h.delta_lr)  # ascent on CE
        return self.trainer.strategy.broadcast(delta.detach(), src=0)  # one delta for all processes

    # -- step 2: the masks, Lightning's training loop ----------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.SGD(self.neuron_masks.parameters(), lr=self.hparams.lr, momentum=0.0)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=self.hparams.lr_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        h = self.hparams
        x, y = batch
        z = self.inputs(self.augment(x))
        masks = self.masks()
        # eval mode: the clean and perturbed halves do not interact, so one forward pass serves both
        logits = masked_forward(self.net, torch.cat([z, self.perturb(z, self.delta)]), masks)
        clean, perturbed = logits.split(len(z))
        loss_clean, loss_perturbed = F.cross_entropy(clean, y), F.cross_entropy(perturbed, y)
        l1 = torch.stack([m.abs().sum() for m in masks.values()]).sum()
        loss = h.alpha * loss_clean + (1 - h.alpha) * loss_perturbed + h.l1_weight * l1
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        with torch.no_grad():
            for m in self.neuron_masks:
                m.clamp_(0.0, 1.0)
        for key, value in (("loss", loss), ("loss_clean", loss_clean), ("loss_perturbed", loss_perturbed)):
            self.log(f"train/{key}", value.detach(), on_step=False, on_epoch=True, sync_dist=True)
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        scheduler = self.lr_schedulers()
        self._history.append({
            "epoch": self.current_epoch, "lr": scheduler.get_last_lr()[0],
            "delta_l1_fitted": self._fitted_l1, "delta_l1": float(self.delta.abs().sum()),
        })
        scheduler.step()

    # -- the defended model ------------------------------------------------------------------------------------
    @torch.no_grad()
    def finish(self) -> None:
        masks = {n: m.detach().clone() for n, m in self.masks().items()}
        modules = dict(self.net.named_modules())
        for name, m in masks.items():
            modules[name].weight.mul_(m)
        self._facts = {
            "mask": mask_summary(masks),
            "delta_space": "network input (normalised units); x + delta clipped to valid pixels [0, 1]",
            "epochs": self._history,
        }

    def info(self) -> dict[str, Any]:
        return self._facts


def scale_l1(delta: Tensor, bound: float) -> Tensor:
    """delta scaled down (never up) to ||delta||_1 <= bound."""
    return delta * torch.clamp(bound / delta.abs().sum(), max=1.0)  # a zero delta: bound / 0 = inf -> 1
