"""RNP: reconstructive neuron pruning (Li, Lyu, Ma, Koren, Lyu, Li, Jiang, ICML 2023).

Unlearning the clean task on a few clean images breaks the backdoored network's clean neurons long before
its backdoor neurons; asking which neurons must be switched off to *recover* clean accuracy afterwards
singles out the backdoor ones. Three phases, each mapped onto the `Defense` hooks:

1. Unlearn (`prepare`, a hand-written loop on a copy: it has a data-dependent stop): gradient *ascent* on
   CE(D_m) over all weights, SGD lr 1e-3, momentum 0.9, weight decay 5e-2, cosine over 20 epochs (the
   survey's fork), train mode, augmented D_m; stop after the first epoch whose D_m accuracy is <= 0.20, read
   (`stop_signal`) in eval mode on un-augmented D_m after the epoch ("eval_acc", default: deterministic, and
   the network the next phase starts from) or as the running train-mode accuracy of the epoch's augmented
   batches, weights changing within the epoch ("running_train_acc", the fork's and the original's; in train
   mode the unlearned weights meet fresh batch statistics, so it falls later: on the review's toy model the
   eval-mode rule stopped at epoch 3, the running one at epoch 5).
2. Recover (Lightning's training loop, `trainer.max_epochs` = 20 epochs): learn one mask m in [0, 1] per BN
   neuron scaling its BN weight, min_m CE(D_m; m * theta_unlearned), unlearned weights frozen, model in
   train mode (batch statistics), SGD lr 0.2, momentum 0.9, masks clipped to [0, 1] after every step.
   The masks are plain tensors outside the module's state (the defended checkpoint needs none of them),
   applied with `pruning.masked_forward`.
3. Prune (`finish`): zero the BN weight of the *original* network's neurons whose mask is below a threshold.
   `selection: accuracy_drop` (the fork's rule, default): raise the threshold from 0 in steps of 0.02
   (0, 0.02, ..., 0.98) and keep the last one whose D_m accuracy is not more than `max_acc_drop` = 0.02
   (2 points, absolute) below the unpruned model's; `selection: fixed` prunes below `fixed_threshold`
   (BackdoorBench's 0.70). The pruning lives in the weights, so the defended checkpoint is a plain backbone.

Masks during unlearning: the fork unlearns a network that already carries the BN masks (they are updated by
the ascent and its weight decay, then recovery starts from them); the original starts recovery from masks of
1. We follow the original by default (the mask then measures only what recovery needs, not an artefact of
ascent on a masked replica); `unlearn_masks: true` reproduces the fork.

Differences from the fork, and why:
- The unlearning stop by default (above), and the threshold scan, read D_m accuracy in eval mode without
  augmentation (deterministic, the project's rule); the fork's scan reads accuracy on augmented D_m.
- The masks are clamped to [0, 1] right after unlearning (the fork clamps them only during recovery).
- No gradient-norm clipping: the fork calls clip_grad_norm_(20) before backward, on empty gradients (a no-op),
  and retries unlearning at lr / 10 on an exception; we do neither.
- Every BN architecture works by module name (the fork rebuilt four architectures with mask-BN classes).
The original: unlearning lr 0.01, wd 5e-4, steps at epochs 10 and 20; recovery loss scaled by 0.2
(`recover_loss_weight`); pruning at masks <= threshold.

Cost (2 CPU cores shared with other jobs, load ~20; SmallCNN width 32 of configs/quickstart.yaml on digits,
SPC 10 = 100 images, full defaults): 23 s wall for the three phases (20 unlearning epochs of one batch: the
ascent at lr 1e-3 did not reach 0.2 there; 20 recovery epochs; a 10-threshold scan), 26 s CPU time for the
whole process. Per step: one forward-backward of the backbone (unlearning, recovery); the scan costs one D_m
evaluation per threshold that prunes something new.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.defenses.base import Defense
from lightning_modules.defenses.pruning import bn_layers, masked_forward, prune_bn_channels


class MaskedNet(nn.Module):
    """`net` with each BN layer's weight scaled by `masks[name]` (plain tensors, trained or not)."""

    def __init__(self, net: nn.Module, masks: dict[str, Tensor]) -> None:
        super().__init__()
        self.net, self.masks = net, masks

    def forward(self, x: Tensor) -> Tensor:
        return masked_forward(self.net, x, self.masks)


