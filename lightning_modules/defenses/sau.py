"""SAU: shared adversarial unlearning (Wei, Zhang, Zha, Wu, NeurIPS 2023).

The backdoor risk on poisoned images is bounded by the risk on *shared* adversarial examples: perturbations
that fool both the model being purified (theta) and the original backdoored model (theta_bar, frozen) into the
same wrong class. SAU alternates finding such examples for each D_m batch and unlearning them.

Per batch of D_m (no augmentation; batch 256; the model stays in eval mode throughout, so BN statistics are
frozen and only the weights, BN affine included, move):
1. Shared adversarial examples x~ = x + delta in 0..1 pixel space, one delta per image: delta starts at +0.2
   everywhere, then 5 steps delta <- clip(delta - 0.2 * sign(grad), -0.2, 0.2) (L_inf ball 0.2, no clamp of
   x~ to [0, 1]) on
       beta1 * -(1 / 2B) [sum over not-yet-flipped images of CE_theta(x~, y) + same for theta_bar]
     + beta2 * (1 / B) sum over not-yet-shared images of JS(s_theta(x~), s_theta_bar(x~)),
   beta1 0.01, beta2 1. "Flipped" compares each model's prediction on x~ with its own prediction on x;
   "shared" = both flipped to the same class. A shared image has no loss term left, so its delta stops
   there (the per-sample early stop); the steps are masked, not broken out of (the reference breaks once the
   whole batch is shared: same result, no host sync here).
2. One Adam step (lr 1e-4, amsgrad, no weight decay, constant) on
       l1 CE_theta(x, y) + l2 CE_theta(x~, y)
     + l3 (1 / B) sum_i [y_bar != y and y_bar != y_bar_clean] * -log(1 - s_theta(x~)[y_bar])
   with y_bar = theta_bar's prediction on x~ and y_bar_clean its prediction on x; (l1, l2, l3) = (1, 0, 1).
100 epochs (Tiny-ImageNet 20: configs/defense/tiny_imagenet/sau.yaml).

Differences from the reference (BackdoorBench's sau.py, the authors' own code):
- -log(1 - s) is computed exactly from the logits (logsumexp of all minus logsumexp of the others), where the
  reference averages -log(1e-6 + min(1 - s, 0.999)) and -log(1 + 1e-6 - max(s, 0.001)); the values agree
  closely except where s < 0.001 (the reference then gives a constant 0.001 with no gradient, we give the exact,
  tiny value and gradient) or s > 1 - 1e-6 (the reference caps the term at 13.8). JS is computed from
  log-softmax (the reference clamps the probabilities at 1e-8).
- no test-set evaluation after each epoch (never used for a choice there either).

Cost (2 CPU cores shared with other jobs, load ~10; SmallCNN width 32 of configs/quickstart.yaml, BadNets on
digits, SPC 10 = 100 images, one batch per epoch, full defaults, 100 epochs): 1,335 s wall for the defense, 215 s
CPU time for the whole process; ACC 0.986 -> 0.981, ASR 0.960 -> 0.071, RA 0.040 -> 0.898. A batch costs
5 x (forward + backward of both models) for the attack, plus the update's forward of 2B images through theta,
a no-grad forward of 2B images through theta_bar and one backward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
        checks = {"bound": bound > 0, "attack_steps": attack_steps >= 1, "attack_step_size": attack_step_size > 0,
                  "beta1": beta1 >= 0, "beta2": beta2 >= 0, "lr": lr > 0,
                  "lambdas": len(lambdas) == 3 and all(w >= 0 and math.isfinite(w) for w in lambdas)}
        bad = [k for k, ok in checks.items()
               if not ok or (k != "lambdas" and not math.isfinite(self.hparams[k]))]
        if bad:
            raise ValueError(
                f"SAU: invalid {', '.join(f'{k}={self.hparams[k]}' for k in bad)}; expected bound, "
                f"attack_step_size, lr > 0, attack_steps >= 1, beta1, beta2 >= 0, three lambdas >= 0")
        self.original: nn.Module | None = None  # theta_bar, set in prepare()
        self.history: list[dict[str, Any]] = []
        self._sums: dict[str, Tensor] = {}
        self._count = 0
        self._dm_acc: float | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "original":  # theta_bar is no submodule: not in the defended checkpoint, not trained
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def prepare(self) -> None:
        self.original = self.frozen_copy()

    # the model stays in eval mode (the reference's default): BN statistics frozen whatever Lightning asks
    def train(self, mode: bool = True) -> SAU:
        super().train(mode)
        if self.net is not None:
            self.net.eval()
        return self

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr, amsgrad=True, weight_decay=0.0)

    @torch.enable_grad()
    def shared_adversarial(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """x~ = x + delta, ||delta||_inf <= bound per image, and whether each x~ was shared when its search
        stopped (x in 0..1, the models in eval mode)."""
        h, original = self.hparams, self.original
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
            ref, ref_adv = self.classify(torch.cat([x, x_adv]), self.original).argmax(1).split(len(y))
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
        for k, v in {"loss": loss, **terms}.items():
            self._sums[k] = self._sums.get(k, 0) + v.detach() * len(y)
        self._count += len(y)
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, sync_dist=True)
        return loss.detach()

    def on_train_epoch_start(self) -> None:
        self._sums, self._count = {}, 0

    def on_train_epoch_end(self) -> None:
        n = max(1, self._count)
        self.history.append({"epoch": self.current_epoch, **{k: float(v) / n for k, v in self._sums.items()}})

    def finish(self) -> None:
        self._dm_acc = self.accuracy(*self.mitigation_data("train"))

    def info(self) -> dict[str, Any]:
        return {"dm_acc_after": self._dm_acc, "epochs": self.history}
