"""NAD: neural attention distillation (Li, Lyu, Koren, Lyu, Li, Ma, ICLR 2021).

A backdoor shows in where a network's intermediate feature maps put their energy; a teacher briefly fine-tuned
on clean data moves that energy back to the clean evidence, and distilling the teacher's *attention maps* into
the backdoored model erases the trigger's pull while cross-entropy keeps the clean task. Two phases:

1. Teacher (`prepare`, a hand-written loop on a copy): the backdoored model fine-tuned on augmented D_m for
   `teacher_epochs` = 10 epochs, SGD lr 0.01, momentum 0.9, wd 5e-4, cosine with T_max = `teacher_cosine_t_max`
   = 100 epochs stepped per epoch (the fork's fixed T_max: over 10 epochs the lr only falls to 0.0098, as the
   spec says; the method's own choice, hence the default). The teacher is then frozen (eval mode, no grad).
2. Student (Lightning's loop, `trainer.max_epochs` = 10): the *original* backdoored model, trained on augmented
   D_m at constant SGD lr 0.01 (momentum 0.9, wd 5e-4) with
       CE(x, y) + sum_l beta_l * MSE(A_S^l / ||A_S^l||_2, A_T^l / ||A_T^l||_2),
   A^l = sum over channels of |activation|^p (p = 2) at module l, the norm taken over the spatial map
   (+ 1e-6, as the reference). Activations are read with forward hooks (hooks.capture) on one forward pass.
Layers and betas (`layers[<backbone>]`, all five in configs/defense/nad.yaml): PreActResNet18 layer3 (500),
layer4 (1000), avgpool (1000; a 1x1 map, so this term is always 0, kept as the fork has it); VGG19BN,
EfficientNetB3, MobileNetV3Large: avgpool, the module before the classifier (1000) -- 1x1 for EfficientNet and
MobileNet and a replicated 7x7 for VGG at 32 px, so NAD degenerates to plain CE fine-tuning on those three,
exactly as in the survey. SmallCNN (not in the survey) follows the PreAct recipe so that the attention term
acts: the ReLUs ending its stages 2 and 3, features.12 (16x16 at 32 px, beta 500) and features.16 (8x8, 1000).
Batch 256 (configs/defense/tiny_imagenet/nad.yaml: 128); the teacher uses the datamodule's batch size too.

Differences from the fork (BackdoorBench's NAD), and why:
- The fork gets each layer's activation by re-running truncated copies of the student (nn.Sequential of its
  first children) in train mode, so the BN running statistics move up to four times per step; hooks read all
  layers from the single forward pass whose logits give the CE.
- The teacher loop has no loss scaler, so float16 precisions are refused (bf16 needs none). Under DDP every
  process distils from rank 0's teacher (broadcast), not from one fine-tuned on its own shuffle.
- `info()["attention_active"]` says per layer whether its attention map varies over space on D_m: where none
  does (VGG, EfficientNet, MobileNet above), the run was plain CE fine-tuning, and the record says so.
The original NAD: WRN-16-1 group outputs 1-3 with betas 500/1000/1000, 20 epochs, lr 0.1 with steps.

Cost (2 CPU cores shared with other jobs, load ~10; SmallCNN width 32 of configs/quickstart.yaml on digits,
SPC 10 = 100 images, full defaults: 10 teacher + 10 student epochs of one batch): 17.9 s for the method, 46 s
wall for the whole process. There: ACC 0.986 -> 0.504, ASR 0.960 -> 0.000, RA 0.040 -> 0.427 (betas 0, i.e. CE
alone: ACC 0.972, ASR 0.700). Per student step: one teacher forward plus one student forward-backward.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.defenses.base import Defense
from lightning_modules.defenses.hooks import capture, for_backbone
from lightning_modules.optim import Schedule, sgd_with_schedule

# Per backbone class name: the modules whose output attention is distilled, with their beta (the survey's fork;
# SmallCNN: the PreAct recipe on its last two stages).
NAD_LAYERS: dict[str, dict[str, float]] = {
    "PreActResNet18": {"layer3": 500.0, "layer4": 1000.0, "avgpool": 1000.0},
    "VGG19BN": {"avgpool": 1000.0},
    "EfficientNetB3": {"avgpool": 1000.0},
    "MobileNetV3Large": {"avgpool": 1000.0},
    "SmallCNN": {"features.12": 500.0, "features.16": 1000.0},
}


def attention_map(features: Tensor, p: float = 2.0, eps: float = 1e-6) -> Tensor:
    """(B, C, H, W) -> (B, H*W): sum over channels of |f|^p, divided by its L2 norm over the positions (+ eps)."""
    a = features.float().abs().pow(p).sum(1).flatten(1)
    return a / (a.norm(dim=1, keepdim=True) + eps)


def attention_loss(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """MSE between the two normalised attention maps (mean over batch and positions)."""
    return F.mse_loss(attention_map(student, p), attention_map(teacher, p))


class NAD(Defense):
    """Args:
        layers: per backbone class name, {module name: beta}: the modules whose output attention is distilled;
            None: `NAD_LAYERS`.
        p: exponent of the attention map.
        teacher_epochs: epochs of the teacher's fine-tuning on D_m (0: the teacher is the backdoored model).
        teacher_lr, teacher_momentum, teacher_weight_decay: the teacher's SGD.
        teacher_cosine_t_max: T_max (epochs) of the teacher's cosine schedule (the fork: 100 whatever the length).
        lr, momentum, weight_decay: the student's SGD; its epochs are trainer.max_epochs.
        schedule: the student's lr schedule (the fork: constant).
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    def __init__(
        self,
        backdoored: str,
        layers: dict[str, dict[str, float]] | None = None,
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
        checks = {
            "p": p > 0, "teacher_epochs": teacher_epochs >= 0, "teacher_lr": teacher_lr > 0,
            "teacher_momentum": 0 <= teacher_momentum < 1, "teacher_weight_decay": teacher_weight_decay >= 0,
            "teacher_cosine_t_max": teacher_cosine_t_max >= 1, "lr": lr > 0, "momentum": 0 <= momentum < 1,
            "weight_decay": weight_decay >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok or not math.isfinite(self.hparams[k])]
        if bad:
            raise ValueError(
                f"NAD: invalid {', '.join(f'{k}={self.hparams[k]}' for k in bad)}; expected p, learning rates > 0, "
                f"momenta in [0, 1), weight decays and teacher_epochs >= 0, teacher_cosine_t_max >= 1")
        config = "configs/defense/nad.yaml"
        self.betas: dict[str, float] = dict(
            for_backbone(NAD_LAYERS if layers is None else layers, self.backdoor_record, "NAD layers", config))
        if not self.betas or any(not (math.isfinite(b) and b >= 0) for b in self.betas.values()):
            raise ValueError(f"NAD: layers for {type(self.net).__name__} must map at least one module to a beta >= 0, "
                             f"got {self.betas}; fix layers in {config}")
        self.shapes = self._feature_shapes(config)
        self._work: dict[str, nn.Module] = {}  # the teacher: not a submodule, so never checkpointed
        self._sums: dict[str, Tensor] = {}
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
        self.refuse_float16("the teacher's fine-tuning")
        teacher = copy.deepcopy(self.net).train().requires_grad_(True)
        optimizer = torch.optim.SGD(teacher.parameters(), lr=h.teacher_lr, momentum=h.teacher_momentum,
                                    weight_decay=h.teacher_weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=h.teacher_cosine_t_max)
        x, y = self.mitigation_data("train")
        losses = []
        with torch.enable_grad():
            for _ in range(h.teacher_epochs):
                teacher.train()
                total = torch.zeros((), device=self.device)
                for xb, yb in self.batches(x, y, self.mitigation.batch_size, shuffle=True, augment=True):
                    with self.autocast():
                        loss = F.cross_entropy(self.classify(xb, teacher).float(), yb)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += loss.detach() * len(yb)
                scheduler.step()
                losses.append(total)
        teacher.load_state_dict(self.trainer.strategy.broadcast(teacher.state_dict(), src=0))  # one for all ranks
        self._work["teacher"] = self.frozen_copy(teacher)
        self.history["teacher"] = {
            "epochs": h.teacher_epochs, "loss": [float(v) / max(1, len(y)) for v in losses],
            "lr_last": optimizer.param_groups[0]["lr"],
            "dm_acc_before": self.accuracy(x, y), "dm_acc": self.accuracy(x, y, net=self._work["teacher"]),
        }
        self.history["attention_active"] = self.attention_active(x[: self.mitigation.batch_size])

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

    def on_train_epoch_start(self) -> None:
        self._sums = {}

    def nad_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """CE of the student plus the weighted attention terms, on pixels x (already augmented)."""
        names, p = list(self.betas), self.hparams.p
        teacher = self._work["teacher"]
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
        for k, v in {"loss": loss, **terms}.items():  # epoch sums on the device: no host sync per batch
            self._sums[k] = self._sums.get(k, 0) + v.detach() * len(y)
        self._sums["n"] = self._sums.get("n", 0) + len(y)
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def on_train_epoch_end(self) -> None:
        n = self._sums.pop("n", 0)
        self.history["student"].append(
            {"epoch": self.current_epoch, **{k: float(v) / max(1, n) for k, v in self._sums.items()}})

    def finish(self) -> None:
        self._work.clear()
        self.history["dm_acc_after"] = self.accuracy(*self.mitigation_data("train"))

    def info(self) -> dict[str, Any]:
        return {"layers": self.betas, "feature_shapes": self.shapes, "p": self.hparams.p, **self.history}
