"""PBE: progressive backdoor erasing, its adversarial fine-tuning part (Mu et al., CVPR 2023).

Untargeted adversarial examples of a backdoored model tend to land in the backdoor's target class: they act as
surrogate poisoned images. Fine-tuning on them with their true labels, alternated with clean fine-tuning,
erases the backdoor without knowing the trigger or the target.

Training (Lightning's loop, manual optimisation): the survey's 20 rounds of (one adversarial epoch, one clean
epoch), i.e. `trainer.max_epochs` = 40, which counts both kinds of epoch (configs/defense/pbe.yaml):
- even epochs (0, 2, ...) are adversarial: each augmented D_m batch is replaced by its untargeted L_inf PGD
  examples (uniform random start in the ball, 7 signed ascent steps of eps/5 on CE(x + delta, y), projection
  onto the ball and x + delta clamped to the valid range after each), crafted with the model in eval mode,
  then one SGD step on CE(x~, y) with the model in train mode;
- odd epochs are clean: one SGD step on CE(x, y) per augmented D_m batch.
SGD lr 0.01 constant, momentum 0.9, weight decay 5e-4, batch 256. The fork builds a fresh optimiser for every
batch of an adversarial epoch and one per clean epoch; with a constant lr that is an empty optimiser state
before every adversarial step and at the start of every clean epoch, which is what we do (adversarial steps
never carry momentum; clean steps carry it within their epoch). `info()` counts the epochs of each kind.

The budget. The reference states eps = 0.02 in normalised space; we perturb 0..1 pixels, so with
`eps_space: normalized` (the default) the pixel budget of channel c is eps * std_c, and the step eps * std_c / 5:
CIFAR-10 (0.00494, 0.00486, 0.00522) = 1.26 / 1.24 / 1.33 of 255; GTSRB (identity normalisation) 0.02 = 5.1/255;
Tiny-ImageNet (0.00460, 0.00453, 0.00452); digits 0.00648. `eps_space: pixel` takes eps as a pixel budget for
every channel (the authors' own code: 6/255). `info()` records the per-channel pixel budget of the run.

Differences from the fork:
- x + delta is clamped to [0, 1] in pixel space (valid images). The fork clamps it to [0, 1] in *normalised*
  space, i.e. pixels to [mean_c, mean_c + std_c], which clips every pixel darker than the mean on CIFAR-10;
  `clamp: normalized` reproduces that for comparison.
- the attack runs in eval mode (BN running statistics are not fed the 7 attack passes); the fork attacks in
  whatever mode the model is in, mostly train mode (its BN statistics then absorb the attack passes too).
- no test-set evaluation between epochs. The authors' code runs adversarial epochs 1-3 then clean epochs,
  eps 6/255, lr 1e-3 (not reproduced here; the survey's alternation is).

Cost: an adversarial epoch costs 8 forward and 8 backward passes per batch (7 attack steps + the update), a
clean one 1 + 1, so a run is about 9 x 20 = 180 passes over D_m (measured: benchmarks/README.md).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.transforms import to_unit
from lightning_modules.defenses.base import Defense

PHASES = ("adversarial", "clean")


class PBE(Defense):
    """Args:
        eps: L_inf budget of the PGD examples, in the units of `eps_space`.
        eps_space: "normalized": eps is in the network's normalised input space (the reference's 0.02), the
            pixel budget of channel c is eps * std_c; "pixel": eps is in 0..1 pixel units for every channel.
        attack_steps: PGD ascent steps (signed, of size eps / step_divisor each, after a uniform random start).
        step_divisor: the step is eps / step_divisor (5 in the reference).
        clamp: valid range of x + delta: "pixel" [0, 1] pixels; "normalized" [0, 1] in normalised space, the
            fork's clamp (pixels in [mean_c, mean_c + std_c]).
        lr, momentum, weight_decay: SGD, constant, fresh (empty state) at every phase.
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    def __init__(
        self,
        backdoored: str,
        eps: float = 0.02,
        eps_space: Literal["normalized", "pixel"] = "normalized",
        attack_steps: int = 7,
        step_divisor: float = 5.0,
        clamp: Literal["pixel", "normalized"] = "pixel",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        self.automatic_optimization = False
        checks = {"eps": eps > 0, "attack_steps": attack_steps >= 1, "step_divisor": step_divisor > 0,
                  "lr": lr > 0, "momentum": 0 <= momentum < 1, "weight_decay": weight_decay >= 0,
                  "eps_space": eps_space in ("normalized", "pixel"), "clamp": clamp in ("pixel", "normalized")}
        bad = [k for k, ok in checks.items()
               if not ok or (isinstance(self.hparams[k], float) and not math.isfinite(self.hparams[k]))]
        if bad:
            raise ValueError(
                f"PBE: invalid {', '.join(f'{k}={self.hparams[k]!r}' for k in bad)}; expected eps, step_divisor, "
                f"lr > 0, attack_steps >= 1, momentum in [0, 1), weight_decay >= 0, eps_space and clamp "
                f"'normalized' or 'pixel'")
        std, mean = torch.tensor(self.spec.std), torch.tensor(self.spec.mean)
        pixel_eps = eps * std if eps_space == "normalized" else torch.full_like(std, eps)
        low, high = (torch.zeros_like(mean), torch.ones_like(mean)) if clamp == "pixel" else (mean, mean + std)
        # per-channel budget and valid range in 0..1 pixels, as (1, C, 1, 1) buffers that follow the device
        for name, value in (("pixel_eps", pixel_eps), ("low", low), ("high", high)):
            self.register_buffer(name, value.view(1, -1, 1, 1), persistent=False)
        self.history: list[dict[str, Any]] = []
        self._sums: dict[str, Tensor] = {}
        self._count = 0
        self._dm_acc: float | None = None

    @staticmethod
    def phase(epoch: int) -> str:
        return PHASES[epoch % 2]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        h = self.hparams
        return torch.optim.SGD(self.net.parameters(), lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)

    def on_train_epoch_start(self) -> None:
        # a fresh optimiser per clean epoch (and per adversarial step, training_step): no momentum carried over
        # (constant lr, so nothing else to reset)
        self.optimizers().optimizer.state.clear()
        self._sums, self._count = {}, 0

    @torch.enable_grad()
    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        """Untargeted L_inf PGD examples of pixels x (0..1): |x~ - x| <= pixel_eps per channel, x~ in [low, high]."""
        eps, step = self.pixel_eps, self.pixel_eps / self.hparams.step_divisor
        was_training = self.net.training
        self.net.eval()
        delta = (torch.rand_like(x) * 2 - 1) * eps
        delta = ((x + delta).clamp(self.low, self.high) - x).detach()
        for _ in range(self.hparams.attack_steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(self(x + delta).float(), y)
            (grad,) = torch.autograd.grad(loss, delta)
            delta = torch.maximum(torch.minimum(delta.detach() + step * grad.sign(), eps), -eps)
            delta = (x + delta).clamp(self.low, self.high) - x
        self.net.train(was_training)
        return (x + delta).detach()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        x = to_unit(self.augment(x))
        adversarial = self.phase(self.current_epoch) == "adversarial"
        if adversarial:
            x = self.perturb(x, y)
        logits = self(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer = self.optimizers()
        if adversarial:  # the fork's fresh optimiser per adversarial batch
            optimizer.optimizer.state.clear()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        # epoch sums on the device (no host sync per batch): loss, accuracy on the batch it trained on and, in
        # adversarial epochs, where the PGD examples land (the paper: mostly the backdoor's target class)
        pred = logits.detach().argmax(1)
        sums = {"loss": loss.detach() * len(y), "acc": (pred == y).sum()}
        if adversarial:
            sums["adv_predictions"] = torch.bincount(pred, minlength=self.spec.num_classes)
        for k, v in sums.items():
            self._sums[k] = self._sums.get(k, 0) + v
        self._count += len(y)
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, sync_dist=True)
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        n = max(1, self._count)
        # acc: of the training forward (train mode), on the PGD examples in adversarial epochs
        entry: dict[str, Any] = {"epoch": self.current_epoch, "phase": self.phase(self.current_epoch),
                                 "loss": float(self._sums.get("loss", 0)) / n,
                                 "acc": float(self._sums.get("acc", 0)) / n}
        counts = self._sums.get("adv_predictions")
        if counts is not None:  # the most frequent prediction on the adversarial examples and its share
            entry["adv_top_class"] = int(counts.argmax())
            entry["adv_top_class_share"] = float(counts.max()) / n
        self.history.append(entry)

    def finish(self) -> None:
        self._dm_acc = self.accuracy(*self.mitigation_data("train"))

    def info(self) -> dict[str, Any]:
        phases = [entry["phase"] for entry in self.history]
        return {"adversarial_epochs": phases.count("adversarial"), "clean_epochs": phases.count("clean"),
                "pixel_eps": self.pixel_eps.flatten().tolist(),
                "pixel_step": (self.pixel_eps / self.hparams.step_divisor).flatten().tolist(),
                "valid_range": [self.low.flatten().tolist(), self.high.flatten().tolist()],
                "dm_acc_after": self._dm_acc, "epochs": self.history}
