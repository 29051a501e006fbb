"""BNP: pruning by pre-activation distributions (Zheng, Tang, Li, Liu, "Pre-activation Distributions Expose
Backdoor Neurons", NeurIPS 2022).

Per BN channel, KL(N(mu_c, var_c) on clean D_m || N(running statistics)); channels with KL > mean + u * std of
their layer get BN weight and bias zeroed. No training (`trainer.max_epochs: 0`): all the work is `prepare()`.
Differs from the reference (details: docs/fidelity.md, "BNP"):
- statistics over all of D_m (`statistics: last_batch` = the fork's last shuffled batch);
- the textbook KL (`log_term: backdoorbench` = the reference's doubled log term);
- the BN's eps in both variances, so a dead channel gives a finite KL; a layer of equal KLs prunes nothing.
Defaults: configs/defense/bnp.yaml (u = 3; Tiny-ImageNet u = 4: configs/defense/tiny_imagenet/bnp.yaml).
Cost: 1 fwd per D_m sample, no bwd; measured: benchmarks/README.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_modules.defenses.base import Defense
from lightning_modules.defenses.pruning import (
    bn_layers,
    neuron_count,
    prune_bn_channels,
)

LogTerm = Literal["kl", "backdoorbench"]
LOG_FACTOR: dict[str, float] = {"kl": 0.5, "backdoorbench": 1.0}


@torch.no_grad()
def bn_input_statistics(
    net: nn.Module, batches: Iterable[Tensor], forward: Callable[[Tensor], Tensor] | None = None
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-channel mean and population variance (float64) of every BatchNorm2d's input while `forward`
    (default: `net` itself) runs on each of `batches`, combined exactly across batches (Chan et al.'s
    pairwise update). The network runs as it is: put it in eval mode for inference statistics (its BN
    running statistics then stay untouched)."""
    layers = bn_layers(net)
    count: dict[str, int] = {}
    mean: dict[str, Tensor] = {}
    m2: dict[str, Tensor] = {}  # sum of squared deviations from the mean

    def accumulate(module: nn.Module, inputs: tuple[Tensor, ...], name: str) -> None:
        x = inputs[0].detach().float()
        n = x.numel() // x.shape[1]
        var_b, mean_b = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        mean_b, m2_b = mean_b.double(), var_b.double() * n
        if name not in count:
            count[name], mean[name], m2[name] = n, mean_b, m2_b
            return
        n_a = count[name]
        total = n_a + n
        delta = mean_b - mean[name]
        mean[name] = mean[name] + delta * (n / total)
        m2[name] = m2[name] + m2_b + delta.square() * (n_a * n / total)
        count[name] = total

    handles = [bn.register_forward_pre_hook(lambda m, i, name=name: accumulate(m, i, name)) for name, bn in layers]
    try:
        for x in batches:
            (forward or net)(x)
    finally:
        for h in handles:
            h.remove()
    return {name: (mean[name], m2[name] / count[name]) for name, _ in layers if name in count}


def gaussian_kl(mu_p: Tensor, var_p: Tensor, mu_q: Tensor, var_q: Tensor, log_factor: float = 0.5) -> Tensor:
    """KL(N(mu_p, var_p) || N(mu_q, var_q)) element-wise; log_factor 0.5 is the exact KL, 1.0 BackdoorBench's."""
    return log_factor * torch.log(var_q / var_p) + (var_p + (mu_p - mu_q).square()) / (2 * var_q) - 0.5


def bn_divergences(
    net: nn.Module, stats: dict[str, tuple[Tensor, Tensor]], log_term: LogTerm = "kl"
) -> dict[str, Tensor]:
    """Per BN layer, each channel's KL(clean pre-BN statistics || running statistics), eps included."""
    modules = dict(net.named_modules())
    out = {}
    for name, (mu_c, var_c) in stats.items():
        bn = modules[name]
        mu_r, var_r = bn.running_mean.double(), bn.running_var.double()
        out[name] = gaussian_kl(mu_c, var_c + bn.eps, mu_r, var_r + bn.eps, LOG_FACTOR[log_term])
    return out


