"""CLP: channel Lipschitzness-based pruning (Zheng, Zhang, Sun, Ma, "Data-free Backdoor Removal based on Channel
Lipschitzness", ECCV 2022). Data-free.

Per conv channel followed by a BN, UCLC_k = sigma_max(W_k) * |gamma_k / sigma_k|; channels above mean + u * std
of their layer get BN weight and bias zeroed. Reads only the weights (`trainer.max_epochs: 0`). A BN is paired
with the last Conv2d before it in module order, skipping the backbone's `layer_roles.skip_convs`
(core/backbones/; `skip_convs` in the config); unpaired BNs are listed in `info()["unpaired"]`.
Differs from the reference (details: docs/fidelity.md, "CLP"):
- PreAct downsampling blocks: bn1 is paired with conv2, not the 1x1 shortcut conv (a bug there);
- sigma includes the BN's eps (the reference gives inf/nan for a dead channel);
- singular values batched per layer (`torch.linalg.matrix_norm(ord=2)`), not one SVD per channel.
Defaults: configs/defense/clp.yaml (u = 3 on every dataset, as the fork).
Cost: no fwd/bwd passes; one small SVD per channel; measured: benchmarks/README.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_modules.defenses.base import Defense
from lightning_modules.defenses.hooks import layer_setting
from lightning_modules.defenses.pruning import neuron_count, prune_bn_channels


def conv_bn_pairs(net: nn.Module, skip_convs: Sequence[str] = ()) -> tuple[list[tuple[str, str]], list[str]]:
    """((conv_name, bn_name) pairs, unpaired BN names): each BatchNorm2d with the last Conv2d before it in
    module order, ignoring convs with a dotted-name part in `skip_convs` (e.g. "shortcut")."""
    pairs, unpaired = [], []
    conv: tuple[str, nn.Conv2d] | None = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d) and not set(name.split(".")) & set(skip_convs):
            conv = (name, module)
        elif isinstance(module, nn.BatchNorm2d):
            if conv is None:
                unpaired.append(name)
                continue
            if conv[1].out_channels != module.num_features:
                raise ValueError(
                    f"{name} ({module.num_features} channels) follows conv {conv[0]} ({conv[1].out_channels} "
                    f"channels) in module order but cannot normalise its output; list the conv that does not "
                    f"feed it in skip_convs for {type(net).__name__} (configs/defense/clp.yaml)"
                )
            pairs.append((conv[0], name))
    return pairs, unpaired


@torch.no_grad()
def uclc(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tensor:
    """Upper bound of each channel's Lipschitz constant through conv then BN: (C_out,) float32."""
    weight = conv.weight.detach().float()
    spectral = torch.linalg.matrix_norm(weight.reshape(weight.shape[0], weight.shape[1], -1), ord=2)
    sigma = torch.sqrt(bn.running_var.float() + bn.eps)
    return spectral * (bn.weight.detach().float() / sigma).abs()


def lipschitz_outliers(values: Tensor, u: float) -> Tensor:
    """Indices of channels with value > mean + u * std (unbiased) of their layer."""
    if values.numel() < 2:
        return values.new_zeros(0, dtype=torch.long)
    return torch.nonzero(values > values.mean() + u * values.std()).flatten()


class CLP(Defense):
    """Args:
        u: prune channels whose UCLC exceeds their layer's mean + u * std (3 in the survey's fork).
        skip_convs: dotted-name parts of convs not to pair with a following BN (PreActResNet18: the 1x1
            "shortcut" convs; or a table of them by backbone class name); see `conv_bn_pairs`. None: the
            backbone's `layer_roles.skip_convs`.
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    family = "pruning"
    smoke_args = []

    def __init__(
        self,
        backdoored: str,
        u: float = 3.0,
        skip_convs: list[str] | dict[str, list[str]] | None = None,
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        self.check(("u", u, math.isfinite(u) and u >= 0,
                    "a finite number >= 0 (threshold in standard deviations above the layer mean)"))
        skip = layer_setting(self.net, skip_convs, lambda r: r.skip_convs, "skip_convs entry",
                             "configs/defense/clp.yaml")
        self.pairs, self.unpaired = conv_bn_pairs(self.net, list(skip))
        if not self.pairs:
            raise ValueError(f"{type(self.net).__name__} has no conv -> BatchNorm2d pair: CLP has nothing to prune")
        self.pruned: dict[str, list[int]] = {}

    def prepare(self) -> None:
        modules = dict(self.net.named_modules())
        self.pruned = {bn: lipschitz_outliers(uclc(modules[conv], modules[bn]), self.hparams.u).tolist()
                       for conv, bn in self.pairs}
        prune_bn_channels(self.net, {bn: idx for bn, idx in self.pruned.items() if idx})

    def info(self) -> dict[str, Any]:
        total = sum(len(v) for v in self.pruned.values())
        return {
            "u": self.hparams.u, "sigma": "sqrt(running_var + eps)",
            "pruned_total": total, "neurons": neuron_count(self.net),
            "pruned": {bn: idx for bn, idx in self.pruned.items() if idx},
            "pairs": [list(p) for p in self.pairs], "unpaired": self.unpaired,
        }
