"""FP: Fine-Pruning (Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep
Neural Networks", RAID 2018).

Ranks the classifier's input features (`layer_roles.head[0]`, core/backbones/; `layers` in the config) by mean
activation on D_m minus D_v, zeroes their Linear columns in ascending order until D_v accuracy drops by
max_acc_drop, then fine-tunes with the mask kept (persistent buffer `pruned`; resuming is not supported).
Differs from the reference (details: docs/fidelity.md, "FP"):
- the stop reads un-augmented D_v, not test accuracy; a drop, not a change either way (`symmetric_drop: true`);
- keeps the last step within the limit and prunes ceil(1%) per step (two bugs there);
- pruning steps evaluate only the classifier tail on cached D_v features (same results, less cost).
Defaults: configs/defense/fp.yaml (D_v: data.val_fraction 0.1, datamodules/splits.py).
Cost: 1 fwd per D_m sample for the ranking, then 1 fwd + 1 bwd per sample per fine-tuning epoch (as FT);
measured: benchmarks/README.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from core.optim import Schedule, sgd_with_schedule
from lightning_modules.defenses.base import Defense
from lightning_modules.defenses.hooks import capture, layer_setting

LAYERS = "configs/defense/fp.yaml (model.init_args.layers)"


class FP(Defense):
    """Args:
        layers: the classifier Linear whose input features are ranked and pruned (or a table of them by backbone
            class name); None: the first Linear of the backbone's classifier head (`layer_roles.head[0]`).
        prune_step: fraction of the features pruned per step (ceil), in (0, 1].
        max_acc_drop: stop once D_v accuracy has dropped by this fraction of the unpruned model's, in (0, 1).
        symmetric_drop: stop on a change of max_acc_drop either way, a rise included (the survey's fork).
        lr, momentum, weight_decay, schedule: SGD of the fine-tuning (cosine over the run by default).
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    family = "pruning"
    # smoke_args: pruning, then one fine-tuning epoch with the mask kept
    smoke_args = ["--trainer.max_epochs", "1"]

    def __init__(
        self,
        backdoored: str,
        layers: str | dict[str, str] | None = None,
        prune_step: float = 0.01,
        max_acc_drop: float = 0.1,
        symmetric_drop: bool = False,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        schedule: Schedule = "cosine",
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        self.check(
            ("prune_step", prune_step, 0.0 < prune_step <= 1.0, "in (0, 1] (fraction of features pruned per step)"),
            ("max_acc_drop", max_acc_drop, 0.0 < max_acc_drop < 1.0, "in (0, 1) (relative D_v accuracy drop)"),
            ("lr", lr, lr > 0, "> 0"), ("momentum", momentum, 0.0 <= momentum < 1.0, "in [0, 1)"),
            ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
        )
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        self.layer = str(layer_setting(self.net, layers, lambda r: r.head[0], "FP layer (the first classifier Linear)",
                                       LAYERS))
        module = dict(self.net.named_modules()).get(self.layer)
        if not isinstance(module, nn.Linear):
            found = "no such module" if module is None else f"a {type(module).__name__}"
            raise ValueError(f"FP layer {self.layer!r} of {type(self.net).__name__} must be an nn.Linear, found "
                             f"{found}; fix it in {LAYERS}")
        self.register_buffer("pruned", torch.zeros(module.in_features, dtype=torch.bool))
        self.facts: dict[str, Any] = {}

    @property
    def linear(self) -> nn.Linear:
        return self.net.get_submodule(self.layer)

    # -- pruning ------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        h = self.hparams
        x, y = self.mitigation_data("train")
        xv, yv = self.mitigation_data("val")
        if len(yv) == 0:
            raise ValueError("FP chooses how much to prune on D_v, which is empty: set data.val_fraction > 0 "
                             "(0.1 in configs/defense/fp.yaml)")
        batch = self.batch_size
        was_training = self.net.training
        self.net.eval()
        with torch.no_grad(), self.autocast():
            activation = torch.zeros(self.linear.in_features, device=self.device)
            for xb, _ in self.batches(x, y, batch, augment=True):
                activation += self.features(xb).float().sum(0)
            order = torch.argsort(activation / len(x), stable=True)  # ascending mean activation
            val_accuracy = self.tail_evaluator(xv, yv, batch)
            acc0 = val_accuracy(None)
            per_step = math.ceil(h.prune_step * len(order))
            counts = list(range(per_step, len(order), per_step)) + [len(order)]
            accuracies: list[float] = []
            chosen, chosen_acc, failed = 0, acc0, None
            for count in counts:
                keep = torch.ones_like(activation)
                keep[order[:count]] = 0
                accuracies.append(val_accuracy(keep))
                change = acc0 - accuracies[-1]
                if (abs(change) if h.symmetric_drop else change) >= h.max_acc_drop * acc0 - 1e-12:
                    failed = count
                    break
                chosen, chosen_acc = count, accuracies[-1]
        self.net.train(was_training)
        facts = {
            "layer": self.layer, "features": len(order), "per_step": per_step, "val_augmented": False,
            "stop_rule": "change either way" if h.symmetric_drop else "drop",
            "val_acc_unpruned": acc0, "val_acc_steps": accuracies, "pruned_per_step": counts[: len(accuracies)],
            "pruned": chosen, "val_acc_pruned": chosen_acc, "first_failing_step_pruned": failed,
            "pruned_features": order[:chosen].tolist(),
        }
        # one choice for all processes (their augmented ranking passes could differ)
        self.facts |= self.trainer.strategy.broadcast(facts, src=0)
        self.pruned.zero_()
        self.pruned[torch.as_tensor(self.facts["pruned_features"], dtype=torch.long, device=self.device)] = True
        self.apply_mask()

    def features(self, x: Tensor) -> Tensor:
        """The flattened input of the pruned Linear for pixels x."""
        with capture(self.net, [self.layer], what="input") as store:
            self.classify(x, self.net)
        return store[self.layer].flatten(1)

    def tail_evaluator(self, xv: Tensor, yv: Tensor, batch: int) -> Callable[[Tensor | None], float]:
        """A function keep-mask (or None) -> D_v accuracy with the Linear's input features masked. Evaluates the
        Linear and what follows it in its nn.Sequential on features cached once, if that reproduces the full
        network's logits; otherwise masks the features with a hook in full forward passes."""
        feats, logits = [], []
        for xb, _ in self.batches(xv, yv, batch):
            with capture(self.net, [self.layer], what="input") as store:
                logits.append(self.classify(xb, self.net))
            feats.append(store[self.layer].flatten(1))
        feats, logits = torch.cat(feats), torch.cat(logits)
        tail = self.tail()
        tail_logits = tail(feats)
        exact = tail_logits.shape == logits.shape and torch.allclose(
            tail_logits.float(), logits.float(), rtol=1e-2, atol=1e-2 * float(logits.abs().max()) + 1e-6)
        self.facts["tail_evaluation"] = exact

        def accuracy(keep: Tensor | None) -> float:
            if exact:
                out = tail(feats if keep is None else feats * keep.to(feats.dtype))
                return float((out.argmax(1) == yv).sum()) / len(yv)
            if keep is None:
                return self.accuracy(xv, yv, net=self.net, batch_size=batch)
            mask = keep.view(1, -1)
            handle = self.linear.register_forward_pre_hook(lambda m, i: (i[0] * mask.to(i[0].dtype),))
            try:
                return self.accuracy(xv, yv, net=self.net, batch_size=batch)
            finally:
                handle.remove()

        return accuracy

    def tail(self) -> nn.Module:
        """The Linear and the modules after it in its parent nn.Sequential (or the Linear alone)."""
        parent_name, _, child = self.layer.rpartition(".")
        parent = self.net.get_submodule(parent_name) if parent_name else self.net
        if isinstance(parent, nn.Sequential):
            names = [n for n, _ in parent.named_children()]
            return nn.Sequential(*list(parent.children())[names.index(child):])
        return self.linear

    @torch.no_grad()
    def apply_mask(self) -> None:
        self.linear.weight.mul_((~self.pruned).to(self.linear.weight.dtype))

    # -- fine-tuning with the mask kept ----------------------------------------------------------------------
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grad = self.linear.weight.grad
        if grad is not None:
            grad.mul_((~self.pruned).to(grad.dtype))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.apply_mask()

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        return sgd_with_schedule(self.net.parameters(), self.trainer, h.lr, h.momentum, h.weight_decay,
                                 schedule=h.schedule)

    def info(self) -> dict[str, Any]:
        columns = self.linear.weight[:, self.pruned]
        return {**self.facts, "pruned_columns_zero": bool((columns == 0).all())}
