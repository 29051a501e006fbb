"""FMP: adversarial feature map pruning (Huang, Bu, "Adversarial Feature Map Pruning for Backdoor", ICLR 2024).

Per conv output channel: from x +- eps, one signed-gradient step of eps maximising the MSE between the channel's
clean and perturbed maps on 32 D_m images; the accuracy on the perturbed images rates the channel. Each conv loses
its floor(C / 64) least robust channels (conv weights, and the BN normalising its output); then all weights are
fine-tuned with no mask, as in the survey's fork (what can regrow: docs/fidelity.md).
Differs from the fork (details: docs/fidelity.md, "FMP"):
- perturbs pixels in [0, 1] before the normalisation and clamps there (the fork clamps normalised inputs);
- rates in eval mode (the fork's train-mode passes use batch statistics and overwrite the running ones);
- ranks by conv name (the fork pairs ranks in execution order with convs in module order: PreAct's 1x1 shortcut
  runs first, so its ranks prune conv1); ties go to the lower channel index;
- batched: one replica of the images per channel, each pass stopped at the rated conv; convs with < 64 channels
  lose none and are not rated. Defaults: configs/defense/fmp.yaml (the fork's config/defense/fmp/default.yaml).
Cost: per rated channel, 32 images x (fwd + bwd up to its conv, 1 full fwd); 4.8k channels on PreAct-ResNet18,
5.5k VGG-19-BN, 17k MobileNetV3-L, 62.6k EfficientNet-B3; then 1 fwd + 1 bwd per D_m image per epoch;
measured: benchmarks/README.md, "Newer defenses".
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from datamodules.transforms import to_unit
from lightning_modules.defenses.base import Defense
from lightning_modules.defenses.hooks import capture

Forward = Callable[[Tensor], Tensor]  # pixels in [0, 1] -> logits


class _Reached(Exception):
    """Raised by a forward hook to end a pass once the conv of interest has run."""


def conv_layers(net: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Every Conv2d of `net` with its qualified name, in module order."""
    return [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Conv2d)]


def conv_output(forward: Forward, conv: nn.Conv2d, x: Tensor) -> Tensor:
    """`conv`'s output for pixels x; the pass stops there (what follows the conv never runs)."""
    store: dict[str, Tensor] = {}

    def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
        store["out"] = output
        raise _Reached

    handle = conv.register_forward_hook(hook)
    try:
        forward(x)
    except _Reached:
        pass
    finally:
        handle.remove()
    if "out" not in store:
        raise RuntimeError(f"FMP: a {type(conv).__name__} of the network never ran in its forward pass, so its "
                           f"feature maps cannot be rated")
    return store["out"]


@torch.no_grad()
def following_bns(net: nn.Module, forward: Forward, x: Tensor) -> dict[str, str | None]:
    """Conv name -> the BatchNorm2d right after it in module order (the fork's rule) when that BN normalises
    exactly the conv's output (checked in one traced forward of x), else None (e.g. PreAct's conv2 and shortcut
    convs, whose outputs are summed before the next block's bn1)."""
    modules = list(net.named_modules())
    after = {name: nxt for (name, m), (nxt, n) in itertools.pairwise(modules)
             if isinstance(m, nn.Conv2d) and isinstance(n, nn.BatchNorm2d)}
    with capture(net, list(after), "output") as outputs, capture(net, list(after.values()), "input") as inputs:
        forward(x)
    return {name: after[name] if name in outputs and inputs.get(after[name]) is outputs[name] else None
            for name, _ in conv_layers(net)}


