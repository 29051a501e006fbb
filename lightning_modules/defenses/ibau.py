"""i-BAU: implicit backdoor adversarial unlearning (Zeng, Chen, Park, Mao, Jin, Jia, "Adversarial Unlearning of
Backdoors via Implicit Hypergradient", ICLR 2022), as the survey's fork of BackdoorBench runs it.

    min_theta max_delta  H(delta, theta) = CE(D_m + delta; theta),  one universal delta shared by every image.

The outer gradient accounts for how the inner solution delta*(theta) moves with theta (implicit hypergradient).
delta* is a fixed point of the inner map, one gradient step on the *first batch* (x0, y0) of the round:
    Phi(delta, theta) = delta - 0.1 * grad_delta [ mean_i -CE(f_theta(x0_i + delta), y0_i) + 0.001 ||delta||^2 ],
so d delta*/d theta = (I - J)^-1 dPhi/dtheta with J = dPhi/ddelta, and the hypergradient of the outer loss L is
    grad_theta L + (dPhi/dtheta)^T v,   v = (I - J^T)^-1 grad_delta L ~ sum_{k<K} (J^T)^k grad_delta L,
the Neumann series truncated after K = 5 fixed-point iterations v <- J^T v + grad_delta L (from v = 0; here from
v = grad_delta L, which saves the reference's first, zero product: same v). Each J^T v and the final
(dPhi/dtheta)^T v are vector-Jacobian products through the gradient of the inner loss (double backward,
`torch.autograd.grad(..., create_graph=True)`); the last one is folded into a surrogate scalar
L + <Phi, v> whose theta-gradient is the hypergradient, so one `manual_backward` applies it (precision plugin,
gradient sync).

Each round (a Lightning epoch; trainer.max_epochs = 5 rounds), model in eval mode throughout:
1. delta (1 x C x H x W, from zero) takes one SGD step (lr 10) per augmented batch of D_m on
   -CE(f(x + delta), f's own prediction on x) + 0.001 ||delta||^2, no norm bound, no clamp;
2. per batch of D_m (batch 256, augmented) one outer step: int(0.01 * B) random images of the batch get delta,
   L = CE(f(x with delta on those images), y), theta moves along the hypergradient with Adam lr 1e-4
   (amsgrad, weight decay 0), constant.

With B < 100 no image gets delta (int(0.01 * B) = 0): L no longer depends on delta, grad_delta L = 0, so v = 0
and the hypergradient term (dPhi/dtheta)^T v is exactly zero; the outer step is then plain clean fine-tuning
(Adam 1e-4, eval mode) and the inner maximisation has no effect on the model at all. Such steps skip the
hypergradient computation (it would add exactly 0). This is the survey's setting whenever |D_m| < 100 (SPC 2 on
CIFAR-10 and GTSRB) and for a last partial batch under 100; SPC 10 on CIFAR-10 (one batch of 100) patches one
image per step; `info()["rounds"]` records the patched images and the steps with an active hypergradient.

Where delta lives (`delta_space`): "normalized" (default) adds it to the network's normalised input, as the
survey's fork does (BackdoorBench normalises before the defense sees an image); "pixel" adds it to 0..1 pixels,
as the authors' code (which feeds unnormalised images). With the same lr 10 and 0.001 weight, the fork's pixel
step is std^2 (~1/16 on CIFAR-10 and Tiny-ImageNet) of the pixel-space one; identical on GTSRB (no normalisation).
No bound and no clamp in either space, as the reference.

Differences from the reference, and why:
- The fork collects the augmented batches once and reuses them in every round (and for the inner map's first
  batch); here each round draws fresh augmented batches from the datamodule and the inner map uses that round's
  first batch (its true labels, as the reference), so with a single batch per round the inner and outer batch
  are the same images, as in the reference.
- The reference stops the fixed-point iterations early when ||v_k - v_k-1|| < 1e-10, a host sync per
  iteration; here always K iterations (the early stop only fires once v has converged, or when v = 0).
- Original i-BAU: Adam lr 1e-3 (no amsgrad), batch 100, no augmentation.
- MobileNetV3's Hardsigmoid has no double backward in torch: while the hypergradient graph is built it is
  swapped for the same function with a differentiable backward (`twice_differentiable`; forward identical).
- The hypergradient (Hessian-vector products) is computed in float32 even under bf16-mixed, where the rest of
  the step runs in the Trainer's precision; 16-mixed is refused (these hand-written gradients have no loss scaler).
Defaults: 5 rounds, K 5, inner map step 0.1, delta lr 10, delta weight 0.001, poisoned fraction 0.01, Adam lr
1e-4 amsgrad, batch 256.
Cost: an outer step with the hypergradient is about 2 (outer forward/backward) + 2 (inner gradient, graph kept)
+ 3 (K - 1) (Hessian-vector products, double backward) + 4 (the final backward through it all) passes, against 2
for plain fine-tuning; the delta search adds 2 forwards + 1 backward per batch. Measured on 2 CPU cores shared
with other jobs (load ~11): SmallCNN width 32 of configs/quickstart.yaml on digits, SPC 10 = 100 images = one
batch per round, full defaults: 53 s for the 5 rounds (22 s CPU for the whole process), 9.6 s with
poison_fraction 0 (no hypergradient). One step on 10 images at 32 px with K = 2 (tests): VGG19BN ~40 s,
PreActResNet18 ~13 s, EfficientNetB3 ~8 s, MobileNetV3Large ~3 s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.transforms import to_unit
from lightning_modules.defenses.base import Defense


def wide(logits: Tensor) -> Tensor:
    """Half-precision logits to float32 for the loss (float32 and float64 stay as they are)."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def poisoned_count(batch: int, fraction: float) -> int:
    """How many images of a batch get delta in the outer loss: int(fraction * batch), as the reference."""
    return int(fraction * batch)


