"""FST: feature shift tuning (Min, Qin, Shen, Cheng, "Towards Stable Backdoor Purification through Feature Shift
Tuning", NeurIPS 2023).

At low poisoning ratios backdoor and clean features are entangled, and plain fine-tuning stays near the
backdoored solution. FST pushes the features away from it by re-initialising the linear classifier omega and
tuning the whole network while steering omega away from the original omega_hat:
    min  CE(D_m) + alpha * sum_l <omega_l, omega_hat_l>,   ||omega_l||_2 = ||omega_hat_l||_2 for every layer l,
the norm constraint enforced by rescaling each omega_l after every optimiser step (Frobenius norm of the whole
weight matrix; biases are re-initialised too but are free: no inner product, no rescale).
The classifier layers (`classifier_layers[<backbone>]`, all nn.Linear, re-initialised in place with the default
nn.Linear init): PreActResNet18 linear; VGG19BN classifier.0, .3, .6; MobileNetV3Large classifier.0, .3;
EfficientNetB3 classifier.1; SmallCNN linear. The re-initialisation happens in `prepare()`, after the
"before" measurement; the defended model has the backbone's own architecture.

Training: all weights, SGD momentum 0.9, no weight decay, cosine over the run (T_max = max_epochs, stepped per
epoch), batch 256, D_m with the training augmentation. CIFAR-10 (configs/defense/fst.yaml): 10 epochs, lr 0.01,
alpha 0.2; GTSRB (configs/defense/gtsrb/fst.yaml): 15 epochs, lr 0.01, alpha 0.1; Tiny-ImageNet
(configs/defense/tiny_imagenet/fst.yaml): 15 epochs, lr 0.001, alpha 0.001 (the survey's fork).

Differences from the fork: none in the method (it replaces the layers with fresh nn.Linear modules; we reset
the existing ones in place, the same init, so the optimiser and checkpoint keep their parameters); its per-epoch
test-set evaluation is dropped (never used for a choice there either).

Cost (2 CPU cores shared with other jobs, load ~10; SmallCNN width 32 of configs/quickstart.yaml on digits, SPC 10
= 100 images, full defaults = 10 epochs of one batch): the method 15.5 s wall; the whole `train.py fit` process
74 s wall, 10.5 s CPU. A step costs a fine-tuning step (1 forward + 1 backward) plus the classifier rescale; on
VGG-19-BN (1e8 classifier weights) the SGD update itself dominates.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.defenses.base import Defense
from lightning_modules.defenses.hooks import for_backbone
from lightning_modules.optim import sgd_with_schedule

# The linear layers re-initialised per backbone class (the survey's fork; SmallCNN: its only Linear).
CLASSIFIER_LAYERS: dict[str, list[str]] = {
    "PreActResNet18": ["linear"],
    "VGG19BN": ["classifier.0", "classifier.3", "classifier.6"],
    "EfficientNetB3": ["classifier.1"],
    "MobileNetV3Large": ["classifier.0", "classifier.3"],
    "SmallCNN": ["linear"],
}


def norm64(w: Tensor) -> Tensor:
    """The L2 (Frobenius) norm in float64 from float32 row norms: one float32 sum over VGG's 1e8 weights drifts by
    ~5e-5 (relative), and a float64 copy of them would cost 0.8 GB."""
    return torch.linalg.vector_norm(torch.linalg.vector_norm(w.flatten(1), dim=1).double())


class FST(Defense):
    """Args:
        classifier_layers: per backbone class name, the nn.Linear modules to re-initialise and steer away from
            their original weights; None: `CLASSIFIER_LAYERS`.
        alpha: weight of the inner product <omega, omega_hat> in the loss.
        lr, momentum, weight_decay: SGD over all weights (cosine over the run, stepped per epoch).
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    def __init__(
        self,
        backdoored: str,
        classifier_layers: dict[str, list[str]] | None = None,
        alpha: float = 0.2,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        for name, value, ok, rule in (
            ("alpha", alpha, alpha >= 0, ">= 0"), ("lr", lr, lr > 0, "> 0"),
            ("momentum", momentum, 0 <= momentum < 1, "in [0, 1)"),
            ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
        ):
            if not ok or not math.isfinite(value):
                raise ValueError(f"FST: {name}={value!r}, expected {rule}; fix model.init_args.{name}")
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        names = for_backbone(CLASSIFIER_LAYERS if classifier_layers is None else classifier_layers,
                             self.backdoor_record, "classifier layers", "configs/defense/fst.yaml")
        if isinstance(names, str):
            names = [names]
        modules = dict(self.net.named_modules())
        bad = {n: "no such module" if n not in modules else f"a {type(modules[n]).__name__}"
               for n in names if not isinstance(modules.get(n), nn.Linear)}
        if not names or bad:
            raise ValueError(f"FST re-initialises nn.Linear layers; for {type(self.net).__name__} got {list(names)} "
                             f"({bad or 'empty'}); fix classifier_layers in configs/defense/fst.yaml")
        self.layer_names: list[str] = list(names)
        self.original: list[Tensor] = []  # omega_hat per layer, set in prepare() (not part of the defended model)
        self.original_norms: list[Tensor] = []
        self.history: list[dict[str, float]] = []
        self._sums: dict[str, Tensor] = {}
        self._dm_acc: float | None = None

    def classifier(self) -> list[nn.Linear]:
        modules = dict(self.net.named_modules())
        return [modules[n] for n in self.layer_names]

    @torch.no_grad()
    def prepare(self) -> None:
        """Remember omega_hat, then re-initialise the classifier layers in place (default nn.Linear init)."""
        layers = self.classifier()
        self.original = [layer.weight.detach().clone() for layer in layers]
        self.original_norms = [norm64(w) for w in self.original]
        for layer in layers:
            layer.reset_parameters()

    @torch.no_grad()
    def rescale(self) -> None:
        """||omega_l|| <- ||omega_hat_l|| for every classifier layer (the FST norm constraint)."""
        for layer, norm in zip(self.classifier(), self.original_norms):
            layer.weight.mul_((norm / norm64(layer.weight)).to(layer.weight.dtype))

    def inner_product(self) -> Tensor:
        return sum((layer.weight * w).sum() for layer, w in zip(self.classifier(), self.original))

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        return sgd_with_schedule(self.net.parameters(), self.trainer, h.lr, h.momentum, h.weight_decay)

    def on_train_epoch_start(self) -> None:
        self._sums = {}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        ce = F.cross_entropy(self(self.augment(x)).float(), y)
        inner = self.inner_product()
        loss = ce + self.hparams.alpha * inner
        for k, v in {"loss": loss, "ce": ce, "inner_product": inner}.items():  # epoch sums, no host sync
            self._sums[k] = self._sums.get(k, 0) + v.detach() * len(y)
        self._sums["n"] = self._sums.get("n", 0) + len(y)
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.rescale()

    def on_train_epoch_end(self) -> None:
        n = self._sums.pop("n", 0)
        self.history.append({"epoch": self.current_epoch, **{k: float(v) / max(1, n) for k, v in self._sums.items()}})

    def finish(self) -> None:
        self._dm_acc = self.accuracy(*self.mitigation_data("train"))

    def info(self) -> dict[str, Any]:
        layers = self.classifier()
        cosine = [float(F.cosine_similarity(l.weight.detach().flatten(), w.flatten(), dim=0))
                  for l, w in zip(layers, self.original)] if self.original else None
        return {"layers": self.layer_names,
                "original_norms": [float(n) for n in self.original_norms],
                "final_norms": [float(norm64(l.weight.detach())) for l in layers],
                "cosine_to_original": cosine,
                "dm_acc_after": self._dm_acc,
                "epochs": self.history}