def perturb_channels(forward: Forward, conv: nn.Conv2d, start: Tensor, clean: Tensor, channels: Tensor,
                     eps: float) -> Tensor:
    """One signed-gradient ascent step per channel: for each c in `channels`, start + eps * sign(d MSE_c / d x),
    clamped to [0, 1], where MSE_c is between channel c of `conv`'s output on the perturbed images and on the clean
    ones (`clean`: (N, C, h, w)). One pass over len(channels) replicas of the N images `start`, replica j scored on
    channels[j]; the net must be in eval mode so that the replicas do not interact. Returns (len(channels), N, ...)."""
    k, n = len(channels), len(start)
    x = start.repeat(k, 1, 1, 1).requires_grad_(True)
    out = conv_output(forward, conv, x).float().unflatten(0, (k, n))  # (k, N, C, h, w)
    perturbed = out[torch.arange(k, device=out.device), :, channels]  # (k, N, h, w): replica j, channel channels[j]
    reference = clean.float()[:, channels].transpose(0, 1)
    loss = (perturbed - reference).pow(2).mean(dim=(1, 2, 3)).sum()  # replica j's gradient is that of its MSE alone
    (grad,) = torch.autograd.grad(loss, x)
    return (x.detach() + eps * grad.sign()).clamp_(0.0, 1.0).unflatten(0, (k, n))


@torch.no_grad()
def replica_accuracy(forward: Forward, images: Tensor, y: Tensor) -> Tensor:
    """Accuracy on each replica of images (k, N, ...) with labels y (N,): (k,)."""
    k, n = images.shape[:2]
    pred = forward(images.flatten(0, 1)).argmax(1).view(k, n)
    return (pred == y).float().mean(1)


