"""AWM: adversarial weight masking (Chai & Chen, "One-shot Neural Backdoor Erasing via Adversarial Weight
Masking", NeurIPS 2022), in the version of the survey's fork of BackdoorBench.

A soft mask m in [0, 1] (from 1) scales the weight of every BatchNorm2d channel (bias untouched), the network
in eval mode (running BN statistics). Each epoch:
1. fit one universal input perturbation delta (1 x C x H x W, from zero): one SGD step (lr 10) per batch of D_m
   ascending CE(masked net(x + delta), the masked net's own predictions on x), then scale it to
   ||delta||_1 <= 1000;
2. one pass of mask steps on D_m:
   min_m 0.9 * CE(x; m * theta) + 0.1 * CE(clip(x + delta); m * theta) + 1e-8 * ||m||_1,
   SGD lr 0.01 without momentum, masks clipped to [0, 1] after each step, ExponentialLR 0.9 per epoch.
After 20 epochs the masks are baked into the BN weights (w * m), so the defended model is the plain backbone:
it survives save/reload with no extra state. No binarisation, no pruning threshold.

How it maps onto Lightning: step 2 is this module's training loop (manual optimisation over the datamodule's
D_m batches, scheduler stepped per epoch); step 1 is a hand-written pass over D_m in `on_train_epoch_start`.

Differences from the fork, and why:
- delta lives in the network's input space (normalised units), as in the fork, so the step (lr 10) and the
  L1 budget (1000) mean what they meant there; but x + delta is clipped to valid *pixels* [0, 1] (i.e. the
  normalised image of [0, 1] per channel). The fork clamps the normalised input to [0, 1], which cuts off every
  below-mean pixel: a bug on every dataset with a normalisation (CIFAR-10, Tiny-ImageNet), harmless on GTSRB.
  As in the fork, step 1 does not clip x + delta.
- The original AWM differs more: element-wise masks on every conv weight, Adam lr 0.01, 5 inner epochs per
  round, no lr decay, 500 clean images in [0, 1]; the survey evaluated the fork's version, which this is.
Defaults: 20 epochs (trainer.max_epochs), batch 256, alpha 0.9, L1 weight 1e-8, mask lr 0.01 decayed x0.9 per
epoch, delta lr 10, ||delta||_1 <= 1000.
Cost: per epoch 2 passes over D_m (step 1: 2 forward + 1 backward per batch; step 2: 1 forward of 2 batches +
1 backward); digits SPC 10 (100 images), SmallCNN width 32, 2 CPU cores shared with other jobs: ~1.5 s/epoch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.defenses.base import Defense
from lightning_modules.defenses.pruning import bn_layers, mask_summary, masked_forward


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
        for name, value, ok, rule in (
            ("lr", lr, lr > 0, "> 0"), ("lr_decay", lr_decay, 0 < lr_decay <= 1, "in (0, 1]"),
            ("alpha", alpha, 0 <= alpha <= 1, "in [0, 1]"), ("l1_weight", l1_weight, l1_weight >= 0, ">= 0"),
            ("delta_lr", delta_lr, delta_lr > 0, "> 0"), ("delta_norm", delta_norm, delta_norm > 0, "> 0"),
        ):
            if not ok:
                raise ValueError(f"AWM: {name}={value!r}, expected {rule}; fix model.init_args.{name}")
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        self.automatic_optimization = False
        layers = bn_layers(self.net)
        if not layers:
            raise ValueError(f"AWM masks BatchNorm2d channels, and {type(self.net).__name__} has none")
        self.bn_names = [name for name, _ in layers]
        # the learned masks (kept in the checkpoint for the record; finish() bakes them into the BN weights)
        self.neuron_masks = nn.ParameterList(nn.Parameter(torch.ones_like(bn.weight)) for _, bn in layers)
        self.net.requires_grad_(False)  # AWM learns the masks only
        self.delta: Tensor | None = None  # this epoch's universal perturbation
        self._history: list[dict[str, float]] = []
        self._fitted_l1 = float("nan")
        self._facts: dict[str, Any] = {}

    def masks(self) -> dict[str, Tensor]:
        return dict(zip(self.bn_names, self.neuron_masks))

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
            for xb, _ in self.batches(x, y, self.mitigation.batch_size, shuffle=True, augment=True):
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