def scan_threshold(
    masks: Tensor, accuracy: Callable[[Tensor], float], base: float, step: float, max_drop: float
) -> tuple[float, list[dict[str, float]]]:
    """The fork's rule: thresholds 0, step, 2 step, ... < 1; at each, prune the neurons with mask < threshold
    and read `accuracy(pruned)` (a boolean vector over the neurons); stop at the first threshold whose accuracy
    falls more than `max_drop` below `base` and return the one before it, with the scan's history."""
    chosen, history, pruned_before = 0.0, [], 0
    for k in range(math.ceil(1.0 / step - 1e-9)):
        threshold = round(k * step, 10)
        pruned = masks < threshold
        count = int(pruned.sum())
        if count == 0:
            acc = base
        elif count == pruned_before:
            acc = history[-1]["acc"]  # nothing new pruned
        else:
            acc = accuracy(pruned)
        history.append({"threshold": threshold, "pruned": count, "acc": acc})
        if acc < base - max_drop - 1e-9:
            break
        chosen, pruned_before = threshold, count
    return chosen, history


class RNP(Defense):
    """Args:
        unlearn_lr, unlearn_momentum, unlearn_weight_decay: SGD of the gradient ascent (cosine over
            unlearn_epochs, stepped per epoch).
        unlearn_epochs: at most this many unlearning epochs.
        unlearn_stop_acc: stop unlearning after the first epoch whose D_m accuracy is <= this.
        stop_signal: which D_m accuracy: "eval_acc" (eval mode, no augmentation, after the epoch) or
            "running_train_acc" (the running accuracy of the epoch's augmented train-mode batches, the fork's).
        unlearn_masks: the masks already scale the BN weights during unlearning and are trained by the ascent
            (the survey's fork); False: recovery starts from masks of 1 (the original).
        recover_lr, recover_momentum: SGD of the masks (constant); the recovery epochs are trainer.max_epochs.
        recover_loss_weight: factor on the recovery CE (the original: 0.2).
        selection: "accuracy_drop" (scan thresholds on D_m, the fork) or "fixed" (BackdoorBench).
        threshold_step, max_acc_drop: the scan's step and the largest allowed D_m accuracy drop (absolute).
        fixed_threshold: the threshold of selection "fixed".
        prune_bias: zero the BN bias of pruned neurons too (the channel then outputs exactly 0); the method
            zeroes the weight only, which is what a mask of 0 meant during recovery.
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    def __init__(
        self,
        backdoored: str,
        unlearn_lr: float = 1e-3,
        unlearn_momentum: float = 0.9,
        unlearn_weight_decay: float = 5e-2,
        unlearn_epochs: int = 20,
        unlearn_stop_acc: float = 0.2,
        unlearn_masks: bool = False,
        stop_signal: Literal["eval_acc", "running_train_acc"] = "eval_acc",
        recover_lr: float = 0.2,
        recover_momentum: float = 0.9,
        recover_loss_weight: float = 1.0,
        selection: Literal["accuracy_drop", "fixed"] = "accuracy_drop",
        threshold_step: float = 0.02,
        max_acc_drop: float = 0.02,
        fixed_threshold: float = 0.7,
        prune_bias: bool = False,
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        checks = {
            "unlearn_lr": unlearn_lr > 0, "unlearn_momentum": 0 <= unlearn_momentum < 1,
            "unlearn_weight_decay": unlearn_weight_decay >= 0, "unlearn_epochs": unlearn_epochs >= 0,
            "unlearn_stop_acc": 0 <= unlearn_stop_acc <= 1, "recover_lr": recover_lr > 0,
            "recover_momentum": 0 <= recover_momentum < 1, "recover_loss_weight": recover_loss_weight > 0,
            "threshold_step": 0 < threshold_step <= 1, "max_acc_drop": 0 <= max_acc_drop <= 1,
            "fixed_threshold": 0 <= fixed_threshold <= 1,
        }
        bad = [k for k, ok in checks.items() if not ok or not math.isfinite(self.hparams[k])]
        if bad:
            raise ValueError(
                f"RNP: invalid {', '.join(f'{k}={self.hparams[k]}' for k in bad)}; expected learning rates and "
                f"recover_loss_weight > 0, momenta in [0, 1), weight decay and unlearn_epochs >= 0, "
                f"unlearn_stop_acc / max_acc_drop / fixed_threshold in [0, 1], threshold_step in (0, 1]")
        if stop_signal not in ("eval_acc", "running_train_acc"):
            raise ValueError(f"RNP: stop_signal must be 'eval_acc' or 'running_train_acc', got {stop_signal!r}")
        if selection not in ("accuracy_drop", "fixed"):
            raise ValueError(f"RNP: selection must be 'accuracy_drop' or 'fixed', got {selection!r}")
        if not bn_layers(self.net):
            raise ValueError(f"RNP masks BatchNorm2d neurons; {type(self.net).__name__} has none")
        self.masks: dict[str, Tensor] = {}  # BN layer name -> mask, created on the device
        self._work: dict[str, nn.Module] = {}  # the unlearned copy: not a submodule, so never checkpointed
        self.history: dict[str, Any] = {}

    def _init_masks(self) -> None:
        if not self.masks:
            self.masks = {name: torch.ones(bn.num_features, device=self.device, requires_grad=True)
                          for name, bn in bn_layers(self.net)}

    @torch.no_grad()
    def _clip_masks(self) -> None:
        for m in self.masks.values():
            m.clamp_(0.0, 1.0)

    # -- 1. unlearn ----------------------------------------------------------------------------------------
    def prepare(self) -> None:
        h = self.hparams
        self._init_masks()
        net = copy.deepcopy(self.net).train().requires_grad_(True)
        model = MaskedNet(net, self.masks) if h.unlearn_masks else net
        params = list(net.parameters()) + (list(self.masks.values()) if h.unlearn_masks else [])
        optimizer = torch.optim.SGD(params, lr=h.unlearn_lr, momentum=h.unlearn_momentum,
                                    weight_decay=h.unlearn_weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, h.unlearn_epochs))
        x, y = self.mitigation_data("train")
        accuracies = []
        with torch.enable_grad():
            for _ in range(h.unlearn_epochs):
                model.train()
                correct = torch.zeros((), device=x.device)  # the epoch's running accuracy, summed on the device
                for xb, yb in self.batches(x, y, self.mitigation.batch_size, shuffle=True, augment=True):
                    with self.autocast():
                        logits = self.classify(xb, model).float()
                        loss = -F.cross_entropy(logits, yb)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    correct += (logits.detach().argmax(1) == yb).sum()
                scheduler.step()
                if h.stop_signal == "eval_acc":
                    accuracies.append(self.accuracy(x, y, net=model))
                else:
                    accuracies.append(float(correct) / max(1, len(y)))
                if accuracies[-1] <= h.unlearn_stop_acc:
                    break
        self._clip_masks()
        net.requires_grad_(False)
        self._work["recovery"] = MaskedNet(net, self.masks).train()
        self.history = {"unlearn": {"epochs": len(accuracies), "stop_signal": h.stop_signal, "dm_acc": accuracies,
                                    "reached_stop_acc": bool(accuracies) and accuracies[-1] <= h.unlearn_stop_acc}}

    # -- 2. recover ----------------------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        self._init_masks()  # runs after the module moved to its device, before on_fit_start
        h = self.hparams
        return torch.optim.SGD(list(self.masks.values()), lr=h.recover_lr, momentum=h.recover_momentum)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        model = self._work["recovery"]
        model.train()
        loss = F.cross_entropy(self.classify(self.augment(x), model), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return self.hparams.recover_loss_weight * loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._clip_masks()

    # -- 3. prune the original weights -------------------------------------------------------------------------
    def finish(self) -> None:
        h = self.hparams
        self._work.clear()
        names = list(self.masks)
        # the masks are plain tensors that DDP does not sync: every process prunes rank 0's masks
        flat = self.trainer.strategy.broadcast(torch.cat([self.masks[n].detach().float() for n in names]), src=0)
        sizes = [self.masks[n].numel() for n in names]
        x, y = self.mitigation_data("train")
        base = self.accuracy(x, y)
        scan: list[dict[str, float]] = []
        if h.selection == "fixed":
            threshold = h.fixed_threshold
        else:
            work = copy.deepcopy(self.net)  # pruned cumulatively: the pruned set only grows with the threshold
            done = torch.zeros_like(flat, dtype=torch.bool)

            def accuracy(pruned: Tensor) -> float:
                prune_bn_channels(work, self._by_layer(pruned & ~done, names, sizes), zero_bias=h.prune_bias)
                done.copy_(done | pruned)
                return self.accuracy(x, y, net=work)

            threshold, scan = scan_threshold(flat, accuracy, base, h.threshold_step, h.max_acc_drop)
        pruned = self._by_layer(flat < threshold, names, sizes)
        total = prune_bn_channels(self.net, pruned, zero_bias=h.prune_bias)
        self.history |= {
            "selection": h.selection, "threshold": threshold, "dm_acc_unpruned": base,
            "dm_acc_pruned": self.accuracy(x, y), "scan": scan, "pruned_total": total, "neurons_total": len(flat),
            "pruned_per_layer": {n: len(i) for n, i in pruned.items() if len(i)},
            "mask_quantiles": dict(zip(("min", "q25", "median", "q75", "max"),
                                       torch.quantile(flat, torch.tensor([0, .25, .5, .75, 1.0], device=flat.device))
                                       .tolist())),
        }

    @staticmethod
    def _by_layer(selected: Tensor, names: list[str], sizes: list[int]) -> dict[str, Tensor]:
        return {n: s.nonzero().flatten() for n, s in zip(names, selected.split(sizes))}

    def info(self) -> dict[str, Any]:
        return self.history
