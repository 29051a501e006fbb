"""The survey's torchvision architectures, randomly initialised, fed the native 32 or 64 px images.

Each class *is* the torchvision model (same module names: `features.49`, `classifier.1`, ...), only with a
typed `num_classes` constructor so configs can name it by class_path. At 32 px VGG's adaptive pool copies
the 1x1 map to 7x7 (25,088 classifier inputs) and EfficientNet / MobileNetV3 end at 1x1, as in the survey.
Parameters at 10 classes: VGG-19-BN 139.6 M (102.8 M in its first Linear), EfficientNet-B3 10.7 M,
MobileNetV3-Large 4.2 M.
"""

from __future__ import annotations

from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf
from torchvision.models.mobilenetv3 import MobileNetV3, _mobilenet_v3_conf
from torchvision.models.vgg import VGG, cfgs, make_layers

from core.backbones.roles import LayerRoles

# Beyond the survey, NAD's avgpool is the module before the classifier (a replicated 7x7 map for VGG at 32 px, 1x1
# for the other two: NAD is plain CE there, as in the fork); BCU's probabilities (not in its paper) follow the
# ResNet-18 progression by stage: 0.01 for the first stages, 0.27 for the last, 0.10 for the classifier.


class VGG19BN(VGG):
    layer_roles = LayerRoles(
        classifier="classifier.6", head=("classifier.0", "classifier.3", "classifier.6"),
        attention={"avgpool": 1000.0}, polarizer="features.49",
        activations=("ReLU",), activations_exclude=("classifier",),
        reinit={**{f"features.{i}": 0.01 for i in (0, 3)}, **{f"features.{i}": 0.03 for i in (7, 10)},
                **{f"features.{i}": 0.09 for i in (14, 17, 20, 23)},
                **{f"features.{i}": 0.27 for i in (27, 30, 33, 36, 40, 43, 46, 49)}, "classifier": 0.10},
    )

    def __init__(self, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__(make_layers(cfgs["E"], batch_norm=True), num_classes=num_classes, dropout=dropout)
        self.num_classes, self.dropout = num_classes, dropout


class EfficientNetB3(EfficientNet):
    layer_roles = LayerRoles(
        classifier="classifier.1", head=("classifier.1",),
        attention={"avgpool": 1000.0}, polarizer="features.8.0",
        activations=("SiLU",),  # SE blocks included
        reinit={**{f"features.{i}": 0.01 for i in (0, 1, 2)}, "features.3": 0.03,
                **{f"features.{i}": 0.09 for i in (4, 5)}, **{f"features.{i}": 0.27 for i in (6, 7, 8)},
                "classifier": 0.10},
    )

    def __init__(self, num_classes: int, dropout: float = 0.3) -> None:
        setting, last_channel = _efficientnet_conf("efficientnet_b3", width_mult=1.2, depth_mult=1.4)
        super().__init__(setting, dropout=dropout, num_classes=num_classes, last_channel=last_channel)
        self.num_classes, self.dropout = num_classes, dropout


class MobileNetV3Large(MobileNetV3):
    layer_roles = LayerRoles(
        classifier="classifier.3", head=("classifier.0", "classifier.3"),
        attention={"avgpool": 1000.0}, polarizer="features.16.0",
        activations=("Hardswish", "ReLU"), activations_exclude=("classifier",),
        reinit={**{f"features.{i}": 0.01 for i in range(0, 4)}, **{f"features.{i}": 0.03 for i in range(4, 7)},
                **{f"features.{i}": 0.09 for i in range(7, 13)}, **{f"features.{i}": 0.27 for i in range(13, 17)},
                "classifier": 0.10},
    )

    def __init__(self, num_classes: int, dropout: float = 0.2) -> None:
        setting, last_channel = _mobilenet_v3_conf("mobilenet_v3_large")
        super().__init__(setting, last_channel, num_classes=num_classes, dropout=dropout)
        self.num_classes, self.dropout = num_classes, dropout
