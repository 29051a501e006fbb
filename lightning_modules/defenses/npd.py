"""NPD: neural polarizer defense (Zhu, Wei, Zha, Wu, "Neural Polarizer: A Lightweight and Effective Backdoor
Defense via Purifying Poisoned Features", NeurIPS 2023).

A 1x1 conv + BN, identity-initialised, is inserted by a forward pre-hook at the backbone's `layer_roles.polarizer`
(core/backbones/) and trained alone (backbone frozen, eval mode): a CE warm-up, then per batch a targeted L2 PGD
perturbation and a four-term loss; `changes_architecture = True`, checkpoints restore it.
Differs from the fork (details: docs/fidelity.md, "NPD"): no CE clamp at 80 in the attack; the stop check reuses
the next step's forward; no per-epoch test evaluation. -log(1 - s) is the authors' bounded -log(1.0001 - s).
Defaults: configs/defense/npd.yaml; per dataset configs/defense/{gtsrb,tiny_imagenet}/npd.yaml.
Cost: 4 fwd + 4 bwd per D_m sample per epoch (2 attack steps, clean and adversarial loss), against 1 + 1 for FT;
measured: benchmarks/README.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.transforms import to_unit
from lightning_modules.defenses.base import Defense
from lightning_modules.defenses.hooks import layer_setting


class Polarizer(nn.Sequential):
    """1x1 conv without bias, initialised to the identity, then BatchNorm (default init)."""

    def __init__(self, channels: int) -> None:
        super().__init__(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
        with torch.no_grad():
            self[0].weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))


def neg_log_one_minus_softmax(logits: Tensor, k: Tensor, offset: float = 0.0) -> Tensor:
    """-log(1 + offset - softmax(logits)[k]) per row; offset 0: exact, stable as softmax -> 1."""
    logits = logits.float()
    if offset > 0:  # the authors' and the fork's bounded form: at most -log(offset), its gradient vanishes as s -> 1
        return -torch.log(1 + offset - logits.softmax(1).gather(1, k[:, None]).squeeze(1) + 1e-12)
    others = logits.scatter(1, k[:, None], -math.inf)
    return torch.logsumexp(logits, 1) - torch.logsumexp(others, 1)


def top_other(logits: Tensor, exclude: Tensor) -> Tensor:
    """The class with the highest logit other than `exclude`, per row."""
    return logits.detach().scatter(1, exclude[:, None], -math.inf).argmax(1)


class NPD(Defense):
    """Args:
        layers: the module at whose input the polarizer sits (a Conv2d; or a table of them by backbone class
            name); None: the backbone's `layer_roles.polarizer`.
        radius: L2 radius of the perturbation in 0..1 pixel space.
        attack_steps, attack_step_size: at most this many steps of this size per batch.
        signed_steps: sign-of-gradient steps (the fork, CIFAR-10 and GTSRB); False: plain gradient steps on
            the batch-mean CE (the fork on Tiny-ImageNet).
        stop_fraction: stop the steps once more than this fraction of the batch is classified as y~.
        loss_weights: (l1, l2, l3, l4) of the four loss terms.
        lr, momentum, weight_decay: SGD of the polarizer after warm-up (constant).
        warmup_epochs, warmup_lr: the clean warm-up (plain SGD); trainer.max_epochs counts these epochs too.
        polarizer_bn_train: keep the polarizer's BN in train mode after warm-up (the fork on Tiny-ImageNet).
        bce_offset: the two -log(1 - s) terms are -log(1 + bce_offset - s) (the authors' code: 1e-4, at most 9.2);
            0: exact from the logits, unbounded (it diverged on SmallCNN at SPC 100).
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    family = "pruning"
    measure_dm_acc = True
    freeze_bn = True  # the backbone is frozen, BN statistics included
    smoke_args = ["--trainer.max_epochs", "2", "--model.warmup_epochs", "1"]

    changes_architecture = True

    def __init__(
        self,
        backdoored: str,
        layers: str | dict[str, str] | None = None,
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
        bce_offset: float = 1e-4,
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.check(
            ("radius", radius, radius > 0, "> 0"), ("attack_steps", attack_steps, attack_steps >= 1, ">= 1"),
            ("attack_step_size", attack_step_size, attack_step_size > 0, "> 0"),
            ("stop_fraction", stop_fraction, 0 < stop_fraction <= 1, "in (0, 1]"), ("lr", lr, lr > 0, "> 0"),
            ("momentum", momentum, 0 <= momentum < 1, "in [0, 1)"),
            ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
            ("warmup_epochs", warmup_epochs, warmup_epochs >= 0, ">= 0"), ("warmup_lr", warmup_lr, warmup_lr > 0, "> 0"),
            ("bce_offset", bce_offset, bce_offset >= 0, ">= 0"),
            ("loss_weights", loss_weights,
             len(loss_weights) == 4 and all(w >= 0 and math.isfinite(w) for w in loss_weights), "four finite values >= 0"),
            finite=True,
        )
        self.layer = layer_setting(self.net, layers, lambda r: r.polarizer, "polarizer layer",
                                   "configs/defense/npd.yaml")
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

    def setup(self, stage: str) -> None:
        epochs = self.trainer.max_epochs
        if stage == "fit" and epochs is not None and 0 <= epochs <= self.hparams.warmup_epochs:
            raise ValueError(
                f"NPD: trainer.max_epochs ({epochs}) counts the {self.hparams.warmup_epochs} warm-up epochs and "
                f"must exceed them; set it to warmup_epochs + the NPD epochs (the default: 5 + 50 = 55)")

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
            "bce_top_other": neg_log_one_minus_softmax(logits_adv, top_other(logits_adv, y), h.bce_offset).mean(),
            "bce_target": neg_log_one_minus_softmax(logits_adv, y_tilde, h.bce_offset).mean(),
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
        self.track(len(y), loss=loss, **terms)
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def on_train_epoch_end(self) -> None:
        phase = "warmup" if self.current_epoch < self.hparams.warmup_epochs else "npd"
        self.history.append({"epoch": self.current_epoch, "phase": phase, **self.epoch_means()})

    def finish(self) -> None:
        self.eval()

    def info(self) -> dict[str, Any]:
        return {"layer": self.layer, "channels": self.polarizer[0].in_channels,
                "parameters": sum(p.numel() for p in self.polarizer.parameters()),
                "dm_acc_after": self.dm_acc_after,
                "epochs": self.history}
