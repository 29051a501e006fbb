"""NAD: neural attention distillation (Li, Lyu, Koren, Lyu, Li, Ma, "Neural Attention Distillation: Erasing
Backdoor Triggers from Deep Neural Networks", ICLR 2021).

`prepare` fine-tunes a teacher copy on D_m; the backdoored model is then trained with CE + beta-weighted MSE
between normalised attention maps (sum |a|^2 over channels) at the backbone's `layer_roles.attention`
(core/backbones/; `layers` in the config), read by forward hooks on one forward pass.
Pitfall: on VGG19BN, EfficientNetB3 and MobileNetV3Large the maps are 1x1 or replicated at 32 px, so NAD is plain
CE fine-tuning there, as in the survey (`info()["attention_active"]` says so).
Differs from the fork (details: docs/fidelity.md, "NAD"): hooks instead of re-running truncated copies in train
mode; float16 refused; under DDP every rank distils from rank 0's teacher.
Defaults: configs/defense/nad.yaml (Tiny-ImageNet batch: configs/defense/tiny_imagenet/nad.yaml).
Cost: teacher 1 fwd + 1 bwd per D_m sample per epoch; student 1 teacher fwd + 1 fwd + 1 bwd;
measured: benchmarks/README.md.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from core.optim import Schedule, sgd_with_schedule
from lightning_modules.defenses.base import Defense
from lightning_modules.defenses.hooks import capture, layer_setting


def attention_map(features: Tensor, p: float = 2.0, eps: float = 1e-6) -> Tensor:
    """(B, C, H, W) -> (B, H*W): sum over channels of |f|^p, divided by its L2 norm over the positions (+ eps)."""
    a = features.float().abs().pow(p).sum(1).flatten(1)
    return a / (a.norm(dim=1, keepdim=True) + eps)


def attention_loss(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """MSE between the two normalised attention maps (mean over batch and positions)."""
    return F.mse_loss(attention_map(student, p), attention_map(teacher, p))


class NAD(Defense):
    """Args:
        layers: {module name: beta}, the modules whose output attention is distilled (or a table of them by
            backbone class name); None: the backbone's `layer_roles.attention`.
        p: exponent of the attention map.
        teacher_epochs: epochs of the teacher's fine-tuning on D_m (0: the teacher is the backdoored model).
        teacher_lr, teacher_momentum, teacher_weight_decay: the teacher's SGD.
        teacher_cosine_t_max: T_max (epochs) of the teacher's cosine schedule (the fork: 100 whatever the length).
        lr, momentum, weight_decay: the student's SGD; its epochs are trainer.max_epochs.
        schedule: the student's lr schedule (the fork: constant).
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    family = "fine-tuning"
    measure_dm_acc = True
    # smoke_args: a teacher epoch, a student epoch
    smoke_args = ["--trainer.max_epochs", "1", "--model.teacher_epochs", "1"]

    def __init__(
        self,
        backdoored: str,
        layers: dict[str, float] | dict[str, dict[str, float]] | None = None,
        p: float = 2.0,
        teacher_epochs: int = 10,
        teacher_lr: float = 0.01,
        teacher_momentum: float = 0.9,
        teacher_weight_decay: float = 5e-4,
        teacher_cosine_t_max: int = 100,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        schedule: Schedule = "constant",
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        self.check(
            ("p", p, p > 0, "> 0"), ("teacher_epochs", teacher_epochs, teacher_epochs >= 0, ">= 0"),
            ("teacher_lr", teacher_lr, teacher_lr > 0, "> 0"),
            ("teacher_momentum", teacher_momentum, 0 <= teacher_momentum < 1, "in [0, 1)"),
            ("teacher_weight_decay", teacher_weight_decay, teacher_weight_decay >= 0, ">= 0"),
            ("teacher_cosine_t_max", teacher_cosine_t_max, teacher_cosine_t_max >= 1, ">= 1"),
            ("lr", lr, lr > 0, "> 0"), ("momentum", momentum, 0 <= momentum < 1, "in [0, 1)"),
            ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
            finite=True,
        )
        config = "configs/defense/nad.yaml"
        self.betas: dict[str, float] = dict(
            layer_setting(self.net, layers, lambda r: r.attention, "NAD layers", config))
        if not self.betas or any(not (math.isfinite(b) and b >= 0) for b in self.betas.values()):
            raise ValueError(f"NAD: layers for {type(self.net).__name__} must map at least one module to a beta >= 0, "
                             f"got {self.betas}; fix layers in {config}")
        self.shapes = self._feature_shapes(config)
        self.history: dict[str, Any] = {"student": []}

    @torch.no_grad()
    def _feature_shapes(self, config: str) -> dict[str, list[int]]:
        """A dry pass on one zero image: every layer must exist and output a (B, C, H, W) map."""
        was_training = self.net.training
        self.net.eval()
        size = self.spec.image_size
        try:
            with capture(self.net, list(self.betas)) as store:
                self.net(torch.zeros(1, len(self.spec.mean), size, size))
        except KeyError as err:
            raise ValueError(f"NAD: {err.args[0]}; fix layers in {config}") from err
        finally:
            self.net.train(was_training)
        shapes = {name: list(t.shape[1:]) for name, t in store.items()}
        flat = [name for name, shape in shapes.items() if len(shape) != 3]
        if flat:
            raise ValueError(f"NAD: the attention map needs (C, H, W) outputs; {flat} of {type(self.net).__name__} "
                             f"give {[shapes[n] for n in flat]}; fix layers in {config}")
        return shapes

    # -- 1. the teacher --------------------------------------------------------------------------------------
    def prepare(self) -> None:
        h = self.hparams
        teacher = copy.deepcopy(self.net).train().requires_grad_(True)
        optimizer = torch.optim.SGD(teacher.parameters(), lr=h.teacher_lr, momentum=h.teacher_momentum,
                                    weight_decay=h.teacher_weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=h.teacher_cosine_t_max)
        x, y = self.mitigation_data("train")
        losses = []
        for _ in range(h.teacher_epochs):
            losses.append(self.finetune_epoch(teacher, optimizer, x, y)[0])
            scheduler.step()
        teacher.load_state_dict(self.trainer.strategy.broadcast(teacher.state_dict(), src=0))  # one for all ranks
        self.reference("teacher", self.frozen_copy(teacher))
        self.history["teacher"] = {
            "epochs": h.teacher_epochs, "loss": [float(v) / max(1, len(y)) for v in losses],
            "lr_last": optimizer.param_groups[0]["lr"],
            "dm_acc_before": self.accuracy(x, y), "dm_acc": self.accuracy(x, y, net=self.references["teacher"]),
        }
        self.history["attention_active"] = self.attention_active(x[: self.batch_size])

    @torch.no_grad()
    def attention_active(self, x: Tensor) -> dict[str, bool]:
        """Per layer: does its attention map take more than one value over space on these images? A 1x1 or
        replicated map normalises to a constant, so its MSE term is always 0 (NAD is then CE fine-tuning)."""
        was_training = self.net.training
        self.net.eval()
        with self.autocast(), capture(self.net, list(self.betas)) as features:
            self.classify(x, self.net)
        self.net.train(was_training)
        active = {}
        for name, f in features.items():
            a = attention_map(f.float(), self.hparams.p)
            active[name] = bool((a.amax(1) - a.amin(1) > 1e-6 * a.abs().amax(1).clamp(min=1e-12)).any())
        return active

    # -- 2. the student ----------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        return sgd_with_schedule(self.net.parameters(), self.trainer, h.lr, h.momentum, h.weight_decay,
                                 schedule=h.schedule)

    def nad_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """CE of the student plus the weighted attention terms, on pixels x (already augmented)."""
        names, p = list(self.betas), self.hparams.p
        teacher = self.references["teacher"]
        with torch.no_grad(), capture(teacher, names) as features:
            self.classify(x, teacher)
            targets = {n: attention_map(features[n], p) for n in names}
        with capture(self.net, names) as features:
            logits = self(x)
        terms = {"ce": F.cross_entropy(logits.float(), y)}
        terms |= {f"at/{n}": F.mse_loss(attention_map(features[n], p), targets[n]) for n in names}
        loss = terms["ce"] + sum(self.betas[n] * terms[f"at/{n}"] for n in names)
        return loss, terms

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss, terms = self.nad_loss(self.augment(x), y)
        self.track(len(y), loss=loss, **terms)
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.history["student"].append({"epoch": self.current_epoch, **self.epoch_means()})

    def finish(self) -> None:
        self.references.clear()

    def info(self) -> dict[str, Any]:
        return {"layers": self.betas, "feature_shapes": self.shapes, "p": self.hparams.p, **self.history,
                "dm_acc_after": self.dm_acc_after}
