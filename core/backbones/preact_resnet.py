"""PreAct-ResNet18 (He et al. 2016, "Identity Mappings in Deep Residual Networks") with the CIFAR stem.

3x3 stride-1 stem conv, no max-pool, pre-activation basic blocks [2, 2, 2, 2] at widths 64..512, adaptive
average pool, linear classifier. Module names follow the reference the survey used (`conv1`, `layer1.0.bn1`,
`layer2.0.shortcut.0`, `linear`, ...), so the spec's per-layer choices (CLP, NPD, NAD, MM-BD) apply as
written. No BN after the last block (as in the reference). 11.2 M parameters at 10 classes.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from core.backbones.roles import LayerRoles


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet18(nn.Module):
    """Args:
        num_classes: outputs of the linear classifier.
        width: channels of the first stage (64 in the paper); later stages double it.
    """

    layer_roles = LayerRoles(
        classifier="linear", head=("linear",),
        attention={"layer3": 500.0, "layer4": 1000.0, "avgpool": 1000.0},  # avgpool is 1x1: its term is always 0
        polarizer="layer4.1.conv1",
        activations=("BatchNorm2d",),  # its ReLUs are functional: bound the BN output, the ReLU follows
        skip_convs=("shortcut",),      # a block's bn2 follows the shortcut conv in module order, fed by conv1
        reinit={"conv1": 0.01, "layer1": 0.01, "layer2": 0.03, "layer3": 0.09, "layer4": 0.27, "linear": 0.10},
    )  # the survey's fork (NAD, NPD, MM-BD) and BCU's ResNet-18 values

    def __init__(self, num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.num_classes, self.width = num_classes, width
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        planes, layers = width, []
        for i, stride in enumerate((1, 2, 2, 2)):
            out = width * 2**i
            layers.append(nn.Sequential(PreActBlock(planes, out, stride), PreActBlock(out, out, 1)))
            planes = out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(self.avgpool(out).flatten(1))
