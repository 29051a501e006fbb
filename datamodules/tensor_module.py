"""The base of this project's DataModules: named parts held as uint8 tensors, on the accelerator when it is a GPU."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from datamodules.loader import TensorImages


class TensorDataModule(L.LightningDataModule):
    """Subclasses fill `self._sets` (part name -> TensorImages) in `setup`, moved to `self._device()`."""

    def __init__(self, on_device: bool = True) -> None:
        super().__init__()
        self.on_device = on_device
        self._sets: dict[str, TensorImages] = {}

    def _device(self) -> torch.device:
        if self.on_device and self.trainer is not None and self.trainer.strategy.root_device.type == "cuda":
            return self.trainer.strategy.root_device
        return torch.device("cpu")

    def tensors(self, part: str) -> tuple[Tensor, ...]:
        """The tensors of one part, e.g. (images, labels); see the subclass for its parts."""
        if part not in self._sets:
            raise KeyError(f"no {part!r} data (have {sorted(self._sets)}; call setup() first)")
        return self._sets[part].tensors
