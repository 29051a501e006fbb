"""PBE: progressive backdoor erasing, its adversarial fine-tuning part (Mu et al., "Progressive
Backdoor Erasing via connecting Backdoor and Adversarial Attacks", CVPR 2023).

20 rounds of (an epoch on untargeted L_inf PGD examples with true labels, a clean epoch) = `trainer.max_epochs`
40; the optimiser state is cleared per adversarial batch and per clean epoch, as the fork. eps is read in
normalised space by default (`eps_space`), i.e. a per-channel pixel budget eps * std_c, recorded in `info()`.
Differs from the fork (details: docs/fidelity.md, "PBE"): x + delta clamped to valid pixels (`clamp: normalized`
= the fork's bug); the attack runs in eval mode; no test evaluation between epochs.
Defaults: configs/defense/pbe.yaml.
Cost: adversarial epoch 8 fwd + 8 bwd per D_m sample (7 PGD steps + the update), clean epoch 1 + 1;
measured: benchmarks/README.md.
"""

from __future__ import annotations

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

    family = "fine-tuning"
    measure_dm_acc = True
    smoke_args = ["--trainer.max_epochs", "2"]

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
        self.check(
            ("eps", eps, eps > 0, "> 0"), ("attack_steps", attack_steps, attack_steps >= 1, ">= 1"),
            ("step_divisor", step_divisor, step_divisor > 0, "> 0"), ("lr", lr, lr > 0, "> 0"),
            ("momentum", momentum, 0 <= momentum < 1, "in [0, 1)"),
            ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
            ("eps_space", eps_space, eps_space in ("normalized", "pixel"), "'normalized' or 'pixel'"),
            ("clamp", clamp, clamp in ("pixel", "normalized"), "'pixel' or 'normalized'"),
            finite=True,
        )
        std, mean = torch.tensor(self.spec.std), torch.tensor(self.spec.mean)
        pixel_eps = eps * std if eps_space == "normalized" else torch.full_like(std, eps)
        low, high = (torch.zeros_like(mean), torch.ones_like(mean)) if clamp == "pixel" else (mean, mean + std)
        # per-channel budget and valid range in 0..1 pixels, as (1, C, 1, 1) buffers that follow the device
        for name, value in (("pixel_eps", pixel_eps), ("low", low), ("high", high)):
            self.register_buffer(name, value.view(1, -1, 1, 1), persistent=False)
        self.history: list[dict[str, Any]] = []

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
        self.track(len(y), loss=loss)
        self.track(acc=(pred == y).sum())
        if adversarial:
            self.track(adv_predictions=torch.bincount(pred, minlength=self.spec.num_classes))
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, sync_dist=True)
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        sums, n = self.epoch_sums()
        n = max(1, n)
        # acc: of the training forward (train mode), on the PGD examples in adversarial epochs
        entry: dict[str, Any] = {"epoch": self.current_epoch, "phase": self.phase(self.current_epoch),
                                 "loss": float(sums.get("loss", 0)) / n, "acc": float(sums.get("acc", 0)) / n}
        counts = sums.get("adv_predictions")
        if counts is not None:  # the most frequent prediction on the adversarial examples and its share
            entry["adv_top_class"] = int(counts.argmax())
            entry["adv_top_class_share"] = float(counts.max()) / n
        self.history.append(entry)

    def info(self) -> dict[str, Any]:
        phases = [entry["phase"] for entry in self.history]
        return {"adversarial_epochs": phases.count("adversarial"), "clean_epochs": phases.count("clean"),
                "pixel_eps": self.pixel_eps.flatten().tolist(),
                "pixel_step": (self.pixel_eps / self.hparams.step_divisor).flatten().tolist(),
                "valid_range": [self.low.flatten().tolist(), self.high.flatten().tolist()],
                "dm_acc_after": self.dm_acc_after, "epochs": self.history}
