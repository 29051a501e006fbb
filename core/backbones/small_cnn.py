"""A small conv-BN-ReLU network for CPU experiments and tests (not in the survey).

Five 3x3 convs in three stages (w, w | 2w, 2w | 4w channels, max-pool after each stage), global average
pool, linear classifier: the same ingredients as the paper backbones (BN neurons for the pruning
defenses, a final Linear for FP/FST, ReLUs for MM-BD). 0.14 M parameters at width 32.
Throughput: benchmarks/README.md.
"""

from __future__ import annotations

from torch import Tensor, nn

from core.backbones.roles import LayerRoles


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Args:
        num_classes: outputs of the linear classifier.
        width: channels of the first stage.
    """

    # not in the survey: each role follows the PreAct-ResNet18 recipe (NAD: the ReLUs ending stages 2 and 3; NPD:
    # the last conv; BCU: the ResNet-18 progression, one step per conv)
    layer_roles = LayerRoles(
        classifier="linear", head=("linear",),
        attention={"features.12": 500.0, "features.16": 1000.0},
        polarizer="features.14",
        activations=("ReLU",),
        reinit={"features.0": 0.01, "features.3": 0.01, "features.7": 0.03, "features.10": 0.09,
                "features.14": 0.27, "linear": 0.10},
    )

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.num_classes, self.width = num_classes, width
        w = width
        self.features = nn.Sequential(
            *conv_bn_relu(3, w), *conv_bn_relu(w, w), nn.MaxPool2d(2),
            *conv_bn_relu(w, 2 * w), *conv_bn_relu(2 * w, 2 * w), nn.MaxPool2d(2),
            *conv_bn_relu(2 * w, 4 * w), nn.MaxPool2d(2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.avgpool(self.features(x)).flatten(1))
