"""Layer roles: what the defenses need to know about a backbone's layers, declared once on the backbone.

Each backbone class sets `layer_roles = LayerRoles(...)` (module names as `named_modules()` spells them), the
way timm models declare `feature_info` and `get_classifier()`. Defenses ask `layer_roles(net)` instead of keeping
per-backbone tables; a defense config may still override its layer (a plain value, or a table keyed by backbone
class name).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class LayerRoles:
    """Args:
        classifier: the output nn.Linear (num_classes outputs); NC prunes its input neurons.
        head: every nn.Linear of the classifier head, input side first; FP ranks and prunes the input features of
            head[0], FST re-initialises them all.
        attention: {module: beta}, the modules whose output attention NAD distils and their weights.
        polarizer: the Conv2d at whose input NPD inserts its polarizer (a late conv of the feature extractor).
        activations: module class names whose outputs MM-BD bounds ...
        activations_exclude: ... except modules under these name prefixes.
        skip_convs: dotted-name parts of convs that precede a BN in module order without feeding it (CLP).
        reinit: {module-name prefix: probability}, BCU's re-initialisation growing with depth (longest prefix
            wins; must cover every Conv2d / Linear).
    """

    classifier: str
    head: tuple[str, ...]
    attention: Mapping[str, float]
    polarizer: str
    activations: tuple[str, ...]
    reinit: Mapping[str, float]
    activations_exclude: tuple[str, ...] = ()
    skip_convs: tuple[str, ...] = ()
    notes: Mapping[str, str] = field(default_factory=dict)  # why a role is what it is, by role name


def layer_roles(net: nn.Module | type) -> LayerRoles:
    """The roles a backbone (instance or class) declares, or a clear error saying how to declare them."""
    cls = net if isinstance(net, type) else type(net)
    roles = getattr(cls, "layer_roles", None)
    if not isinstance(roles, LayerRoles):
        raise ValueError(
            f"backbone {cls.__name__} declares no layer roles; set `layer_roles = LayerRoles(...)` on the class "
            f"(core/backbones/roles.py) or give the defense its layer in the config")
    return roles