def least_robust(accuracy: Tensor, prune_every: int) -> Tensor:
    """The floor(C / prune_every) channels with the lowest accuracy (ties: the lower channel index first)."""
    return torch.argsort(accuracy, stable=True)[: len(accuracy) // prune_every]


@torch.no_grad()
def prune_feature_maps(net: nn.Module, pruned: Mapping[str, Tensor], bn_of: Mapping[str, str | None]) -> None:
    """Zero the pruned output channels of each conv (weights, bias) and of the BN that normalises it (weight, bias:
    the channel then outputs exactly 0 there)."""
    modules = dict(net.named_modules())
    for name, idx in pruned.items():
        for layer in (modules[name], modules.get(bn_of.get(name) or "")):
            for p in (getattr(layer, "weight", None), getattr(layer, "bias", None)):
                if p is not None:
                    p[idx.to(p.device)] = 0


class FMP(Defense):
    """Args:
        adv_dataset_size: how many D_m images rate the channels: a random draw (the fork's first shuffled batch), all
            of D_m when it holds fewer.
        eps: the random start (+-eps per pixel) and the signed-gradient step, on the [0, 1] pixel scale (1/255).
        prune_every: each conv loses floor(C / prune_every) channels (64: the fork's 2**6).
        adv_augment: rate the channels on augmented images (the fork's train transform).
        adv_batch_size: images per pass of the rating (replicas of the images, one per channel).
        lr, momentum, weight_decay: SGD of the fine-tuning (all weights, no mask).
        eta_min: the cosine schedule's final learning rate (over the run, stepped per epoch).
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    family = "pruning"
    # rating, pruning, one fine-tuning epoch; 1 channel per 32, so that the test-width backbones (VGG-19-BN at 1/16:
    # at most 32 channels) prune too; 1 rating image (each rated channel costs a fwd + bwd)
    smoke_args = ["--trainer.max_epochs", "1", "--model.prune_every", "32", "--model.adv_dataset_size", "1"]

    def __init__(
        self,
        backdoored: str,
        adv_dataset_size: int = 32,
        eps: float = 1 / 255,
        prune_every: int = 64,
        adv_augment: bool = True,
        adv_batch_size: int = 1024,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta_min: float = 1e-4,
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        self.check(
            ("adv_dataset_size", adv_dataset_size, adv_dataset_size >= 1, "an int >= 1 (images that rate channels)"),
            ("eps", eps, 0 < eps <= 1, "in (0, 1] (pixel scale; 1/255 in the fork)"),
            ("prune_every", prune_every, prune_every >= 1, "an int >= 1 (one pruned channel per this many)"),
            ("adv_batch_size", adv_batch_size, adv_batch_size >= 1, "an int >= 1 (images per rating pass)"),
            ("lr", lr, lr > 0, "> 0"), ("momentum", momentum, 0 <= momentum < 1, "in [0, 1)"),
            ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
            ("eta_min", eta_min, 0 <= eta_min <= lr, f"in [0, lr = {lr}]"),
            finite=True,
        )
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        if not conv_layers(self.net):
            raise ValueError(f"FMP prunes Conv2d feature maps; {type(self.net).__name__} has none")
        self.facts: dict[str, Any] = {}

    # -- rating and pruning ---------------------------------------------------------------------------------
    def prepare(self) -> None:
        h = self.hparams
        self.refuse_float16("the feature-map rating (a hand-written backward)")
        x, y = self.mitigation_data("train")
        pick = torch.randperm(len(x), device=x.device)[: h.adv_dataset_size]
        x, y = to_unit(self.augment(x[pick]) if h.adv_augment else x[pick]), y[pick]
        start = (x + h.eps * torch.empty_like(x).uniform_(-h.eps, h.eps).sign()).clamp_(0.0, 1.0)
        net, was_training = self.net, self.net.training
        net.eval()

        def forward(images: Tensor) -> Tensor:
            return self.classify(images, net)

        per_pass = max(1, h.adv_batch_size // len(x))
        layers: dict[str, dict[str, Any]] = {}
        pruned: dict[str, Tensor] = {}
        with self.autocast():
            bn_of = following_bns(net, forward, x[:1])
            for name, conv in conv_layers(net):
                channels = conv.out_channels
                layers[name] = {"channels": channels, "bn": bn_of[name], "rated": channels >= h.prune_every}
                if channels < h.prune_every:
                    continue
                with torch.no_grad():
                    clean = conv_output(forward, conv, x)
                with torch.enable_grad():
                    accuracy = torch.cat([
                        replica_accuracy(forward, perturb_channels(forward, conv, start, clean, part, h.eps), y)
                        for part in torch.arange(channels, device=x.device).split(per_pass)])
                pruned[name] = least_robust(accuracy, h.prune_every)
                kept = torch.ones(channels, dtype=torch.bool, device=accuracy.device)
                kept[pruned[name]] = False
                layers[name] |= {"pruned": pruned[name], "pruned_acc": accuracy[pruned[name]],
                                 "kept_min_acc": accuracy[kept].min() if len(pruned[name]) < channels else None,
                                 "mean_acc": accuracy.mean()}
            clean_acc = replica_accuracy(forward, x[None], y)[0]
            start_acc = replica_accuracy(forward, start[None], y)[0]
        net.train(was_training)
        facts = {
            "images": len(x), "eps": h.eps, "prune_every": h.prune_every, "augmented": h.adv_augment,
            "clean_acc": float(clean_acc), "random_start_acc": float(start_acc),
            "layers": {name: {k: v.tolist() if isinstance(v, Tensor) else v for k, v in layer.items()}
                       for name, layer in layers.items()},
        }
        # one choice for all processes (each drew its own images and random start)
        self.facts = self.trainer.strategy.broadcast(facts, src=0)
        plan = {name: torch.as_tensor(layer["pruned"], dtype=torch.long)
                for name, layer in self.facts["layers"].items() if layer.get("pruned")}
        prune_feature_maps(net, plan, bn_of)
        self.facts |= {
            "pruned_total": sum(len(v) for v in plan.values()),
            "channels_total": sum(layer["channels"] for layer in self.facts["layers"].values()),
            "rated_channels": sum(layer["channels"] for layer in self.facts["layers"].values() if layer["rated"]),
            "bn_zeroed": sorted(bn_of[name] for name in plan if bn_of[name]),
            "dm_acc_pruned": self.accuracy(*self.mitigation_data("train")),  # before fine-tuning, un-augmented
        }

    # -- fine-tuning (all weights, no mask) ---------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        optimizer = torch.optim.SGD(self.net.parameters(), lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)
        epochs = self.trainer.max_epochs
        if epochs is not None and epochs >= 1:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=h.eta_min)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        steps = self.trainer.estimated_stepping_batches  # a run bounded by max_steps: anneal per step
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, int(steps) if math.isfinite(steps) else 1), eta_min=h.eta_min)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def info(self) -> dict[str, Any]:
        return self.facts
