"""TSBD: two-stage backdoor defense (Lin, Liu, Wei, Li, Xiong, "Unveiling and Mitigating Backdoor Vulnerabilities
based on Unlearning Weight Changes and Backdoor Activeness", NeurIPS 2024). Not in the survey; its family is
fine-tuning (survey §IV: the zeroed weights are re-learned, not removed, like FST's re-initialised head).

Stage 1 (`prepare`): unlearn a copy (gradient ascent on CE(D_m) until its D_m accuracy is <= 0.1); rank every Conv2d
output channel of the original by its neuron weight change NWC = ||W_unlearned - W||_1 over its fan-in, one ranking
over all layers; zero the `weight_ratio` most-changed weights among the top `neuron_ratio` neurons. Stage 2
(`training_step`): activeness-aware fine-tuning, min CE + lambda ||grad_theta CE||_2, in the reference's
finite-difference form: SGD on (1 - alpha) g(theta) + alpha g(theta + r g / ||g||) (||g|| per tensor), lambda = alpha r.
Differs from the reference (linweiii/TSBD; docs/fidelity.md, "TSBD"): one neuron ratio instead of a sweep over 11
read on the test set; the stop reads un-augmented D_m; BN statistics move once per step, at theta; theta is restored
from a copy instead of perturbing a per-batch deep copy of the model.
Defaults: configs/defense/tsbd.yaml (the reference's config.yaml; the neuron ratio is ours).
Cost: unlearning 1 fwd + 1 bwd per D_m sample per epoch + 1 fwd for the stop check; fine-tuning 2 fwd + 2 bwd per
sample per epoch (2x FT); measured: benchmarks/README.md, "Newer defenses".
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.defenses.base import Defense
from lightning_modules.defenses.ftsam import frozen_bn_statistics
from lightning_modules.defenses.hooks import layer_setting

CONFIG = "configs/defense/tsbd.yaml"


@torch.no_grad()
def weight_changes(net: nn.Module, unlearned: nn.Module, layers: list[str]) -> dict[str, Tensor]:
    """|W_unlearned - W| of each named Conv2d as (out_channels, fan_in) rows: one row per neuron."""
    before, after = dict(net.named_modules()), dict(unlearned.named_modules())
    return {n: (after[n].weight - before[n].weight).abs().flatten(1).float() for n in layers}


@torch.no_grad()
def select_reinit(
    changes: dict[str, Tensor], neuron_ratio: float, weight_ratio: float
) -> tuple[dict[str, Tensor], dict[str, Tensor], float]:
    """The reference's zero re-initialisation: the int(neuron_ratio * N) neurons of largest NWC (row sums of
    `changes`) over all layers together, then among all their weights the int(weight_ratio * n) of largest change,
    i.e. every weight of those neurons at or above the smallest of these (the reference's threshold).
    Returns ({layer: chosen neuron indices}, {layer: bool mask of the weights to zero, shaped as the rows}, threshold).
    """
    names = list(changes)
    scores = torch.cat([changes[n].sum(1) for n in names])
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    chosen[torch.topk(scores, int(len(scores) * neuron_ratio)).indices] = True
    neurons = {n: c.nonzero().flatten() for n, c in zip(names, chosen.split([len(changes[n]) for n in names]))}
    pooled = torch.cat([changes[n][neurons[n]].flatten() for n in names])
    count = int(len(pooled) * weight_ratio)
    threshold = float(torch.topk(pooled, count).values[-1]) if count else float("inf")
    masks = {}
    for n in names:
        mask = torch.zeros_like(changes[n], dtype=torch.bool)
        mask[neurons[n]] = changes[n][neurons[n]] >= threshold
        masks[n] = mask
    return neurons, masks, threshold


def ascent_step(grads: list[Tensor], r: float, scope: str = "tensor", eps: float = 1e-12) -> list[Tensor]:
    """r g / ||g||_2, the finite-difference step of the gradient-norm penalty: the norm per tensor (the reference)
    or over all of them ("global", the penalty's own ||grad_theta L||_2). A zero gradient gives a zero step."""
    if scope == "tensor":
        return [g * (r / (torch.linalg.vector_norm(g) + eps)) for g in grads]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return [g * (r / (norm + eps)) for g in grads]


class TSBD(Defense):
    """Args:
        unlearn_lr, unlearn_momentum: SGD of the clean unlearning (gradient ascent on CE(D_m), constant lr,
            no weight decay) over a copy of the model.
        unlearn_epochs: at most this many unlearning epochs.
        unlearn_stop_acc: stop unlearning after the first epoch whose D_m accuracy (eval mode) is <= this.
        neuron_ratio: n, the share of all Conv2d output channels (one ranking over the layers) whose weights may be
            zeroed, those with the largest NWC.
        weight_ratio: m, the share of those neurons' weights zeroed, the most changed by the unlearning.
        exclude_convs: dotted-name parts of convs left out of the ranking (or a table of them by backbone class
            name); None: the backbone's `layer_roles.skip_convs` (PreActResNet18: the 1x1 "shortcut" convs, which the
            reference leaves out by name).
        r: radius of the finite-difference step theta + r g / ||g|| of the gradient-norm penalty.
        alpha: the update's gradient is (1 - alpha) g(theta) + alpha g(theta + r g / ||g||): the penalty weight
            lambda = alpha r on ||grad_theta CE||_2.
        norm_scope: ||g|| per parameter tensor ("tensor", the reference) or over all parameters ("global").
        lr, momentum, weight_decay: SGD of the fine-tuning (constant lr, as the reference); its epochs are
            trainer.max_epochs.
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    family = "fine-tuning"
    measure_dm_acc = True
    smoke_args = ["--trainer.max_epochs", "1", "--model.unlearn_epochs", "2"]

    def __init__(
        self,
        backdoored: str,
        unlearn_lr: float = 1e-4,
        unlearn_momentum: float = 0.9,
        unlearn_epochs: int = 1000,
        unlearn_stop_acc: float = 0.1,
        neuron_ratio: float = 0.05,
        weight_ratio: float = 0.7,
        exclude_convs: list[str] | dict[str, list[str]] | None = None,
        r: float = 0.05,
        alpha: float = 0.7,
        norm_scope: Literal["tensor", "global"] = "tensor",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        self.check(
            ("unlearn_lr", unlearn_lr, unlearn_lr > 0, "> 0"),
            ("unlearn_momentum", unlearn_momentum, 0 <= unlearn_momentum < 1, "in [0, 1)"),
            ("unlearn_epochs", unlearn_epochs, unlearn_epochs >= 1, ">= 1 (stage 1 ranks by the unlearning's changes)"),
            ("unlearn_stop_acc", unlearn_stop_acc, 0 <= unlearn_stop_acc <= 1, "in [0, 1]"),
            ("neuron_ratio", neuron_ratio, 0 < neuron_ratio < 1, "in (0, 1): the share of conv neurons re-initialised"),
            ("weight_ratio", weight_ratio, 0 < weight_ratio <= 1, "in (0, 1]: the share of their weights zeroed"),
            ("r", r, r > 0, "> 0"),
            ("alpha", alpha, 0 <= alpha <= 1, "in [0, 1] (0: plain fine-tuning)"),
            ("norm_scope", norm_scope, norm_scope in ("tensor", "global"), "'tensor' or 'global'"),
            ("lr", lr, lr > 0, "> 0"), ("momentum", momentum, 0 <= momentum < 1, "in [0, 1)"),
            ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
            finite=True,
        )
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        self.automatic_optimization = False
        skip = set(layer_setting(self.net, exclude_convs, lambda roles: roles.skip_convs, "exclude_convs entry",
                                 CONFIG))
        self.layer_names = [n for n, m in self.net.named_modules()
                            if isinstance(m, nn.Conv2d) and not set(n.split(".")) & skip]
        if not self.layer_names:
            raise ValueError(f"TSBD re-initialises Conv2d neurons; {type(self.net).__name__} has none outside "
                             f"exclude_convs {sorted(skip)}; fix exclude_convs in {CONFIG}")
        self.reinit_neurons: dict[str, list[int]] = {}
        self.history: dict[str, Any] = {}
        self.epochs: list[dict[str, float]] = []

    # -- stage 1: NWC-based zero re-initialisation --------------------------------------------------------------
    def unlearn(self) -> nn.Module:
        """Gradient ascent on CE(D_m) over a copy until its D_m accuracy is <= unlearn_stop_acc; returns the copy."""
        h = self.hparams
        net = copy.deepcopy(self.net).train().requires_grad_(True)
        optimizer = torch.optim.SGD(net.parameters(), lr=h.unlearn_lr, momentum=h.unlearn_momentum)
        x, y = self.mitigation_data("train")
        accuracies: list[float] = []
        for _ in range(h.unlearn_epochs):
            self.finetune_epoch(net, optimizer, x, y, ascent=True)
            accuracies.append(self.accuracy(x, y, net=net))
            if accuracies[-1] <= h.unlearn_stop_acc:
                break
        self.history["unlearn"] = {"epochs": len(accuracies), "dm_acc": accuracies,
                                   "reached_stop_acc": accuracies[-1] <= h.unlearn_stop_acc}
        return net.requires_grad_(False)

    @torch.no_grad()
    def prepare(self) -> None:
        h = self.hparams
        changes = weight_changes(self.net, self.unlearn(), self.layer_names)
        # DDP: every process zeroes (and records) what rank 0 chose; each unlearned its own copy
        neurons, masks, threshold = self.trainer.strategy.broadcast(
            select_reinit(changes, h.neuron_ratio, h.weight_ratio), src=0)
        modules = dict(self.net.named_modules())
        for name, mask in masks.items():
            weight = modules[name].weight
            weight.masked_fill_(mask.to(weight.device).view(weight.shape), 0.0)
        self.reinit_neurons = {n: i.tolist() for n, i in neurons.items() if len(i)}
        x, y = self.mitigation_data("train")
        self.history |= {
            "layers": len(self.layer_names), "neurons_total": sum(len(c) for c in changes.values()),
            "neurons_reinit": sum(len(i) for i in self.reinit_neurons.values()),
            "weights_zeroed": sum(int(m.sum()) for m in masks.values()),
            "weight_change_threshold": threshold,
            "reinit_per_layer": {n: len(i) for n, i in self.reinit_neurons.items()},
            "dm_acc_after_reinit": self.accuracy(x, y),
        }

    # -- stage 2: activeness-aware fine-tuning ------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        h = self.hparams
        return torch.optim.SGD(self.net.parameters(), lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        h = self.hparams
        optimizer = self.optimizers()
        x, y = batch
        x = self.augment(x)
        optimizer.zero_grad()
        loss = F.cross_entropy(self(x).float(), y)
        self.manual_backward(loss)
        live = [p for p in self.net.parameters() if p.grad is not None]
        with torch.no_grad():
            grads = [p.grad.clone() for p in live]
            saved = [p.detach().clone() for p in live]
            for p, step in zip(live, ascent_step(grads, h.r, h.norm_scope)):
                p.add_(step)
        optimizer.zero_grad()
        with frozen_bn_statistics(self.net):  # the running statistics keep the pass at theta only
            perturbed = F.cross_entropy(self(x).float(), y)
            self.manual_backward(perturbed)
        with torch.no_grad():
            for p, original, g in zip(live, saved, grads):
                p.copy_(original)
                p.grad.mul_(h.alpha).add_(g, alpha=1 - h.alpha)  # (1 - alpha) g(theta) + alpha g(theta + step)
        optimizer.step()
        self.track(len(y), loss=loss, perturbed_loss=perturbed)
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, sync_dist=True)
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        self.epochs.append({"epoch": self.current_epoch, **self.epoch_means()})

    def info(self) -> dict[str, Any]:
        return {**self.history, "dm_acc_after": self.dm_acc_after, "epochs": self.epochs}
