"""Reading a network's intermediate values by module name (forward hooks that are always removed), and the
per-backbone layer settings defenses take from the backbone's layer roles."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from core.backbones import BACKBONES, LayerRoles, layer_roles


@contextmanager
def capture(net: nn.Module, names: list[str], what: str = "output") -> Iterator[dict[str, Tensor]]:
    """Within the block, `store[name]` holds the latest input (first positional) or output of each module.

    with capture(net, ["layer3", "layer4"]) as store:
        logits = net(x)
    store["layer4"]  # (B, 512, 4, 4)
    """
    if what not in ("input", "output"):
        raise ValueError(f"what must be 'input' or 'output', got {what!r}")
    modules = dict(net.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"{type(net).__name__} has no module(s) {missing}")
    store: dict[str, Tensor] = {}
    handles = []
    for name in names:
        if what == "output":
            def hook(module, inputs, output, name=name):
                store[name] = output
            handles.append(modules[name].register_forward_hook(hook))
        else:
            def pre_hook(module, inputs, name=name):
                store[name] = inputs[0]
            handles.append(modules[name].register_forward_pre_hook(pre_hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def layer_setting(net: nn.Module, override: Any, role: Callable[[LayerRoles], Any], what: str, config: str) -> Any:
    """A defense's layer setting for `net`: what its backbone's layer roles say (`override` None), the override as
    given (one value for this run's backbone), or its entry for the backbone (a table keyed by class names)."""
    backbone = type(net).__name__
    if override is None:
        try:
            return role(layer_roles(net))
        except ValueError as err:
            raise ValueError(f"{err.args[0]} (the {what}: {config})") from None
    names = {cls.__name__ for cls in BACKBONES.values()} | {backbone}
    if isinstance(override, Mapping) and override and set(override) & names:
        if backbone not in override:
            raise ValueError(f"no {what} configured for backbone {backbone}; add `{backbone}: ...` to it in {config} "
                             f"or drop the table to use the backbone's layer roles (configured: {sorted(override)})")
        return override[backbone]
    return override
