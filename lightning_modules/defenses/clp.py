"""CLP: channel Lipschitzness-based pruning (Zheng, Zhang, Sun, Ma, ECCV 2022), data-free.

For every conv channel k followed by a BatchNorm, the upper bound of its channel Lipschitz constant is
UCLC_k = sigma_max(W_k reshaped to (C_in / groups, kh * kw)) * |gamma_k / sigma_k|, sigma_k = sqrt(running_var_k
+ eps), i.e. the BN's actual divisor. Within each BN layer the channels with UCLC > mean + u * std (unbiased
std, as torch.std in the reference) are pruned by zeroing their BN weight and bias: they then output exactly 0
and the pruning lives in the weights (no extra state). u = 3 on every dataset (the survey's fork; BackdoorBench
uses 5 on Tiny-ImageNet). No data at all: `prepare()` reads only the weights, and the config sets
`trainer.max_epochs: 0`, so one run per attacked model serves every SPC and split.

Which conv a BN belongs to (`conv_bn_pairs`): the last Conv2d before the BN in module order, skipping the
convs named in `skip_convs[<backbone>]` (configs/defense/clp.yaml). Module order follows the data flow in
every conv->BN net here (VGG19BN, EfficientNetB3, MobileNetV3Large, SmallCNN; tests/test_clp.py checks that
against a torch.fx trace). In PreActResNet18 bn2 gets conv1 of its block and bn1, which normalises a residual
sum, gets the previous block's conv2 (layer1.0.bn1 the stem conv1), as in the reference; the 1x1 shortcut
convs are skipped, so the bn1 right after each downsampling block (layer2.1, layer3.1, layer4.1) gets
layer<k>.0.conv2 where the reference wrongly takes layer<k>.0.shortcut.0. A BN with no conv before it is
skipped and listed in `info()["unpaired"]`; a pair whose channel counts differ is a configuration error.

Differences from the reference: sigma includes the BN's eps (the reference divides by sqrt(running_var),
which is inf for a dead channel with zero variance: the layer's mean and std then become inf/nan and
nothing in that layer is pruned; elsewhere the two agree to ~1e-5 relative); the downsampling pairing above;
singular values batched over all channels of a layer (`torch.linalg.matrix_norm(ord=2)`), not one SVD per
channel in a Python loop.

Cost: a few hundred SVDs of small matrices. CPU time of `prepare()` on 2 CPU cores (untrained weights, 10
classes): PreActResNet18 0.15 s, VGG19BN 0.18 s, EfficientNetB3 0.36 s, MobileNetV3Large 0.11 s, SmallCNN
0.02 s (wall 0.1-2.6 s on a machine shared with other jobs, load average ~15).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_modules.defenses.base import Defense
from lightning_modules.defenses.hooks import for_backbone
from lightning_modules.defenses.pruning import neuron_count, prune_bn_channels

# Convs that never feed a BN directly although they precede one in module order (the configs spell it out).
SKIP_CONVS: dict[str, list[str]] = {
    "PreActResNet18": ["shortcut"],
    "VGG19BN": [],
    "EfficientNetB3": [],
    "MobileNetV3Large": [],
    "SmallCNN": [],
}


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
        skip_convs: per backbone class name, dotted-name parts of convs not to pair with a following BN
            (PreActResNet18: the 1x1 "shortcut" convs); see `conv_bn_pairs`. None: `SKIP_CONVS`.
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    def __init__(
        self,
        backdoored: str,
        u: float = 3.0,
        skip_convs: dict[str, list[str]] | None = None,
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        if not (math.isfinite(u) and u >= 0):
            raise ValueError(f"u (threshold in standard deviations above the layer mean) must be >= 0, got {u}")
        skip = for_backbone(SKIP_CONVS if skip_convs is None else skip_convs, self.backdoor_record,
                            "skip_convs entry", "configs/defense/clp.yaml")
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
