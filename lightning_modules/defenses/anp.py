"""ANP: adversarial neuron pruning (Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models",
NeurIPS 2021), as the survey's fork of BackdoorBench runs it.

Masks m in [0, 1] on every BN neuron are trained against adversarial multiplicative noise (eps) on the BN weights
(manual optimisation, one noise step + one mask step per batch); `finish()` zeroes the BN weight of neurons with
m <= t, so the pruning lives in the weights. BN running statistics are restored after the mask phase.
Differs from the reference (details: docs/fidelity.md, "ANP"):
- t is chosen on un-augmented D_v against the unpruned model's D_v accuracy (the fork: against test accuracy);
- a drop, not a change either way, refuses a threshold (`symmetric_drop: true` = the fork);
- mask lr 0.01 as the fork (the original ANP: 0.2); `threshold: 0.2` reproduces the original's fixed t.
Defaults: configs/defense/anp.yaml (2,000 iterations of 256 drawn with replacement from D_m minus D_v).
Cost: 3 fwd + 2 bwd per sample per iteration (2x FT's step); measured: benchmarks/README.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.defenses.base import Defense
from lightning_modules.defenses.pruning import (
    BNMasks,
    mask_summary,
    masked_forward,
    prune_bn_channels,
)


class ANP(Defense):
    """Args:
        eps: bound of the multiplicative neuron noise (the reference's anp_eps).
        noise_steps: signed ascent steps on the noise per batch, each of size eps / noise_steps.
        alpha: weight of the clean loss; 1 - alpha weighs the perturbed loss.
        lr, momentum: SGD on the masks.
        threshold: prune neurons with mask <= threshold; None chooses it on D_v (needs data.val_fraction > 0).
        threshold_max, threshold_step: the thresholds tried, 0, step, ..., max.
        max_acc_drop: the largest relative D_v accuracy drop (vs the unpruned model) a chosen threshold may cost.
        symmetric_drop: refuse a relative change of max_acc_drop either way, a rise included (the survey's fork).
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    family = "pruning"
    smoke_args = ["--trainer.max_steps", "2", "--data.samples_per_epoch", "256"]

    def __init__(
        self,
        backdoored: str,
        eps: float = 0.4,
        noise_steps: int = 1,
        alpha: float = 0.2,
        lr: float = 0.01,
        momentum: float = 0.9,
        threshold: float | None = None,
        threshold_max: float = 0.9,
        threshold_step: float = 0.05,
        max_acc_drop: float = 0.1,
        symmetric_drop: bool = False,
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        self.check(
            ("eps", eps, eps >= 0, ">= 0"), ("noise_steps", noise_steps, noise_steps >= 1, ">= 1"),
            ("alpha", alpha, 0 <= alpha <= 1, "in [0, 1]"), ("lr", lr, lr > 0, "> 0"),
            ("momentum", momentum, 0 <= momentum < 1, "in [0, 1)"),
            ("threshold", threshold, threshold is None or 0 <= threshold < 1, "in [0, 1), or null to choose on D_v"),
            ("threshold_max", threshold_max, 0 <= threshold_max < 1, "in [0, 1)"),
            ("threshold_step", threshold_step, threshold_step > 0, "> 0"),
            ("max_acc_drop", max_acc_drop, 0 < max_acc_drop <= 1, "in (0, 1]"),
        )
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        self.automatic_optimization = False
        # the learned masks (kept in the checkpoint for the record; the defended forward does not use them)
        self.neuron_masks = BNMasks(self.net, "ANP")
        self.bn_names = self.neuron_masks.names
        self.net.requires_grad_(False)  # ANP learns the masks only
        self._bn_buffers: dict[str, Tensor] = {}
        self._facts: dict[str, Any] = {}

    def masks(self) -> dict[str, Tensor]:
        return self.neuron_masks.as_dict()

    def thresholds(self) -> list[float]:
        h = self.hparams
        count = math.floor(h.threshold_max / h.threshold_step + 1e-9) + 1
        return [round(i * h.threshold_step, 6) for i in range(count)]

    def inputs(self, x: Tensor) -> Tensor:
        """Pixels -> the network's input (normalised, in the configured memory format)."""
        x = self.normalize(x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    # -- the mask optimisation: Lightning's training loop ---------------------------------------------------
    def prepare(self) -> None:
        if self.hparams.threshold is None and len(self.mitigation_data("val")[1]) == 0:
            raise ValueError("ANP chooses its threshold on D_v, which is empty: set data.init_args.val_fraction "
                             "(0.1 in configs/defense/anp.yaml) or fix model.init_args.threshold")
        self._bn_buffers = {name: b.clone() for name, b in self.net.named_buffers()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.neuron_masks.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        h = self.hparams
        x, y = batch
        x = self.inputs(self.augment(x))
        masks = self.masks()
        loss = h.alpha * F.cross_entropy(masked_forward(self.net, x, masks), y)
        if h.eps > 0:
            noise_w, noise_b = self.adversarial_noise(x, y)
            perturbed = {n: m + noise_w[n] for n, m in masks.items()}
            bias = {n: 1 + xi for n, xi in noise_b.items()}
            loss = loss + (1 - h.alpha) * F.cross_entropy(masked_forward(self.net, x, perturbed, bias), y)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        with torch.no_grad():
            for m in self.neuron_masks:
                m.clamp_(0.0, 1.0)
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, sync_dist=True)
        return loss.detach()

    def adversarial_noise(self, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Noise on BN weight and bias maximising CE around the current masks: uniform start, signed steps."""
        eps, steps = self.hparams.eps, self.hparams.noise_steps
        masks = {n: m.detach() for n, m in self.masks().items()}
        noise_w = {n: torch.empty_like(m).uniform_(-eps, eps).requires_grad_() for n, m in masks.items()}
        noise_b = {n: torch.empty_like(m).uniform_(-eps, eps).requires_grad_() for n, m in masks.items()}
        leaves = [*noise_w.values(), *noise_b.values()]
        for _ in range(steps):
            scale_w = {n: masks[n] + xi for n, xi in noise_w.items()}
            scale_b = {n: 1 + xi for n, xi in noise_b.items()}
            loss = F.cross_entropy(masked_forward(self.net, x, scale_w, scale_b), y)
            grads = torch.autograd.grad(loss, leaves)
            with torch.no_grad():
                for xi, g in zip(leaves, grads):
                    xi.add_(g.sign(), alpha=eps / steps)
        return {n: xi.detach() for n, xi in noise_w.items()}, {n: xi.detach() for n, xi in noise_b.items()}

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        """D_v serves the threshold choice in finish(); mid-run validation would read drifting BN statistics."""

    # -- pruning ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def finish(self) -> None:
        h = self.hparams
        for name, buffer in self.net.named_buffers():  # undo the train-mode updates of the running statistics
            buffer.copy_(self._bn_buffers[name])
        masks = {n: m.detach().clone() for n, m in self.masks().items()}
        x_val, y_val = self.mitigation_data("val")
        base, curve = None, []
        if len(y_val):
            base = self.accuracy(x_val, y_val)
            probe = self.frozen_copy()
            modules = dict(probe.named_modules())
            original = {n: modules[n].weight.clone() for n in masks}
            for t in self.thresholds():
                for n, m in masks.items():
                    modules[n].weight.copy_(original[n] * (m > t))
                pruned = sum(int((m <= t).sum()) for m in masks.values())
                curve.append({"threshold": t, "pruned": pruned, "val_acc": self.accuracy(x_val, y_val, net=probe)})
        chosen = h.threshold if h.threshold is not None else choose_threshold(base, curve, h.max_acc_drop,
                                                                              h.symmetric_drop)
        pruned = {n: torch.nonzero(m <= chosen).flatten() for n, m in masks.items()} if chosen is not None else {}
        prune_bn_channels(self.net, pruned, zero_bias=False)
        self._facts = {
            "threshold": chosen,
            "threshold_rule": "fixed" if h.threshold is not None else
            f"largest t whose D_v accuracy {'changes' if h.symmetric_drop else 'drops'} < {h.max_acc_drop:g} "
            f"(relative) from the unpruned one, else none",
            "val_augmented": False,
            "val_size": len(y_val), "val_acc_unpruned": base, "val_acc_curve": curve,
            "pruned": sum(len(i) for i in pruned.values()),
            "pruned_per_layer": {n: len(i) for n, i in pruned.items() if len(i)},
            "mask": mask_summary(masks),
        }

    def info(self) -> dict[str, Any]:
        return self._facts


def choose_threshold(
    base: float | None, curve: list[dict[str, Any]], max_acc_drop: float, symmetric: bool = False
) -> float | None:
    """The largest threshold whose D_v accuracy is at least the unpruned one or drops by less than max_acc_drop
    of it (relative); with `symmetric`, whose accuracy changes by less than that either way (the fork's rule).
    None when no threshold qualifies (then nothing is pruned)."""
    if base is None:
        return None
    if symmetric:
        ok = [p["threshold"] for p in curve if abs(base - p["val_acc"]) < max_acc_drop * base]
    else:
        ok = [p["threshold"] for p in curve if p["val_acc"] >= base or base - p["val_acc"] < max_acc_drop * base]
    return max(ok) if ok else None