def outlier_channels(values: Tensor, u: float, rel_tol: float = 1e-6) -> tuple[Tensor, float | None]:
    """Indices with value > mean + u * std (unbiased) of the layer, and that threshold. A layer without
    spread (one channel, or values equal to within `rel_tol` of their mean: rounding noise, as in a layer
    whose inputs have died and whose KLs all come from the eps) has no outliers: threshold None."""
    spread = values.std() if values.numel() > 1 else values.new_tensor(float("nan"))
    if not spread > rel_tol * values.mean().abs():
        return values.new_zeros(0, dtype=torch.long), None
    threshold = values.mean() + u * spread
    return torch.nonzero(values > threshold).flatten(), float(threshold)


class BNP(Defense):
    """Args:
        u: per layer, prune channels whose KL exceeds mean + u * std of the layer's KLs (>= 0; 3 on CIFAR-10
            and GTSRB, 4 on Tiny-ImageNet).
        log_term: "kl" (the exact Gaussian KL, as the paper and the original code) or "backdoorbench"
            (log of the variance ratio, twice the exact term, as BackdoorBench and the survey's fork).
        augment: feed D_m with the training augmentation when collecting the clean statistics (the fork does).
        statistics: "all" (all of D_m) or "last_batch" (the last batch of a shuffled pass, as the fork).
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    family = "pruning"
    smoke_args = []

    def __init__(
        self,
        backdoored: str,
        u: float = 3.0,
        log_term: LogTerm = "kl",
        augment: bool = True,
        statistics: Literal["all", "last_batch"] = "all",
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        self.check(
            ("u", u, u >= 0 and u < float("inf"), "a finite number >= 0 (3 on CIFAR-10/GTSRB, 4 on Tiny-ImageNet)"),
            ("log_term", log_term, log_term in LOG_FACTOR, f"one of {sorted(LOG_FACTOR)}"),
            ("statistics", statistics, statistics in ("all", "last_batch"), "'all' or 'last_batch'"),
        )
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        if not bn_layers(self.net):
            raise ValueError(f"BNP prunes BatchNorm2d channels; {type(self.net).__name__} has no BatchNorm2d")
        self.pruned: dict[str, list[int]] = {}
        self.thresholds: dict[str, float | None] = {}
        self.num_images = 0

    def prepare(self) -> None:
        h = self.hparams
        x, y = self.mitigation_data("train")
        if len(x) == 0:
            raise ValueError("BNP needs clean images: D_m is empty (check data.spc / data.ratio)")
        was_training = self.net.training
        self.net.eval()
        batches = self.batches(x, y, shuffle=h.statistics == "last_batch", augment=h.augment)
        images = [xb for xb, _ in batches]
        if h.statistics == "last_batch":
            images = images[-1:]
        with self.autocast():
            stats = bn_input_statistics(self.net, images, forward=lambda xb: self.classify(xb, self.net))
        self.net.train(was_training)
        self.num_images = sum(len(xb) for xb in images)
        pruned, thresholds = {}, {}
        for name, kl in bn_divergences(self.net, stats, h.log_term).items():
            idx, thresholds[name] = outlier_channels(kl, h.u)
            pruned[name] = idx.tolist()
        # one choice for all processes (their augmented statistics passes could differ)
        self.pruned, self.thresholds = self.trainer.strategy.broadcast((pruned, thresholds), src=0)
        prune_bn_channels(self.net, {k: torch.tensor(v, dtype=torch.long) for k, v in self.pruned.items()})

    def info(self) -> dict[str, Any]:
        total = sum(len(v) for v in self.pruned.values())
        return {
            "u": self.hparams.u,
            "log_term": self.hparams.log_term,
            "statistics": self.hparams.statistics,
            "num_images": self.num_images,
            "pruned_total": total,
            "neurons_total": neuron_count(self.net),
            "pruned_per_layer": {k: len(v) for k, v in self.pruned.items()},
            "pruned_channels": {k: v for k, v in self.pruned.items() if v},
            "thresholds": self.thresholds,
        }