def inner_map(model: Callable[[Tensor], Tensor], delta: Tensor, x: Tensor, y: Tensor, lr: float, reg: float) -> Tensor:
    """Phi(delta) = delta - lr * grad_delta [mean_i -CE(model(x_i + delta), y_i) + reg ||delta||^2], differentiable
    in delta and in the model's parameters (delta must require grad)."""
    loss = -F.cross_entropy(wide(model(x + delta)), y) + reg * delta.pow(2).sum()
    (grad,) = torch.autograd.grad(loss, delta, create_graph=True)
    return delta - lr * grad


def hypergradient_surrogate(
    model: Callable[[Tensor], Tensor], delta: Tensor, inner: tuple[Tensor, Tensor], x: Tensor, y: Tensor,
    patch: Tensor, inner_lr: float, reg: float, steps: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(surrogate, outer loss, v): the gradient of `surrogate` w.r.t. the model's parameters is i-BAU's
    hypergradient grad_theta L + (dPhi/dtheta)^T v, with L = CE(model(x + patch * delta), y), `patch` a 0/1 weight
    per image (broadcast against x), Phi the inner map on the batch `inner`, and v after `steps` fixed-point
    iterations v <- J^T v + grad_delta L (J = dPhi/ddelta)."""
    delta = delta.detach().requires_grad_(True)
    outer = F.cross_entropy(wide(model(x + patch * delta)), y)
    (g,) = torch.autograd.grad(outer, delta, retain_graph=True)
    mapped = inner_map(model, delta, *inner, inner_lr, reg)
    v = g
    for _ in range(steps - 1):
        (jv,) = torch.autograd.grad(mapped, delta, grad_outputs=v, retain_graph=True)
        v = jv + g
    v = v.detach()
    return outer + (mapped * v).sum(), outer.detach(), v


class _Hardsigmoid(torch.autograd.Function):
    """F.hardsigmoid whose backward is itself differentiable (torch has no double backward for hardsigmoid)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return F.hardsigmoid(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * ((x > -3) & (x < 3)).to(grad.dtype) * (1 / 6)  # as torch's kernel; 2nd derivative 0 a.e.


class TwiceDifferentiableHardsigmoid(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return _Hardsigmoid.apply(x)


@contextmanager
def twice_differentiable(net: nn.Module) -> Iterator[None]:
    """Within the block, every nn.Hardsigmoid of `net` (MobileNetV3's squeeze-excitation) is replaced by the same
    function with a differentiable backward, so that graphs built there support double backward."""
    swapped = [(parent, name, child) for parent in net.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Hardsigmoid)]
    for parent, name, _ in swapped:
        setattr(parent, name, TwiceDifferentiableHardsigmoid())
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


class IBAU(Defense):
    """Args:
        lr, amsgrad, weight_decay: Adam on all weights (the outer step), constant.
        fixed_point_steps: K, the fixed-point iterations approximating the implicit hypergradient.
        inner_lr: step of the inner map (one gradient step on the round's first batch).
        delta_lr: SGD step on the universal perturbation, one per batch of D_m per round.
        delta_reg: weight of ||delta||^2 in the inner objective (and in the inner map).
        poison_fraction: int(poison_fraction * B) random images of each outer batch of B get delta.
        delta_space: "normalized" (delta is added to the network's normalised input, the fork) or "pixel" (to
            0..1 pixels, the authors' code).
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    Rounds are epochs: trainer.max_epochs (5 in configs/defense/ibau.yaml).
    """

    def __init__(
        self,
        backdoored: str,
        lr: float = 1e-4,
        amsgrad: bool = True,
        weight_decay: float = 0.0,
        fixed_point_steps: int = 5,
        inner_lr: float = 0.1,
        delta_lr: float = 10.0,
        delta_reg: float = 0.001,
        poison_fraction: float = 0.01,
        delta_space: Literal["normalized", "pixel"] = "normalized",
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        for name, value, ok, rule in (
            ("lr", lr, lr > 0, "> 0"), ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
            ("fixed_point_steps", fixed_point_steps, fixed_point_steps >= 1, ">= 1 (an integer)"),
            ("inner_lr", inner_lr, inner_lr > 0, "> 0"), ("delta_lr", delta_lr, delta_lr > 0, "> 0"),
            ("delta_reg", delta_reg, delta_reg >= 0, ">= 0"),
            ("poison_fraction", poison_fraction, 0 <= poison_fraction <= 1, "in [0, 1]"),
        ):
            if not ok or not math.isfinite(value):
                raise ValueError(f"IBAU: {name}={value!r}, expected {rule}; fix model.init_args.{name}")
        if delta_space not in ("normalized", "pixel"):
            raise ValueError(f"IBAU: delta_space={delta_space!r}, expected 'normalized' or 'pixel'")
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.delta: Tensor | None = None  # this round's universal perturbation (in delta_space)
        self._inner: tuple[Tensor, Tensor] | None = None  # this round's first batch: the inner map's data
        self._sums: dict[str, Tensor] = {}
        self._round: dict[str, Any] = {}
        self._history: list[dict[str, Any]] = []
        self._dm_acc: float | None = None

    # the whole method runs in eval mode (running BN statistics, no dropout), as the reference
    def train(self, mode: bool = True) -> IBAU:
        super().train(mode)
        if self.net is not None:
            self.net.eval()
        return self

    def to_space(self, x: Tensor) -> Tensor:
        """Images (uint8, or 0..1 floats) in the space delta is added in: the network's input, or 0..1 pixels."""
        if self.hparams.delta_space == "pixel":
            return to_unit(x)
        x = self.normalize(x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def model(self, z: Tensor) -> Tensor:
        """Logits of images already in delta's space (`to_space`)."""
        return self(z) if self.hparams.delta_space == "pixel" else self.net(z)

    def on_fit_start(self) -> None:
        self.refuse_float16("the hypergradient")
        super().on_fit_start()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        h = self.hparams
        return torch.optim.Adam(self.net.parameters(), lr=h.lr, amsgrad=h.amsgrad, weight_decay=h.weight_decay)

    # -- the inner maximisation: one universal delta per round ------------------------------------------------
    def fit_delta(self, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
        """From zero, one SGD step per augmented batch on -CE(f(x + delta), f's own prediction) + reg ||delta||^2."""
        h = self.hparams
        delta = torch.zeros(1, *x.shape[1:], device=x.device, requires_grad=True)
        with torch.enable_grad(), self.autocast():
            for xb, _ in self.batches(x, y, batch_size, shuffle=True, augment=True):
                zb = self.to_space(xb)
                with torch.no_grad():
                    own = self.model(zb).argmax(1)
                loss = -F.cross_entropy(wide(self.model(zb + delta)), own) + h.delta_reg * delta.pow(2).sum()
                (grad,) = torch.autograd.grad(loss, delta)
                with torch.no_grad():
                    delta.sub_(grad, alpha=h.delta_lr)
        return delta.detach()

    def on_train_epoch_start(self) -> None:
        self.train()
        x, y = self.mitigation_data("train")
        delta = self.fit_delta(x, y, self.mitigation.batch_size)
        self.delta = self.trainer.strategy.broadcast(delta, src=0)  # one delta for all processes
        with torch.no_grad(), self.autocast():  # how much delta changes the predictions on D_m (no augmentation)
            flips = sum((self.model(z).argmax(1) != self.model(z + self.delta).argmax(1)).sum()
                        for z in (self.to_space(xb) for xb, _ in self.batches(x, y, 512)))
        self._round = {"round": self.current_epoch, "delta_l2": float(self.delta.norm()),
                       "delta_linf": float(self.delta.abs().max()),
                       "dm_prediction_flips": float(flips) / max(1, len(y)),
                       "patched_per_step": [], "hypergradient_steps": 0}
        self._sums = {}

    # -- the outer minimisation: Lightning's training loop ----------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        h = self.hparams
        x, y = batch
        x = self.to_space(self.augment(x))
        if batch_idx == 0 or self._inner is None:
            self._inner = (x, y)
        n = poisoned_count(len(x), h.poison_fraction)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        if n == 0:  # grad_delta L = 0, so v = 0 and the hypergradient term is exactly zero: plain CE
            loss = objective = F.cross_entropy(wide(self.model(x)), y)
            v_norm = torch.zeros((), device=x.device)
        else:
            patch = torch.zeros(len(x), *(1,) * (x.dim() - 1), device=x.device)
            patch[torch.randperm(len(x), device=x.device)[:n]] = 1.0
            # float32 whatever the Trainer's precision: bf16 would round the Hessian-vector products
            with twice_differentiable(self.net), torch.autocast(x.device.type, enabled=False):
                objective, loss, v = hypergradient_surrogate(self.model, self.delta, self._inner, x, y, patch,
                                                             h.inner_lr, h.delta_reg, h.fixed_point_steps)
            v_norm = v.norm()
            self._round["hypergradient_steps"] += 1
        self.manual_backward(objective)
        optimizer.step()
        self._round["patched_per_step"].append(n)
        for k, value in (("loss", loss.detach()), ("v_norm", v_norm)):  # device sums: no host sync per batch
            self._sums[k] = self._sums.get(k, 0) + value
        self._sums["steps"] = self._sums.get("steps", 0) + 1
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, sync_dist=True)
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        steps = self._sums.pop("steps", 0)
        means = {f"mean_{k}": float(v) / max(1, steps) for k, v in self._sums.items()}
        self._history.append({**self._round, "steps": steps, **means})

    def finish(self) -> None:
        self._dm_acc = self.accuracy(*self.mitigation_data("train"))

    def info(self) -> dict[str, Any]:
        space = "0..1 pixels" if self.hparams.delta_space == "pixel" else "the network's normalised input"
        return {"delta_space": f"{space}, no bound, no clamp", "dm_acc_after": self._dm_acc,
                "rounds": self._history}
