"""The trigger contract: clean uint8 images in, triggered uint8 images out, batched, on any device.

A trigger is an `nn.Module` so that learned or file-based state (a blend image, a warp grid, a generator)
travels inside checkpoints; `config()` gives the constructor arguments, which every trigger keeps as
attributes of the same names, so a run can rebuild it with `build_trigger(record)`.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class Trigger(nn.Module):
    """Base class. Subclasses implement `forward(x: uint8[B, C, H, W]) -> uint8[B, C, H, W]`."""

    clean_label: ClassVar[bool] = False  # True: poison only target-class images and keep their labels
    # Registry metadata (TRIGGERS.meta): the attack's name in tables and figures (None: the class name), and
    # whether the trigger depends on the image (the survey's static vs dynamic split).
    display_name: ClassVar[str | None] = None
    dynamic: ClassVar[bool] = False
    from_record: bool = False  # set by build_trigger: the state came from a checkpoint, nothing to fit
    _data_dir: str = "data"  # where resource names (datamodules/resources.py) are looked up; the run's, once bound

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def fit(self, x_train: Tensor, y_train: Tensor) -> None:
        """Learn whatever the trigger needs from the clean training set (uint8 (N, C, H, W), labels (N,)).

        `BackdoorDataModule.setup` calls this once, before any image is triggered, unless the trigger was
        rebuilt from a record (its state is then already learned). A no-op for fixed triggers; SSBA trains its
        encoder here, so a trigger never needs to load the dataset by name."""

    def bind_run(self, dataset: str, target: int, data_dir: str, backbone: dict[str, Any] | None) -> None:
        """Learn which run this trigger poisons (dataset name, target class, data folder, the victim's backbone
        {class_path, init_args} or None), filling settings left to the run and raising where an explicit one
        contradicts it. `BackdoorDataModule.setup` calls it before `fit`. Here: resource names (Blended's
        `hello_kitty`, BadNets' `badnet_trigger`) are then looked up in the run's data folder; LF also generates
        its pattern for the run's dataset and target against a surrogate of the run's backbone."""
        self._data_dir = data_dir

    def report(self) -> dict[str, Any]:
        """Plain facts about how the trigger was made (SSBA: encoder cost, bit accuracy, PSNR; LF: fooling
        rates), stored in the backdoor record and printed by `BackdoorDataModule.setup`; {} for fixed ones."""
        return {}

    def config(self) -> dict[str, Any]:
        """{'class_path', 'init_args'} that rebuild this trigger (state aside)."""
        params = inspect.signature(type(self).__init__).parameters
        init_args = {k: getattr(self, k) for k in params if k != "self"}
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": init_args}

    def record(self) -> dict[str, Any]:
        """What a checkpoint stores: the config plus the state (tensors only)."""
        return {**self.config(), "state": _to_cpu(dict(self.state_dict()))}

    @torch.no_grad()
    def apply_chunked(self, x: Tensor, chunk: int = 4096) -> Tensor:
        """Apply to a large uint8 tensor chunk by chunk, bounding the memory of float intermediates."""
        check_images(x)
        if len(x) == 0:
            return x.clone()
        return torch.cat([self(x[i : i + chunk]) for i in range(0, len(x), chunk)])


def check_images(x: Tensor) -> None:
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise TypeError(f"triggers take uint8 images of shape (B, C, H, W); got {x.dtype} {tuple(x.shape)}")


def build_trigger(record: dict[str, Any]) -> Trigger:
    """Rebuild a trigger from `Trigger.record()` (only `Trigger` subclasses are accepted)."""
    module_name, _, cls_name = record["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"unknown trigger class {record['class_path']!r} in checkpoint: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, Trigger)):
        raise ValueError(f"{record['class_path']!r} is not a Trigger subclass")
    trigger = cls(**record.get("init_args", {}))
    if record.get("state"):
        trigger.load_state_dict(record["state"])
    trigger.from_record = True  # learned state restored: BackdoorDataModule skips `fit`
    return trigger


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def to_uint8(x: Tensor) -> Tensor:
    """Round to the nearest integer and clip to 0..255."""
    return x.round_().clamp_(0, 255).to(torch.uint8)
