"""Backbones: plain `nn.Module`s taking `num_classes` first, each declaring its `layer_roles`; no Lightning.

`BACKBONES` is their registry (tests and the grid run over it; register your own with
`BACKBONES.register("name", Class)`). `backbone_config` and `build_backbone` turn a backbone factory into a
checkpoint-safe {class_path, init_args} and back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from core.backbones.preact_resnet import PreActResNet18
from core.backbones.roles import LayerRoles, layer_roles
from core.backbones.small_cnn import SmallCNN
from core.backbones.torchvision_nets import VGG19BN, EfficientNetB3, MobileNetV3Large
from core.registry import Registry, class_path, import_class

BACKBONES: Registry[type[nn.Module]] = Registry("backbone", nn.Module, {"layer_roles": None})
for _name, _cls in (("preact_resnet18", PreActResNet18), ("vgg19_bn", VGG19BN), ("efficientnet_b3", EfficientNetB3),
                    ("mobilenet_v3_large", MobileNetV3Large), ("small_cnn", SmallCNN)):
    BACKBONES.register(_name, _cls)

# checkpoints written before the backbones moved to core/ name them by their old module
_MOVED = "lightning_modules.backbones"


def backbone_config(factory: Callable[[int], nn.Module] | dict[str, Any]) -> dict[str, Any]:
    """{class_path, init_args} of a backbone factory: a config dict (LightningCLI hparams), a class, or a
    functools.partial of a class (what jsonargparse builds for `Callable[[int], nn.Module]`)."""
    if isinstance(factory, dict) and "class_path" in factory:
        return {"class_path": class_path(resolve(factory["class_path"])),
                "init_args": dict(factory.get("init_args") or {})}
    if isinstance(factory, type) and issubclass(factory, nn.Module):
        return {"class_path": class_path(factory), "init_args": {}}
    if isinstance(factory, functools.partial):
        cls = next((a for a in (factory.func, *factory.args) if isinstance(a, type) and issubclass(a, nn.Module)), None)
        if cls is not None:
            return {"class_path": class_path(cls), "init_args": dict(factory.keywords)}
    raise TypeError(
        f"cannot record backbone {factory!r}: give a backbone class, functools.partial(Class, **kwargs), "
        f"or a {{class_path, init_args}} config"
    )


def current_class_path(path: str) -> str:
    """A recorded backbone class path as it is spelled today (those of backbones that moved to core/ are renamed)."""
    if path.startswith(_MOVED + "."):
        return class_path(resolve(path))
    return path


def resolve(path: str) -> type[nn.Module]:
    """The backbone class a dotted path names (a registered name such as small_cnn, or a class path)."""
    if path in BACKBONES:
        return BACKBONES[path]
    if path.startswith(_MOVED + "."):
        name = path.rpartition(".")[2]
        moved = [c for c in BACKBONES.values() if c.__name__ == name]
        if moved:
            return moved[0]
    try:
        return import_class(path, nn.Module, "backbone")
    except ValueError as err:
        raise ValueError(f"{err.args[0]}; registered: {', '.join(class_path(c) for c in BACKBONES.values())}") from None


def build_backbone(config: dict[str, Any], num_classes: int) -> nn.Module:
    return resolve(config["class_path"])(num_classes, **config.get("init_args", {}))


__all__ = ["BACKBONES", "EfficientNetB3", "LayerRoles", "MobileNetV3Large", "PreActResNet18", "SmallCNN", "VGG19BN",
           "backbone_config", "build_backbone", "class_path", "current_class_path", "layer_roles", "resolve"]
