"""BCU: backdoor cleansing with unlabelled data (Pang, Sun, Ling, Chen, CVPR 2023).

A student distilled from the backdoored teacher on clean images (which never carry the trigger) learns the
teacher's clean behaviour but has no signal to learn the backdoor; starting the student from the teacher's
weights keeps distillation cheap, and re-initialising a growing share of the deeper weights (where backdoor
features live) stops the student from simply inheriting the backdoor. Labels are never read.

1. Re-initialise (`prepare`, after the "before" measurement): the frozen teacher is `self.frozen_copy()`; in the
   student (`self.net`) every element of each Conv2d / Linear weight and bias is independently replaced, with its
   layer's probability, by the same element of a freshly initialised network of the same architecture (the
   backbone's own init). BatchNorm is untouched. Probabilities per module-name prefix, the longest matching
   prefix wins, every conv / linear must be covered (`reinit[<backbone>]`, all five in configs/defense/bcu.yaml).
   The authors' ResNet-18: stem 0.01, layer1 0.01, layer2 0.03, layer3 0.09, layer4 0.27, fc 0.10 (our
   PreActResNet18 names: conv1, layer1..4, linear). The other backbones are not in the paper; we split their
   feature extractors into the same four depth stages by resolution (stem / x1 / x3 / x9 / x27 growth) with
   the classifier at 0.10 -- see the YAML. The mask and the fresh weights come from `seed` (CPU generator:
   the same student on any device).
2. Distil (Lightning's loop, `trainer.max_epochs` = 100): KL(softmax(t / T) || softmax(s / T)), batch mean, t the
   frozen teacher's logits (eval mode), s the student's (train mode), on augmented D_m images (crop + flip
   where the dataset allows), labels ignored; T rises linearly per epoch, T_e = T_0 + (T_1 - T_0)(e + 1) / E
   for epochs e = 0..E-1 (the authors' 1 + 3(e + 1)/E: 1.03 -> 4 at E = 100). SGD lr 0.01, momentum 0.9,
   wd 5e-4, cosine over the run (T_max = max_epochs, stepped per epoch: the authors' T_max = 100 at 100
   epochs), batch 256.

Differences from the authors' code (luluppang/BCU, defense/ft/distillation_dropout_increase.py), and why:
- They pick the BN parameters to skip by name ("bn", "shortcut.1"); we select Conv2d / Linear modules by type,
  so every architecture works and no norm layer is touched by a naming accident.
- Their loss has no T^2 factor; neither has ours (so the gradient shrinks as T grows, as theirs does).
- They distil on a clean held-out split with labels loaded but unused; we use D_m's images (any unlabelled
  image set would do: the method never reads a label).
- Their per-epoch test evaluations and "best" bookkeeping (test-set selection) are dropped.

Cost (2 CPU cores shared with other jobs, load ~10; SmallCNN width 32 of configs/quickstart.yaml on digits,
SPC 10 = 100 images, full defaults: 100 epochs of one batch): 95.9 s for the method, 126 s wall for the whole
process. There: ACC 0.986 -> 0.972, ASR 0.960 -> 0.923, RA 0.040 -> 0.071 (the re-initialisation left the
student agreeing with the teacher on 99% of D_m: on so small a network and set BCU barely moves the backdoor).
Per step: one teacher forward plus one student forward-backward; the re-initialisation is one pass over the
weights (plus building one fresh network).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.backbones import build_backbone
from lightning_modules.defenses.base import Defense
from lightning_modules.defenses.hooks import for_backbone
from lightning_modules.optim import Schedule, sgd_with_schedule

# Per backbone class name: {module-name prefix: re-initialisation probability} (longest prefix wins).
BCU_REINIT: dict[str, dict[str, float]] = {
    "PreActResNet18": {"conv1": 0.01, "layer1": 0.01, "layer2": 0.03, "layer3": 0.09, "layer4": 0.27,
                       "linear": 0.10},
    "VGG19BN": {**{f"features.{i}": 0.01 for i in (0, 3)}, **{f"features.{i}": 0.03 for i in (7, 10)},
                **{f"features.{i}": 0.09 for i in (14, 17, 20, 23)},
                **{f"features.{i}": 0.27 for i in (27, 30, 33, 36, 40, 43, 46, 49)}, "classifier": 0.10},
    "EfficientNetB3": {**{f"features.{i}": 0.01 for i in (0, 1, 2)}, "features.3": 0.03,
                       **{f"features.{i}": 0.09 for i in (4, 5)}, **{f"features.{i}": 0.27 for i in (6, 7, 8)},
                       "classifier": 0.10},
    "MobileNetV3Large": {**{f"features.{i}": 0.01 for i in range(0, 4)}, **{f"features.{i}": 0.03 for i in range(4, 7)},
                         **{f"features.{i}": 0.09 for i in range(7, 13)},
                         **{f"features.{i}": 0.27 for i in range(13, 17)}, "classifier": 0.10},
    "SmallCNN": {"features.0": 0.01, "features.3": 0.01, "features.7": 0.03, "features.10": 0.09,
                 "features.14": 0.27, "linear": 0.10},
}


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
        reinit: per backbone class name, {module-name prefix: probability that each weight element of the
            Conv2d / Linear modules under it is re-initialised}; every conv / linear must be covered (the longest
            prefix wins). None: `BCU_REINIT`.
        seed: seed of the re-initialisation (the mask and the fresh weights).
        temperature_start, temperature_end: the temperature rises linearly per epoch, ending at temperature_end.
        lr, momentum, weight_decay, schedule: SGD of the student (cosine over the run by default).
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    def __init__(
        self,
        backdoored: str,
        reinit: dict[str, dict[str, float]] | None = None,
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
        checks = {"temperature_start": temperature_start > 0, "temperature_end": temperature_end > 0,
                  "lr": lr > 0, "momentum": 0 <= momentum < 1, "weight_decay": weight_decay >= 0}
        bad = [k for k, ok in checks.items() if not ok or not math.isfinite(self.hparams[k])]
        if bad:
            raise ValueError(f"BCU: invalid {', '.join(f'{k}={self.hparams[k]}' for k in bad)}; expected temperatures "
                             f"and lr > 0, momentum in [0, 1), weight_decay >= 0")
        config = "configs/defense/bcu.yaml"
        probs = for_backbone(BCU_REINIT if reinit is None else reinit, self.backdoor_record, "reinit", config)
        self.probs = reinit_layers(self.net, dict(probs), config)
        self._work: dict[str, nn.Module] = {}  # the teacher: not a submodule, so never checkpointed
        self._sums: dict[str, Tensor] = {}
        self._temperature = temperature_start
        self.history: dict[str, Any] = {"epochs": []}

    def prepare(self) -> None:
        teacher = self._work["teacher"] = self.frozen_copy()
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
        self._sums = {}

    def distillation_loss(self, x: Tensor) -> Tensor:
        """KL(teacher || student) at the epoch's temperature on images x (already augmented), batch mean."""
        t = self._temperature
        with torch.no_grad():
            target = F.log_softmax(self.classify(x, self._work["teacher"]).float() / t, 1)
        return F.kl_div(F.log_softmax(self(x).float() / t, 1), target, reduction="batchmean", log_target=True)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x = batch[0]  # the label is never read
        loss = self.distillation_loss(self.augment(x))
        self._sums["kl"] = self._sums.get("kl", 0) + loss.detach() * len(x)
        self._sums["n"] = self._sums.get("n", 0) + len(x)
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def on_train_epoch_end(self) -> None:
        n = self._sums.get("n", 0)
        self.history["epochs"].append({"epoch": self.current_epoch, "temperature": self._temperature,
                                       "kl": float(self._sums.get("kl", 0)) / max(1, n)})

    def finish(self) -> None:
        x = self.mitigation_data("train")[0]
        self.history["dm_agreement_after"] = self.agreement(x, self._work["teacher"])
        self._work.clear()

    def info(self) -> dict[str, Any]:
        return {"reinit": self.probs, **self.history}
