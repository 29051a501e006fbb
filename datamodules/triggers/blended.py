"""Blended (Chen et al. 2017): x' = (1 - alpha) x + alpha T, rounded to the nearest integer and clipped.

alpha = 0.2 at training and test time (BackdoorBench). T defaults to a seeded uniform-noise image (the
original paper's random pattern), generated at the image size; `image` takes any picture instead, resized
bilinearly to H x W: a file path, or the resource name `hello_kitty` (BackdoorBench's
resource/blended/hello_kitty.jpeg, the picture the survey used; configs/attack/survey/blended.yaml), which is
fetched once into `<data_dir>/triggers/blended/` and sha256-checked (datamodules/resources.py). The resolved
picture travels in checkpoints, so a run rebuilds without the file. The reference truncates the blend to
uint8; we round, which differs by at most one grey level. Cost: one fused blend per batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from datamodules.resources import resolve_file
from datamodules.triggers.base import Trigger, check_images, to_uint8


def apply_blended(x: Tensor, pattern: Tensor, alpha: float) -> Tensor:
    """Blend uint8 images (B, C, H, W) with a uint8 pattern (C, H, W)."""
    t = pattern.to(device=x.device, dtype=torch.float32)
    return to_uint8((1.0 - alpha) * x.float() + alpha * t)


def noise_pattern(shape: tuple[int, int, int], seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.int64).to(torch.uint8)


class Blended(Trigger):
    """Args:
        alpha: blend weight of the pattern, in [0, 1].
        image: a picture to blend: a file path, or a registered resource name (`hello_kitty`) found in the
            run's data folder (given by `bind_run`; `data` for a trigger used without one) and downloaded
            there once when missing; None: uniform noise drawn with `seed`.
        seed: seed of the noise pattern.
    """

    def __init__(self, alpha: float = 0.2, image: str | None = None, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Blended alpha must lie in [0, 1], got {alpha}")
        self.alpha, self.image, self.seed = alpha, image, seed
        self._patterns: dict[str, Tensor] = {}  # "CxHxW" -> pattern; saved as extra state

    def pattern(self, shape: tuple[int, int, int]) -> Tensor:
        key = "x".join(map(str, shape))
        if key not in self._patterns:
            if self.image is None:
                self._patterns[key] = noise_pattern(shape, self.seed)
            else:
                channels, height, width = shape
                with Image.open(resolve_file(self.image, self._data_dir, "Blended image")) as img:
                    img = img.convert("RGB").resize((width, height), Image.BILINEAR)
                    arr = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[:channels]
                self._patterns[key] = arr.contiguous()
        return self._patterns[key]

    def forward(self, x: Tensor) -> Tensor:
        check_images(x)
        return apply_blended(x, self.pattern(tuple(x.shape[1:])), self.alpha)

    def fit(self, x_train: Tensor, y_train: Tensor) -> None:
        # resolve the picture at the run's image size now: the DataModule hashes `record()` (with this state)
        # for its cache key and the checkpoint stores it, even when the poisoned set comes from the cache
        self.pattern(tuple(x_train.shape[1:]))

    # The resolved picture travels with checkpoints, so a run can be evaluated without the image file.
    def get_extra_state(self) -> Any:
        return {k: v.cpu() for k, v in self._patterns.items()} if self.image is not None else {}

    def set_extra_state(self, state: Any) -> None:
        self._patterns.update(state or {})
