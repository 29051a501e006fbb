"""Every registered backbone: builds with num_classes, runs at 32 and 64 px, has the module names the
spec's per-layer choices refer to, and survives a config round trip."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from lightning_modules.backbones import BACKBONES, backbone_config, build_backbone

# (module the spec names, its type) and the width of the classifier's input at 32 px (FP's layer)
SPEC_LAYERS = {
    "preact_resnet18": ([("layer4.1.conv1", nn.Conv2d), ("layer2.0.shortcut.0", nn.Conv2d),
                         ("layer2.1.bn1", nn.BatchNorm2d), ("linear", nn.Linear)], 512),
    "vgg19_bn": ([("features.49", nn.Conv2d), ("classifier.6", nn.Linear)], 25088),
    "efficientnet_b3": ([("features.8.0", nn.Conv2d), ("classifier.1", nn.Linear)], 1536),
    "mobilenet_v3_large": ([("features.16.0", nn.Conv2d), ("classifier.3", nn.Linear)], 960),
    "small_cnn": ([("linear", nn.Linear)], 128),
}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_forward_and_spec_layers(name: str) -> None:
    net = BACKBONES[name](7).eval()
    for size in (32, 64):
        assert net(torch.randn(2, 3, size, size)).shape == (2, 7)
    modules = dict(net.named_modules())
    layers, classifier_inputs = SPEC_LAYERS[name]
    for path, kind in layers:
        assert isinstance(modules.get(path), kind), f"{name}: {path} should be a {kind.__name__}"
    seen = {}

    def record_width(module, inputs) -> None:
        seen.setdefault("width", inputs[0].flatten(1).shape[1])

    handle = list(net.children())[-1].register_forward_pre_hook(record_width)
    net(torch.randn(1, 3, 32, 32))
    handle.remove()
    assert seen["width"] == classifier_inputs


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_config_round_trip(name: str) -> None:
    cls = BACKBONES[name]
    config = backbone_config(cls)
    with torch.device("meta"):  # the type is the point, not the weights (VGG-19-BN: 139.6 M parameters)
        net = build_backbone(config, 3)
    assert type(net) is cls and config == backbone_config({"class_path": config["class_path"]})


def test_partial_and_errors() -> None:
    config = backbone_config(functools.partial(BACKBONES["small_cnn"], width=8))
    assert config["init_args"] == {"width": 8} and build_backbone(config, 4).width == 8
    with pytest.raises(ValueError, match="unknown backbone .*registered"):
        build_backbone({"class_path": "lightning_modules.backbones.Nope"}, 10)
    with pytest.raises(TypeError, match="cannot record backbone"):
        backbone_config(lambda k: nn.Linear(1, k))
