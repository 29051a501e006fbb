"""FST: feature shift tuning (Min, Qin, Shen, Cheng, "Towards Stable Backdoor Purification through Feature Shift
Tuning", NeurIPS 2023).

Re-initialises the classifier (`layer_roles.head`, core/backbones/) in `prepare()`, then tunes all weights on
CE(D_m) + alpha * sum_l <omega_l, omega_hat_l>, rescaling each omega_l to its original norm after every step.
Differs from the fork: none in the method; layers are reset in place rather than replaced (docs/fidelity.md).
Defaults: configs/defense/fst.yaml; per dataset configs/defense/{gtsrb,tiny_imagenet}/fst.yaml.
Cost: 1 fwd + 1 bwd per D_m sample per epoch plus the rescale (on VGG-19-BN the SGD update dominates);
measured: benchmarks/README.md.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.optim import sgd_with_schedule
from lightning_modules.defenses.base import Defense
from lightning_modules.defenses.hooks import layer_setting


def norm64(w: Tensor) -> Tensor:
    """The L2 (Frobenius) norm in float64 from float32 row norms: one float32 sum over VGG's 1e8 weights drifts by
    ~5e-5 (relative), and a float64 copy of them would cost 0.8 GB."""
    return torch.linalg.vector_norm(torch.linalg.vector_norm(w.flatten(1), dim=1).double())


class FST(Defense):
    """Args:
        classifier_layers: the nn.Linear modules to re-initialise and steer away from their original weights (or
            a table of them by backbone class name); None: the backbone's `layer_roles.head`.
        alpha: weight of the inner product <omega, omega_hat> in the loss.
        lr, momentum, weight_decay: SGD over all weights (cosine over the run, stepped per epoch).
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    family = "fine-tuning"
    measure_dm_acc = True
    smoke_args = ["--trainer.max_epochs", "2"]

    def __init__(
        self,
        backdoored: str,
        classifier_layers: list[str] | dict[str, list[str]] | None = None,
        alpha: float = 0.2,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        self.check(
            ("alpha", alpha, alpha >= 0, ">= 0"), ("lr", lr, lr > 0, "> 0"),
            ("momentum", momentum, 0 <= momentum < 1, "in [0, 1)"),
            ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
            finite=True,
        )
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        names = layer_setting(self.net, classifier_layers, lambda r: list(r.head), "classifier layers",
                              "configs/defense/fst.yaml")
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

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        ce = F.cross_entropy(self(self.augment(x)).float(), y)
        inner = self.inner_product()
        loss = ce + self.hparams.alpha * inner
        self.track(len(y), loss=loss, ce=ce, inner_product=inner)
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.rescale()

    def on_train_epoch_end(self) -> None:
        self.history.append({"epoch": self.current_epoch, **self.epoch_means()})

    def info(self) -> dict[str, Any]:
        layers = self.classifier()
        cosine = [float(F.cosine_similarity(l.weight.detach().flatten(), w.flatten(), dim=0))
                  for l, w in zip(layers, self.original)] if self.original else None
        return {"layers": self.layer_names,
                "original_norms": [float(n) for n in self.original_norms],
                "final_norms": [float(norm64(l.weight.detach())) for l in layers],
                "cosine_to_original": cosine,
                "dm_acc_after": self.dm_acc_after,
                "epochs": self.history}
