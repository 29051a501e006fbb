"""NC: Neural Cleanse (Wang, Yao, Shan, Li, Viswanath, Zheng, Zhao, "Neural Cleanse: Identifying and Mitigating
Backdoor Attacks in Neural Networks", IEEE S&P 2019).

Reverses a mask and pattern per class (all classes batched, _nc_reverse.py), flags classes with anomaly index > 2
below the median L1, then `mitigation: unlearn` (the fork: fine-tune on D_m with its last 20% stamped, true labels)
or `prune` (the paper: zero output-Linear columns, `layer_roles.classifier`). Nothing flagged: model unchanged.
Pitfall: at the fork's batch 256, SPC 10 is one Adam step per search epoch and the early stop can hide the target;
`search_batch_size` 2..10 gives more steps.
Differs from the fork (details: docs/fidelity.md, "NC"): no crash when a class is flagged under SPC; exact float
triggers; statistical median; last-batch masks; the 20% in training-index order.
Defaults: configs/defense/nc.yaml.
Cost: search K fwd + K bwd per D_m sample per epoch (K classes); unlearning as FT; measured: benchmarks/README.md.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from core.optim import Schedule, sgd_with_schedule
from datamodules.transforms import to_unit
from lightning_modules.defenses._nc_reverse import (
    SearchSettings,
    flag_low_outliers,
    reverse_engineer,
    stamp,
)
from lightning_modules.defenses.base import Defense
from lightning_modules.defenses.hooks import capture, layer_setting

LAYERS = "configs/defense/nc.yaml (model.init_args.prune_layers)"


def image_keys(x: Tensor) -> Tensor:
    """An exact int64 hash of uint8 images: pixel values dotted with fixed random 40-bit weights (no overflow)."""
    gen = torch.Generator().manual_seed(0)
    weights = torch.randint(1, 2**40, (x[0].numel(),), generator=gen, dtype=torch.long).to(x.device)
    return (x.flatten(1).long() * weights).sum(1)


class NC(Defense):
    """Args:
        mitigation: unlearn (fine-tune on D_m partly stamped with the flagged triggers, true labels) or prune
            (the original paper's neuron pruning, no fine-tuning).
        search_epochs, search_lr, search_betas: the Adam optimisation of masks and patterns.
        search_batch_size: D_m batch size of the search; None: data.batch_size (the fork).
        init_cost, cost_patience, cost_multiplier: lambda schedule (start; epochs before a change; x up,
            / multiplier^1.5 down).
        success_threshold: attack success (fraction) a mask must reach to be kept.
        early_stop_patience, early_stop_threshold: a class stops after this many epochs without its best L1
            dropping below threshold x the best so far (and once lambda has moved both ways).
        search_augment: feed D_m with the training augmentation to the search (the fork does).
        class_chunk: classes per forward pass in the search (memory only; None: all).
        anomaly_threshold: flag classes whose L1 lies below the median with an anomaly index above this.
        unlearn_fraction: share of D_m (its last part) stamped with each flagged trigger.
        lr, momentum, weight_decay, schedule: SGD of the unlearning fine-tuning.
        cosine_t_max: epochs of the cosine schedule; None: the run's max_epochs (the fork's 100 whatever the length
            is `100`).
        prune_layers: the output Linear whose input neurons are pruned (or a table of them by backbone class
            name); None: the backbone's `layer_roles.classifier`.
        prune_step: fraction of those neurons pruned per step (ceil), in (0, 1].
        prune_stop_asr: prune until every reversed trigger's attack success on D_m is at most this.
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    family = "fine-tuning"
    measure_dm_acc = True
    # smoke_args: a 1-epoch search of 2 steps and a tiny anomaly threshold flag classes: the unlearning epoch runs
    smoke_args = ["--trainer.max_epochs", "1", "--model.search_epochs", "1", "--model.search_batch_size", "50",
                  "--model.anomaly_threshold", "1e-6"]

    def __init__(
        self,
        backdoored: str,
        mitigation: Literal["unlearn", "prune"] = "unlearn",
        search_epochs: int = 80,
        search_lr: float = 0.1,
        search_betas: tuple[float, float] = (0.5, 0.9),
        search_batch_size: int | None = None,
        init_cost: float = 1e-3,
        cost_patience: int = 5,
        cost_multiplier: float = 2.0,
        success_threshold: float = 0.98,
        early_stop_patience: int = 25,
        early_stop_threshold: float = 0.99,
        search_augment: bool = True,
        class_chunk: int | None = None,
        anomaly_threshold: float = 2.0,
        unlearn_fraction: float = 0.2,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        schedule: Schedule = "cosine",
        cosine_t_max: int | None = None,
        prune_layers: str | dict[str, str] | None = None,
        prune_step: float = 0.01,
        prune_stop_asr: float = 0.1,
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        self.check(
            ("mitigation", mitigation, mitigation in ("unlearn", "prune"), "'unlearn' or 'prune'"),
            ("search_epochs", search_epochs, search_epochs >= 1, ">= 1"),
            ("search_lr", search_lr, search_lr > 0, "> 0"),
            ("search_batch_size", search_batch_size, search_batch_size is None or search_batch_size >= 1,
             ">= 1 or null"),
            ("search_betas", search_betas, len(search_betas) == 2 and all(0 <= b < 1 for b in search_betas),
             "two values in [0, 1)"),
            ("init_cost", init_cost, init_cost > 0, "> 0"), ("cost_patience", cost_patience, cost_patience >= 1, ">= 1"),
            ("cost_multiplier", cost_multiplier, cost_multiplier > 1, "> 1"),
            ("success_threshold", success_threshold, 0 < success_threshold <= 1, "in (0, 1]"),
            ("early_stop_patience", early_stop_patience, early_stop_patience >= 1, ">= 1"),
            ("early_stop_threshold", early_stop_threshold, 0 < early_stop_threshold <= 1, "in (0, 1]"),
            ("class_chunk", class_chunk, class_chunk is None or class_chunk >= 1, ">= 1 or null"),
            ("anomaly_threshold", anomaly_threshold, anomaly_threshold > 0, "> 0"),
            ("unlearn_fraction", unlearn_fraction, 0 < unlearn_fraction < 1, "in (0, 1)"),
            ("lr", lr, lr > 0, "> 0"), ("momentum", momentum, 0 <= momentum < 1, "in [0, 1)"),
            ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
            ("cosine_t_max", cosine_t_max, cosine_t_max is None or cosine_t_max >= 1, ">= 1 or null"),
            ("prune_step", prune_step, 0 < prune_step <= 1, "in (0, 1]"),
            ("prune_stop_asr", prune_stop_asr, 0 <= prune_stop_asr <= 1, "in [0, 1]"),
        )
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        self.prune_layer: str | None = None
        if mitigation == "prune":
            self.prune_layer = str(layer_setting(self.net, prune_layers, lambda r: r.classifier,
                                                 "NC prune layer (the output Linear)", LAYERS))
            module = dict(self.net.named_modules()).get(self.prune_layer)
            if not (isinstance(module, nn.Linear) and module.out_features == self.spec.num_classes):
                found = "no such module" if module is None else repr(module)
                raise ValueError(f"NC prune layer {self.prune_layer!r} of {type(self.net).__name__} must be the output "
                                 f"nn.Linear ({self.spec.num_classes} outputs), found {found}; fix it in {LAYERS}")
        k, size, channels = self.spec.num_classes, self.spec.image_size, len(self.spec.mean)
        self.register_buffer("trigger_mask", torch.zeros(k, 1, size, size))
        self.register_buffer("trigger_pattern", torch.zeros(k, channels, size, size))
        self.facts: dict[str, Any] = {}
        self._flagged: list[int] = []
        self._unlearn_keys: Tensor | None = None

    # -- detection ------------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        self.refuse_float16("the trigger search")
        h = self.hparams
        x, y = self.mitigation_data("train")
        start = time.perf_counter()
        triggers = self.search(x)
        triggers = self.trainer.strategy.broadcast(triggers, src=0)  # one set of triggers for all processes
        seconds = time.perf_counter() - start
        self.trigger_mask.copy_(triggers.mask)
        self.trigger_pattern.copy_(triggers.pattern)
        flagged, index, median, mad = flag_low_outliers(triggers.l1, h.anomaly_threshold)
        self._flagged = flagged
        self.facts = {
            "l1_norms": triggers.l1.tolist(), "anomaly_index": index.tolist(), "median_l1": median, "mad": mad,
            "flagged": flagged, "reached_success": triggers.reached.tolist(),
            "search_epochs": triggers.epochs.tolist(), "final_cost": triggers.cost.tolist(),
            "search_seconds": seconds, "dm_acc_before": self.accuracy(x, y),
        }
        if not flagged:
            self.facts["mitigation"] = "none: no class flagged, model returned unchanged"
            rank_zero_info(f"NC: no class flagged (anomaly indices {[round(v, 2) for v in index.tolist()]}); "
                           f"the model is returned unchanged, fine-tuning skipped")
            self.trainer.should_stop = True  # the fit loop then runs no step: weights and BN statistics untouched
            return
        rank_zero_info(f"NC: flagged class(es) {flagged} (L1 {[round(triggers.l1[c].item(), 1) for c in flagged]}, "
                       f"median {median:.1f}); mitigation: {h.mitigation}")
        if h.mitigation == "prune":
            self.facts["mitigation"] = "prune"
            self.facts["prune"] = self.prune(x, y, flagged)
            self.trainer.should_stop = True
            return
        unlearn = max(1, len(x) - int(len(x) * (1 - h.unlearn_fraction)))  # the fork's split: int() of the clean part
        self._unlearn_keys = image_keys(x[len(x) - unlearn:])
        self.facts["mitigation"] = "unlearn"
        self.facts["unlearn"] = {"clean": len(x) - unlearn, "stamped_per_flagged_class": unlearn}

    def search(self, x: Tensor):
        h = self.hparams
        settings = SearchSettings(h.search_epochs, h.search_lr, tuple(h.search_betas), h.init_cost,
                                  h.success_threshold, h.cost_patience, h.cost_multiplier, h.early_stop_patience,
                                  h.early_stop_threshold, h.class_chunk)
        net = self.frozen_copy()  # eval mode: no batch statistics couple the classes
        labels = torch.zeros(len(x), dtype=torch.long, device=x.device)

        def epoch_batches():
            batch = h.search_batch_size or self.batch_size
            for xb, _ in self.batches(x, labels, batch, shuffle=True, augment=h.search_augment):
                yield to_unit(xb)

        with torch.enable_grad(), self.autocast():
            return reverse_engineer(lambda z: self.classify(z, net), epoch_batches, range(self.spec.num_classes),
                                    tuple(self.trigger_pattern.shape[1:]), settings, self.device)

    # -- mitigation: pruning (the original paper) -------------------------------------------------------------------
    @torch.no_grad()
    def prune(self, x: Tensor, y: Tensor, flagged: list[int]) -> dict[str, Any]:
        h, linear = self.hparams, self.net.get_submodule(self.prune_layer)
        was_training = self.net.training
        self.net.eval()
        weight, bias = linear.weight.float(), linear.bias.float() if linear.bias is not None else None
        with torch.autocast(x.device.type, enabled=False):  # a structural check: fp32 whatever the precision
            probe = x[:256]
            logits = self.classify(probe, self.net).float()
            produced = F.linear(self.features(to_unit(probe)).float(), weight, bias)
        with self.autocast():
            clean = self.features(to_unit(x))
            stamped = [self.features(stamp(to_unit(x[y != c]), self.trigger_mask[c], self.trigger_pattern[c]))
                       for c in flagged]
        self.net.train(was_training)
        if not torch.allclose(produced, logits, rtol=1e-3, atol=1e-3 * float(logits.abs().max()) + 1e-6):
            raise ValueError(f"NC prune layer {self.prune_layer!r} does not produce the logits from its input; it must "
                             f"be the output Linear; fix it in {LAYERS}")
        gap = torch.stack([s.mean(0) - clean.mean(0) for s in stamped]).amax(0)
        order = torch.argsort(gap, descending=True, stable=True)
        step = math.ceil(h.prune_step * len(order))
        counts = list(range(0, len(order), step)) + [len(order)]

        def attack_success(keep: Tensor) -> float:
            return max(float((F.linear(s * keep, weight, bias).argmax(1) == c).float().mean())
                       for s, c in zip(stamped, flagged))

        asr: list[float] = []
        for count in counts:
            keep = torch.ones_like(gap)
            keep[order[:count]] = 0
            asr.append(attack_success(keep))
            if asr[-1] <= h.prune_stop_asr:
                break
        chosen = counts[len(asr) - 1] if asr[-1] <= h.prune_stop_asr else counts[min(range(len(asr)), key=asr.__getitem__)]
        linear.weight[:, order[:chosen]] = 0
        return {"layer": self.prune_layer, "neurons": len(order), "per_step": step, "pruned": chosen,
                "stop_reached": asr[-1] <= h.prune_stop_asr, "trigger_asr_steps": asr,
                "pruned_per_step": counts[: len(asr)], "pruned_neurons": order[:chosen].tolist()}

    def features(self, x: Tensor) -> Tensor:
        """The flattened input of the output Linear (the second-to-last layer's neurons) for pixels x."""
        with capture(self.net, [self.prune_layer], what="input") as store:
            self.classify(x, self.net)
        return store[self.prune_layer].flatten(1).float()

    # -- mitigation: unlearning (Lightning's loop) ----------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        if self._unlearn_keys is None:  # nothing to unlearn (the loop is normally stopped before it starts)
            return None
        x, y = batch
        hit = torch.isin(image_keys(x), self._unlearn_keys)
        x = to_unit(x)
        first, *others = self._flagged
        xs = [torch.where(hit.view(-1, 1, 1, 1), stamp(x, self.trigger_mask[first], self.trigger_pattern[first]), x)]
        ys = [y]
        for c in others:  # more flagged classes: one more stamped copy of the unlearning images each
            xs.append(stamp(x[hit], self.trigger_mask[c], self.trigger_pattern[c]))
            ys.append(y[hit])
        return self.cross_entropy_step(torch.cat(xs), torch.cat(ys), augment=True)

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        return sgd_with_schedule(self.net.parameters(), self.trainer, h.lr, h.momentum, h.weight_decay,
                                 schedule=h.schedule, cosine_t_max=h.cosine_t_max)

    def finish(self) -> None:
        self.facts["fine_tune_epochs"] = self.trainer.current_epoch if self._unlearn_keys is not None else 0

    def info(self) -> dict[str, Any]:
        return {**self.facts, "dm_acc_after": self.dm_acc_after}
