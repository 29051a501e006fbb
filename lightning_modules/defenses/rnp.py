"""RNP: reconstructive neuron pruning (Li, Lyu, Ma, Koren, Lyu, Li, Jiang, "Reconstructive Neuron Pruning for
Backdoor Defense", ICML 2023).

Unlearn (`prepare`: gradient ascent on a copy until D_m accuracy <= 0.2), recover (train BN-neuron masks on the
frozen unlearned weights), prune (`finish`: zero the original's BN weights below the threshold chosen on D_m).
The pruning lives in the weights; the masks are not saved.
Differs from the fork (details: docs/fidelity.md, "RNP"): the stop reads eval-mode un-augmented D_m
(`stop_signal: running_train_acc` = the fork); masks start at 1 in recovery (`unlearn_masks: true` = the fork);
the scan reads un-augmented D_m; no gradient clipping or lr retry.
Defaults: configs/defense/rnp.yaml (`selection: fixed` with 0.70 = BackdoorBench's rule).
Cost: 1 fwd + 1 bwd per D_m sample per unlearning and recovery epoch; 1 fwd per sample per scanned threshold;
measured: benchmarks/README.md.
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
from lightning_modules.defenses.pruning import (
    bn_layers,
    masked_forward,
    prune_bn_channels,
)


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

    family = "pruning"
    smoke_args = ["--trainer.max_epochs", "2", "--model.unlearn_epochs", "2"]

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
        self.check(
            ("unlearn_lr", unlearn_lr, unlearn_lr > 0, "> 0"),
            ("unlearn_momentum", unlearn_momentum, 0 <= unlearn_momentum < 1, "in [0, 1)"),
            ("unlearn_weight_decay", unlearn_weight_decay, unlearn_weight_decay >= 0, ">= 0"),
            ("unlearn_epochs", unlearn_epochs, unlearn_epochs >= 0, ">= 0"),
            ("unlearn_stop_acc", unlearn_stop_acc, 0 <= unlearn_stop_acc <= 1, "in [0, 1]"),
            ("recover_lr", recover_lr, recover_lr > 0, "> 0"),
            ("recover_momentum", recover_momentum, 0 <= recover_momentum < 1, "in [0, 1)"),
            ("recover_loss_weight", recover_loss_weight, recover_loss_weight > 0, "> 0"),
            ("threshold_step", threshold_step, 0 < threshold_step <= 1, "in (0, 1]"),
            ("max_acc_drop", max_acc_drop, 0 <= max_acc_drop <= 1, "in [0, 1]"),
            ("fixed_threshold", fixed_threshold, 0 <= fixed_threshold <= 1, "in [0, 1]"),
            ("stop_signal", stop_signal, stop_signal in ("eval_acc", "running_train_acc"),
             "'eval_acc' or 'running_train_acc'"),
            ("selection", selection, selection in ("accuracy_drop", "fixed"), "'accuracy_drop' or 'fixed'"),
            finite=True,
        )
        if not bn_layers(self.net):
            raise ValueError(f"RNP masks BatchNorm2d neurons; {type(self.net).__name__} has none")
        self.masks: dict[str, Tensor] = {}  # BN layer name -> mask, created on the device
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
        for _ in range(h.unlearn_epochs):
            _, correct = self.finetune_epoch(model, optimizer, x, y, ascent=True)  # correct: the running accuracy
            scheduler.step()
            if h.stop_signal == "eval_acc":
                accuracies.append(self.accuracy(x, y, net=model))
            else:
                accuracies.append(float(correct) / max(1, len(y)))
            if accuracies[-1] <= h.unlearn_stop_acc:
                break
        self._clip_masks()
        net.requires_grad_(False)
        self.reference("recovery", MaskedNet(net, self.masks).train())  # the unlearned copy
        self.history = {"unlearn": {"epochs": len(accuracies), "stop_signal": h.stop_signal, "dm_acc": accuracies,
                                    "reached_stop_acc": bool(accuracies) and accuracies[-1] <= h.unlearn_stop_acc}}

    # -- 2. recover ----------------------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        self._init_masks()  # runs after the module moved to its device, before on_fit_start
        h = self.hparams
        return torch.optim.SGD(list(self.masks.values()), lr=h.recover_lr, momentum=h.recover_momentum)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        model = self.references["recovery"]
        model.train()
        loss = F.cross_entropy(self.classify(self.augment(x), model), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return self.hparams.recover_loss_weight * loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._clip_masks()

    # -- 3. prune the original weights -------------------------------------------------------------------------
    def finish(self) -> None:
        h = self.hparams
        self.references.clear()
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
