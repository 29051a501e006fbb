"""NPD: neural polarizer defense (Zhu, Wei, Zha, Wu, NeurIPS 2023).

A backdoor trigger rides on a few feature directions; a learnable linear filter placed inside the frozen
network can suppress them while passing benign features. The polarizer, a 1x1 conv (no bias, identity init)
followed by a BatchNorm, is inserted at the input of one late layer (`layers[<backbone>]`): PreActResNet18
layer4.1.conv1, VGG19BN features.49, EfficientNetB3 features.8.0, MobileNetV3Large features.16.0 (the last
conv of the feature extractor for the last three), SmallCNN features.14 (its last conv, by the same rule).
Only the polarizer trains; the backbone stays frozen and in eval mode.

Training (Lightning's loop, manual optimisation; `trainer.max_epochs` = warm-up + NPD epochs = 5 + 50):
- warm-up, `warmup_epochs` = 5: CE on augmented clean D_m, plain SGD lr 1e-4 (no momentum or weight decay,
  as the fork), the polarizer's BN in train mode;
- then per batch of augmented D_m (batch 128), with the polarised model in eval mode: y_hat = its prediction
  on x, y~ = its highest non-true logit on x; a targeted perturbation x~ = clamp(x + delta, 0, 1) in 0..1
  pixel space from delta = 0, descending CE(x~, y~) by up to 2 signed steps of 0.1, each followed by the
  projection onto the L2 ball of radius 3 (delta *= min(1, radius / ||delta||_2) per image: a sign step has
  norm 0.1 * sqrt(C*H*W), 5.5 at 32 px, so the first step lands on the sphere along sign(grad)); the steps
  stop once more than 60% of the batch hits y~ (the check costs no extra pass and no host sync: the step is
  masked). Then one SGD step (lr 0.01 constant, momentum 0.9, weight decay 5e-4) on
      l1 CE(x, y) + l2 CE(x~, y_hat) + l3 [-log(1 - s_k(x~))] + l4 [-log(1 - s_y~(x~))],
  k the top non-true class on x~, weights (1, 0.4, 0.4, 0.4); -log(1 - s) is computed exactly from the
  logits (logsumexp of all minus logsumexp without that class), where the fork takes log(1.0001 - s).
  The polarizer's BN is in eval mode after warm-up, except with `polarizer_bn_train` (Tiny-ImageNet in the
  fork): there the clean forward updates its running statistics and the adversarial one uses batch
  statistics without updating them, as the fork does.
Per dataset (configs/defense/<dataset>/npd.yaml): GTSRB radius 5.0, weights (1, 0.5, 0.5, 0.5);
Tiny-ImageNet plain (unsigned) gradient steps of 0.1 on the batch-mean CE and polarizer_bn_train.

The polarizer is a submodule built in `__init__` (channels = the target conv's in_channels) and applied by a
forward pre-hook on the target module, so `self.forward` includes it, `self.net`'s parameter names are
unchanged, and `load_defended` / `train.py test` restore it (`changes_architecture = True`).

Differences from the fork: no per-sample CE clamp at 80 in the attack; the stop check reuses the next step's
forward; test-set evaluation after every epoch dropped (never used for a choice there either).
BackdoorBench differs on Tiny-ImageNet (radius 6.0, weights (1, 1, 0.1, 0.1)) and trains without augmentation.

Cost (2 CPU cores shared with other jobs, load ~20; SmallCNN width 32 of configs/quickstart.yaml on digits,
SPC 10 = 100 images, full defaults, 5 + 50 epochs of one batch): 476 s wall, 121 s CPU time for the whole
process. An NPD step costs 4 forward and 4 backward passes through the network (2 attack steps, the clean and
the adversarial loss), against 1 + 1 for plain fine-tuning, though only the polarizer's weights update.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.transforms import to_unit
from lightning_modules.defenses.base import Defense
from lightning_modules.defenses.hooks import for_backbone

# The module whose input the polarizer filters, per backbone class (the survey's fork; SmallCNN: its last conv).
POLARIZER_LAYERS: dict[str, str] = {
    "PreActResNet18": "layer4.1.conv1",
    "VGG19BN": "features.49",
    "EfficientNetB3": "features.8.0",
    "MobileNetV3Large": "features.16.0",
    "SmallCNN": "features.14",
}


class Polarizer(nn.Sequential):
    """1x1 conv without bias, initialised to the identity, then BatchNorm (default init)."""

    def __init__(self, channels: int) -> None:
        super().__init__(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
        with torch.no_grad():
            self[0].weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))


def neg_log_one_minus_softmax(logits: Tensor, k: Tensor) -> Tensor:
    """-log(1 - softmax(logits)[k]) per row, stable as softmax -> 1."""
    logits = logits.float()
    others = logits.scatter(1, k[:, None], -math.inf)
    return torch.logsumexp(logits, 1) - torch.logsumexp(others, 1)


def top_other(logits: Tensor, exclude: Tensor) -> Tensor:
    """The class with the highest logit other than `exclude`, per row."""
    return logits.detach().scatter(1, exclude[:, None], -math.inf).argmax(1)


class NPD(Defense):
    """Args:
        layers: per backbone class name, the module at whose input the polarizer sits (a Conv2d); None:
            `POLARIZER_LAYERS`.
        radius: L2 radius of the perturbation in 0..1 pixel space.
        attack_steps, attack_step_size: at most this many steps of this size per batch.
        signed_steps: sign-of-gradient steps (the fork, CIFAR-10 and GTSRB); False: plain gradient steps on
            the batch-mean CE (the fork on Tiny-ImageNet).
        stop_fraction: stop the steps once more than this fraction of the batch is classified as y~.
        loss_weights: (l1, l2, l3, l4) of the four loss terms.
        lr, momentum, weight_decay: SGD of the polarizer after warm-up (constant).
        warmup_epochs, warmup_lr: the clean warm-up (plain SGD); trainer.max_epochs counts these epochs too.
        polarizer_bn_train: keep the polarizer's BN in train mode after warm-up (the fork on Tiny-ImageNet).
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    changes_architecture = True

    def __init__(
        self,
        backdoored: str,
        layers: dict[str, str] | None = None,
        radius: float = 3.0,
        attack_steps: int = 2,
        attack_step_size: float = 0.1,
        signed_steps: bool = True,
        stop_fraction: float = 0.6,
        loss_weights: tuple[float, float, float, float] = (1.0, 0.4, 0.4, 0.4),
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_epochs: int = 5,
        warmup_lr: float = 1e-4,
        polarizer_bn_train: bool = False,
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        self.automatic_optimization = False
        checks = {
            "radius": radius > 0, "attack_steps": attack_steps >= 1, "attack_step_size": attack_step_size > 0,
            "stop_fraction": 0 < stop_fraction <= 1, "lr": lr > 0, "momentum": 0 <= momentum < 1,
            "weight_decay": weight_decay >= 0, "warmup_epochs": warmup_epochs >= 0, "warmup_lr": warmup_lr > 0,
            "loss_weights": len(loss_weights) == 4 and all(w >= 0 and math.isfinite(w) for w in loss_weights),
        }
        bad = [k for k, ok in checks.items()
               if not ok or (k != "loss_weights" and not math.isfinite(self.hparams[k]))]
        if bad:
            raise ValueError(
                f"NPD: invalid {', '.join(f'{k}={self.hparams[k]}' for k in bad)}; expected radius, "
                f"attack_step_size, lr, warmup_lr > 0, attack_steps >= 1, stop_fraction in (0, 1], momentum in "
                f"[0, 1), weight_decay and warmup_epochs >= 0, four loss_weights >= 0")
        self.layer = for_backbone(POLARIZER_LAYERS if layers is None else layers, self.backdoor_record,
                                  "polarizer layer", "configs/defense/npd.yaml")
        target = dict(self.net.named_modules()).get(self.layer)
        if not isinstance(target, nn.Conv2d):
            found = "no such module" if target is None else f"a {type(target).__name__}"
            raise ValueError(f"NPD: the polarizer goes at the input of a Conv2d; {self.layer!r} of "
                             f"{type(self.net).__name__} is {found}; fix layers in configs/defense/npd.yaml")
        self.polarizer = Polarizer(target.in_channels)
        if channels_last:
            self.polarizer.to(memory_format=torch.channels_last)
        polarizer = self.polarizer  # a closure, not a bound method: copying the net must not copy this module
        target.register_forward_pre_hook(lambda module, inputs: (polarizer(inputs[0]), *inputs[1:]))
        self.net.requires_grad_(False)
        self.history: list[dict[str, Any]] = []  # per epoch: phase, mean loss terms, target hit rate
        self._sums: dict[str, Tensor] = {}
        self._dm_acc: float | None = None

    def setup(self, stage: str) -> None:
        epochs = self.trainer.max_epochs
        if stage == "fit" and epochs is not None and 0 <= epochs <= self.hparams.warmup_epochs:
            raise ValueError(
                f"NPD: trainer.max_epochs ({epochs}) counts the {self.hparams.warmup_epochs} warm-up epochs and "
                f"must exceed them; set it to warmup_epochs + the NPD epochs (the default: 5 + 50 = 55)")

    # the backbone is frozen, BN statistics included: it stays in eval mode whatever Lightning asks
    def train(self, mode: bool = True) -> NPD:
        super().train(mode)
        if self.net is not None:
            self.net.eval()
        return self

    def _polarizer_bn(self, train: bool, track: bool = True) -> None:
        bn = self.polarizer[1]
        bn.train(train)
        bn.momentum = 0.1 if track else 0.0  # momentum 0: batch statistics without updating the running ones

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        h, params = self.hparams, list(self.polarizer.parameters())
        warmup = torch.optim.SGD(params, lr=h.warmup_lr)
        main = torch.optim.SGD(params, lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)
        return [warmup, main]

    def on_train_epoch_start(self) -> None:
        self.train()
        self._polarizer_bn(train=self.current_epoch < self.hparams.warmup_epochs)
        self._sums = {}

    @torch.enable_grad()
    def perturb(self, x: Tensor, target: Tensor) -> Tensor:
        """x~ = clamp(x + delta, 0, 1) with ||delta||_2 <= radius per image, pushed toward `target` (x in 0..1)."""
        h = self.hparams
        delta = torch.zeros_like(x, requires_grad=True)
        active = torch.ones((), dtype=torch.bool, device=x.device)
        for step in range(h.attack_steps):
            logits = self((x + delta).clamp(0, 1))
            if step > 0:  # the fork stops once more than stop_fraction of the batch hits the target
                active = active & ((logits.argmax(1) == target).float().mean() <= h.stop_fraction)
            (grad,) = torch.autograd.grad(F.cross_entropy(logits.float(), target), delta)
            moved = delta - h.attack_step_size * (grad.sign() if h.signed_steps else grad)
            norms = moved.flatten(1).norm(dim=1).view(-1, *(1,) * (x.dim() - 1))
            moved = moved * (h.radius / norms).clamp(max=1.0)
            delta = torch.where(active, moved, delta).detach().requires_grad_(True)
        return (x + delta.detach()).clamp(0, 1)

    def npd_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        h = self.hparams
        self._polarizer_bn(train=False)
        logits = self(x)
        y_hat, y_tilde = logits.detach().argmax(1), top_other(logits, y)
        x_adv = self.perturb(x, y_tilde)
        if h.polarizer_bn_train:
            self._polarizer_bn(train=True)
            logits = self(x)
            self._polarizer_bn(train=True, track=False)
            logits_adv = self(x_adv)
            self._polarizer_bn(train=True)
        else:
            logits_adv = self(x_adv)
        terms = {
            "ce_clean": F.cross_entropy(logits.float(), y),
            "ce_adv": F.cross_entropy(logits_adv.float(), y_hat),
            "bce_top_other": neg_log_one_minus_softmax(logits_adv, top_other(logits_adv, y)).mean(),
            "bce_target": neg_log_one_minus_softmax(logits_adv, y_tilde).mean(),
        }
        loss = sum(w * t for w, t in zip(h.loss_weights, terms.values()))
        terms["adv_hits_target"] = (logits_adv.detach().argmax(1) == y_tilde).float().mean()
        return loss, terms

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        warmup, main = self.optimizers()
        x, y = batch
        x = to_unit(self.augment(x))
        if self.current_epoch < self.hparams.warmup_epochs:
            optimizer, loss = warmup, F.cross_entropy(self(x).float(), y)
            terms: dict[str, Tensor] = {}
        else:
            optimizer, (loss, terms) = main, self.npd_loss(x, y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        for k, v in {"loss": loss, **terms}.items():  # epoch sums on the device: no host sync per batch
            self._sums[k] = self._sums.get(k, 0) + v.detach() * len(y)
        self._sums["n"] = self._sums.get("n", 0) + len(y)
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def on_train_epoch_end(self) -> None:
        n = self._sums.pop("n", 0)
        phase = "warmup" if self.current_epoch < self.hparams.warmup_epochs else "npd"
        self.history.append({"epoch": self.current_epoch, "phase": phase,
                             **{k: float(v) / max(1, n) for k, v in self._sums.items()}})

    def finish(self) -> None:
        self.eval()
        self._dm_acc = self.accuracy(*self.mitigation_data("train"))

    def info(self) -> dict[str, Any]:
        return {"layer": self.layer, "channels": self.polarizer[0].in_channels,
                "parameters": sum(p.numel() for p in self.polarizer.parameters()),
                "dm_acc_after": self._dm_acc,
                "epochs": self.history}
