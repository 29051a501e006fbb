"""BCU: backdoor cleansing with unlabelled data (Pang, Sun, Ling, Chen, "Backdoor Cleansing with Unlabeled Data",
CVPR 2023). Not in the survey.

`prepare` re-initialises a share of every Conv2d / Linear weight of the student (probabilities per layer from the
backbone's `layer_roles.reinit`, core/backbones/, or `reinit` in the config; seeded CPU generator), then the
student is distilled from the frozen backdoored teacher on augmented D_m images with a rising temperature.
Labels are never read.
Differs from the authors' code (luluppang/BCU; details: docs/fidelity.md, "BCU"): layers chosen by module type,
not by name; D_m images instead of a held-out split; no per-epoch test evaluation.
Defaults: configs/defense/bcu.yaml (100 epochs, T 1 -> 4, SGD 0.01, cosine over the run).
Cost: 1 teacher fwd + 1 student fwd + 1 bwd per D_m sample per epoch, plus one pass over the weights;
measured: benchmarks/README.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.backbones import build_backbone
from core.optim import Schedule, sgd_with_schedule
from lightning_modules.defenses.base import Defense
from lightning_modules.defenses.hooks import layer_setting


def reinit_layers(net: nn.Module, probs: dict[str, float], config: str = "the config") -> dict[str, float]:
    """Each Conv2d / Linear module of `net` -> the probability of its longest matching prefix in `probs`."""
    layers = [name for name, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    bad = {k: v for k, v in probs.items() if not (isinstance(v, (int, float)) and 0 <= v <= 1)}
    if bad:
        raise ValueError(f"BCU: re-initialisation probabilities must lie in [0, 1], got {bad}; fix reinit in {config}")
    resolved, used = {}, set()
    for name in layers:
        keys = [k for k in probs if name == k or name.startswith(k + ".")]
        if keys:
            key = max(keys, key=len)
            resolved[name] = float(probs[key])
            used.add(key)
    missing = [n for n in layers if n not in resolved]
    unused = [k for k in probs if k not in used]
    if missing or unused:
        raise ValueError(
            f"BCU: reinit for {type(net).__name__} must cover every Conv2d / Linear by a module-name prefix and name "
            f"only existing ones; uncovered: {missing[:8]}{' ...' if len(missing) > 8 else ''}, matching nothing: "
            f"{unused}; fix reinit in {config}")
    return resolved


@torch.no_grad()
def reinit_weights(
    net: nn.Module, fresh: nn.Module, probs: dict[str, float], generator: torch.Generator
) -> dict[str, float]:
    """Replace each element of every weight / bias of the modules in `probs` by `fresh`'s, with that module's
    probability (independent Bernoulli draws from `generator`, a CPU one); returns the realised fraction per
    module."""
    modules, new = dict(net.named_modules()), dict(fresh.named_modules())
    fractions = {}
    for name, p in probs.items():
        replaced, total = 0, 0
        for pname, param in modules[name].named_parameters(recurse=False):
            mask = torch.rand(param.shape, generator=generator) < p
            source = getattr(new[name], pname).detach().to(param.device, param.dtype)
            param.copy_(torch.where(mask.to(param.device), source, param))
            replaced, total = replaced + int(mask.sum()), total + mask.numel()
        fractions[name] = replaced / max(1, total)
    return fractions


def temperature(epoch: int, epochs: int, start: float = 1.0, end: float = 4.0) -> float:
    """The distillation temperature of epoch `epoch` (0-based) of `epochs`: linear, reaching `end` at the last."""
    return start + (end - start) * (epoch + 1) / max(1, epochs)


class BCU(Defense):
    """Args:
        reinit: {module-name prefix: probability that each weight element of the Conv2d / Linear modules under it
            is re-initialised} (or a table of them by backbone class name); every conv / linear must be covered
            (the longest prefix wins). None: the backbone's `layer_roles.reinit`.
        seed: seed of the re-initialisation (the mask and the fresh weights).
        temperature_start, temperature_end: the temperature rises linearly per epoch, ending at temperature_end.
        lr, momentum, weight_decay, schedule: SGD of the student (cosine over the run by default).
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    family = "fine-tuning"
    # smoke_args: re-initialisation, then two epochs (two temperatures)
    smoke_args = ["--trainer.max_epochs", "2"]

    def __init__(
        self,
        backdoored: str,
        reinit: dict[str, float] | dict[str, dict[str, float]] | None = None,
        seed: int = 0,
        temperature_start: float = 1.0,
        temperature_end: float = 4.0,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        schedule: Schedule = "cosine",
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        self.check(
            ("temperature_start", temperature_start, temperature_start > 0, "> 0"),
            ("temperature_end", temperature_end, temperature_end > 0, "> 0"), ("lr", lr, lr > 0, "> 0"),
            ("momentum", momentum, 0 <= momentum < 1, "in [0, 1)"),
            ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
            finite=True,
        )
        config = "configs/defense/bcu.yaml"
        probs = layer_setting(self.net, reinit, lambda r: r.reinit, "reinit", config)
        self.probs = reinit_layers(self.net, dict(probs), config)
        self._temperature = temperature_start
        self.history: dict[str, Any] = {"epochs": []}

    def prepare(self) -> None:
        teacher = self.reference("teacher", self.frozen_copy())
        with torch.random.fork_rng(devices=[]):  # one seed drives the fresh weights and then the mask
            torch.manual_seed(self.hparams.seed)
            fresh = build_backbone(self.backdoor_record["backbone"], self.spec.num_classes)
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        fractions = reinit_weights(self.net, fresh, self.probs, generator)
        x = self.mitigation_data("train")[0]
        self.history |= {
            "reinit_fraction": fractions,
            "dm_agreement_after_reinit": self.agreement(x, teacher),
        }

    @torch.no_grad()
    def agreement(self, x: Tensor, teacher: nn.Module, batch_size: int = 512) -> float:
        """Fraction of images on which the student (eval mode) predicts the teacher's class: needs no label."""
        was_training = self.net.training
        self.net.eval()
        same = torch.zeros((), device=x.device)
        with self.autocast():
            for xb, _ in self.batches(x, x, batch_size):
                same += (self(xb).argmax(1) == self.classify(xb, teacher).argmax(1)).sum()
        self.net.train(was_training)
        return float(same) / max(1, len(x))

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        return sgd_with_schedule(self.net.parameters(), self.trainer, h.lr, h.momentum, h.weight_decay,
                                 schedule=h.schedule)

    def on_train_epoch_start(self) -> None:
        h, trainer = self.hparams, self.trainer
        epochs = trainer.max_epochs
        if epochs is None or epochs < 1:  # a run bounded by max_steps
            epochs = math.ceil(trainer.max_steps / max(1, trainer.num_training_batches))
        self._temperature = temperature(self.current_epoch, epochs, h.temperature_start, h.temperature_end)

    def distillation_loss(self, x: Tensor) -> Tensor:
        """KL(teacher || student) at the epoch's temperature on images x (already augmented), batch mean."""
        t = self._temperature
        with torch.no_grad():
            target = F.log_softmax(self.classify(x, self.references["teacher"]).float() / t, 1)
        return F.kl_div(F.log_softmax(self(x).float() / t, 1), target, reduction="batchmean", log_target=True)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x = batch[0]  # the label is never read
        loss = self.distillation_loss(self.augment(x))
        self.track(len(x), kl=loss)
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.history["epochs"].append({"epoch": self.current_epoch, "temperature": self._temperature,
                                       "kl": self.epoch_means().get("kl", 0.0)})

    def finish(self) -> None:
        x = self.mitigation_data("train")[0]
        self.history["dm_agreement_after"] = self.agreement(x, self.references["teacher"])
        self.references.clear()

    def info(self) -> dict[str, Any]:
        return {"reinit": self.probs, **self.history}
