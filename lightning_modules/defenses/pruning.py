"""Neuron-level tools shared by the pruning family (BNP, CLP, ANP, AWM, RNP, ...).

A "neuron" is a channel of a BatchNorm2d layer. Pruning zeroes that channel's BN weight (and bias, as the
survey's fork does), so the channel outputs exactly 0 and the pruning lives in the weights: it survives
saving and reloading with no extra state. Soft masks (ANP, AWM, RNP) are applied functionally with
`masked_forward`, which scales BN weights (and, for ANP's noise, biases) for one forward pass without
touching the module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call


def bn_layers(net: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """Every BatchNorm2d of `net` with its qualified name, in module order."""
    return [(name, m) for name, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]


@torch.no_grad()
def prune_bn_channels(net: nn.Module, channels: Mapping[str, Tensor], zero_bias: bool = True) -> int:
    """Zero BN weight (and bias) of the given channels per layer name; returns how many were pruned."""
    modules = dict(net.named_modules())
    total = 0
    for name, idx in channels.items():
        bn = modules[name]
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"{name} is a {type(bn).__name__}, not a BatchNorm2d")
        idx = torch.as_tensor(idx, dtype=torch.long, device=bn.weight.device)
        bn.weight[idx] = 0
        if zero_bias:
            bn.bias[idx] = 0
        total += len(idx)
    return total


def masked_forward(
    net: nn.Module,
    x: Tensor,
    weight_scale: Mapping[str, Tensor],
    bias_scale: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """net(x) with BN layer `name`'s weight multiplied by weight_scale[name] (per channel) and its bias by
    bias_scale[name]; gradients flow to the scales and to the weights."""
    modules = dict(net.named_modules())
    overrides: dict[str, Tensor] = {}
    for name, scale in weight_scale.items():
        overrides[f"{name}.weight"] = modules[name].weight * scale
    for name, scale in (bias_scale or {}).items():
        overrides[f"{name}.bias"] = modules[name].bias * scale
    return functional_call(net, overrides, (x,), strict=False)


class BNMasks(nn.ParameterList):
    """A learnable soft mask per BatchNorm2d channel of `net`, all ones at the start (ANP, AWM); `names[i]` is
    the BN layer of mask i, `as_dict()` maps layer names to masks (for `masked_forward`)."""

    def __init__(self, net: nn.Module, owner: str) -> None:
        layers = bn_layers(net)
        if not layers:
            raise ValueError(f"{owner} masks BatchNorm2d channels, and {type(net).__name__} has none")
        super().__init__(nn.Parameter(torch.ones_like(bn.weight)) for _, bn in layers)
        self.names = [name for name, _ in layers]

    def as_dict(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self))


def neuron_count(net: nn.Module) -> int:
    return sum(bn.num_features for _, bn in bn_layers(net))


@torch.no_grad()
def mask_summary(masks: Mapping[str, Tensor], bins: int = 10) -> dict[str, Any]:
    """JSON-friendly facts about per-neuron soft masks in [0, 1] (ANP, AWM, RNP): overall statistics, a
    histogram over [0, 1] in `bins` equal bins (the last one closed), and each layer's mean."""
    flat = torch.cat([m.detach().flatten().float().cpu() for m in masks.values()])
    levels = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    return {
        "neurons": len(flat),
        "min": float(flat.min()), "mean": float(flat.mean()), "max": float(flat.max()),
        "quantiles": {f"{q:.2f}": float(v) for q, v in zip(levels.tolist(), torch.quantile(flat, levels))},
        "histogram": {"edges": [i / bins for i in range(bins + 1)],
                      "counts": torch.histc(flat, bins=bins, min=0.0, max=1.0).long().tolist()},
        "at_zero": int((flat == 0).sum()), "at_one": int((flat == 1).sum()),
        "layer_mean": {name: float(m.float().mean()) for name, m in masks.items()},
    }
