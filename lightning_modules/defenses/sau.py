"""SAU: shared adversarial unlearning (Wei, Zhang, Zha, Wu, "Shared Adversarial Unlearning: Backdoor Mitigation by
Unlearning Shared Adversarial Examples", NeurIPS 2023).

Per D_m batch (model in eval mode, no augmentation): 5 masked PGD steps find perturbations that fool both the
model and the frozen original into the same class, then one Adam step on clean CE + the shared-example loss.
Differs from the reference (BackdoorBench's sau.py; docs/fidelity.md, "SAU"): -log(1 - s) and JS computed
exactly from the logits (the reference clamps); no per-epoch test evaluation.
Defaults: configs/defense/sau.yaml (Tiny-ImageNet 20 epochs: configs/defense/tiny_imagenet/sau.yaml).
Cost: per D_m sample per epoch 5 x (fwd + bwd of both models) for the attack, then 2 fwd + 1 bwd (theta) and
2 no-grad fwd (theta_bar); measured: benchmarks/README.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.transforms import to_unit
from lightning_modules.defenses.base import Defense
from lightning_modules.defenses.npd import neg_log_one_minus_softmax


def shared_indicators(pred: Tensor, pred_ref: Tensor, clean: Tensor, clean_ref: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """Per image: theta flipped (prediction on x~ differs from its prediction on x), theta_bar flipped, and
    shared (both flipped, to the same class)."""
    flipped, flipped_ref = pred != clean, pred_ref != clean_ref
    return flipped, flipped_ref, flipped & flipped_ref & (pred == pred_ref)


def js_divergence(logits: Tensor, logits_ref: Tensor) -> Tensor:
    """Jensen-Shannon divergence between the two softmax distributions, per row (natural log)."""
    log_p, log_q = F.log_softmax(logits.float(), 1), F.log_softmax(logits_ref.float(), 1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    return 0.5 * (log_p.exp() * (log_p - log_m)).sum(1) + 0.5 * (log_q.exp() * (log_q - log_m)).sum(1)


def attack_loss(logits: Tensor, logits_ref: Tensor, y: Tensor, clean: Tensor, clean_ref: Tensor,
                beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
    """The shared-adversarial objective that the perturbation descends, and the per-image shared indicator."""
    flipped, flipped_ref, shared = shared_indicators(logits.argmax(1), logits_ref.argmax(1), clean, clean_ref)
    ce = F.cross_entropy(logits.float(), y, reduction="none") * ~flipped
    ce_ref = F.cross_entropy(logits_ref.float(), y, reduction="none") * ~flipped_ref
    n = len(y)
    js = js_divergence(logits, logits_ref) * ~shared
    loss = -beta1 * (ce.sum() + ce_ref.sum()) / (2 * n) + beta2 * js.sum() / n
    return loss, shared


def unlearning_terms(logits: Tensor, logits_adv: Tensor, y: Tensor, pred_ref: Tensor, pred_ref_adv: Tensor
                     ) -> dict[str, Tensor]:
    """SAU's outer-loss terms: CE on x, CE on x~, and the shared adversarial risk on the images theta_bar sends
    to a class that is neither the label nor its clean prediction (a potential backdoor target)."""
    potential = (pred_ref_adv != y) & (pred_ref_adv != pred_ref)
    risk = neg_log_one_minus_softmax(logits_adv, pred_ref_adv) * potential
    return {"ce_clean": F.cross_entropy(logits.float(), y), "ce_adv": F.cross_entropy(logits_adv.float(), y),
            "shared_risk": risk.sum() / len(y), "potential_poison": potential.float().mean()}


class SAU(Defense):
    """Args:
        bound: L_inf radius of each image's perturbation, in 0..1 pixel units (x~ is not clamped to [0, 1]).
        attack_steps, attack_step_size: signed steps of the shared adversarial search (from delta = +bound).
        beta1, beta2: weights of the adversarial (-CE) and the sharing (JS) terms of the search.
        lambdas: (l1, l2, l3) of CE(x, y), CE(x~, y) and the shared adversarial risk in the unlearning loss.
        lr: Adam (amsgrad, no weight decay), constant.
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    family = "fine-tuning"
    measure_dm_acc = True
    freeze_bn = True  # the model stays in eval mode (the reference's default)
    smoke_args = ["--trainer.max_epochs", "2"]

    def __init__(
        self,
        backdoored: str,
        bound: float = 0.2,
        attack_steps: int = 5,
        attack_step_size: float = 0.2,
        beta1: float = 0.01,
        beta2: float = 1.0,
        lambdas: tuple[float, float, float] = (1.0, 0.0, 1.0),
        lr: float = 1e-4,
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.check(
            ("bound", bound, bound > 0, "> 0"), ("attack_steps", attack_steps, attack_steps >= 1, ">= 1"),
            ("attack_step_size", attack_step_size, attack_step_size > 0, "> 0"),
            ("beta1", beta1, beta1 >= 0, ">= 0"), ("beta2", beta2, beta2 >= 0, ">= 0"), ("lr", lr, lr > 0, "> 0"),
            ("lambdas", lambdas, len(lambdas) == 3 and all(w >= 0 and math.isfinite(w) for w in lambdas),
             "three finite values >= 0"),
            finite=True,
        )
        self.history: list[dict[str, Any]] = []

    def prepare(self) -> None:
        self.reference("original", self.frozen_copy())  # theta_bar

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr, amsgrad=True, weight_decay=0.0)

    @torch.enable_grad()
    def shared_adversarial(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """x~ = x + delta, ||delta||_inf <= bound per image, and whether each x~ was shared when its search
        stopped (x in 0..1, the models in eval mode)."""
        h, original = self.hparams, self.references["original"]
        with torch.no_grad():
            clean, clean_ref = self(x).argmax(1), self.classify(x, original).argmax(1)
        delta = torch.full_like(x, h.bound)
        shared = torch.zeros_like(y, dtype=torch.bool)
        for _ in range(h.attack_steps):
            delta.requires_grad_(True)
            loss, shared = attack_loss(self(x + delta), self.classify(x + delta, original), y, clean, clean_ref,
                                       h.beta1, h.beta2)
            (grad,) = torch.autograd.grad(loss, delta)
            # a shared image's loss terms are all masked, so its gradient is 0 already; the mask makes it exact
            step = torch.where(shared.view(-1, *(1,) * (x.dim() - 1)), 0.0, h.attack_step_size * grad.sign())
            delta = (delta.detach() - step).clamp(-h.bound, h.bound)
        return (x + delta).detach(), shared

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        h = self.hparams
        x, y = batch
        x = to_unit(x)  # no augmentation (the reference's D_m uses the test transform)
        x_adv, _ = self.shared_adversarial(x, y)
        logits, logits_adv = self(torch.cat([x, x_adv])).split(len(y))
        with torch.no_grad():
            ref, ref_adv = self.classify(torch.cat([x, x_adv]), self.references["original"]).argmax(1).split(len(y))
        terms = unlearning_terms(logits, logits_adv, y, ref, ref_adv)
        loss = sum(w * terms[k] for w, k in zip(h.lambdas, ("ce_clean", "ce_adv", "shared_risk")))
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        # epoch sums on the device (no host sync per batch); "shared" is measured on the final x~
        pred, pred_adv = logits.detach().argmax(1), logits_adv.detach().argmax(1)
        terms["shared"] = shared_indicators(pred_adv, ref_adv, pred, ref)[2].float().mean()
        terms["acc"] = (pred == y).float().mean()
        self.track(len(y), loss=loss, **terms)
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, sync_dist=True)
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        self.history.append({"epoch": self.current_epoch, **self.epoch_means()})

    def info(self) -> dict[str, Any]:
        return {"dm_acc_after": self.dm_acc_after, "epochs": self.history}
