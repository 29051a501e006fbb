"""BadNets (Gu et al. 2017): a small patch replaces the pixels under it.

Default as in BackdoorBench: a 3x3 white (255) square in the bottom-right corner of a 32x32 image (rows and
columns 29..31). `patch_size=None` scales the square with the image (3 px per 32 px: 6x6 at 64x64, where the
reference resizes its trigger picture to a 5x5 core plus a grey ramp). `image` takes a trigger picture
instead: a file path, or the resource name `badnet_trigger` (BackdoorBench's resource/badnet/trigger_image.png,
fetched once into `<data_dir>/triggers/badnet/` and sha256-checked, datamodules/resources.py;
configs/attack/survey/badnets.yaml). It is resized to the image size bilinearly, as the reference does (at 32 px
`badnet_trigger` is exactly the default square; at 64 px a 5x5 white core with a 2 px grey ramp), and every
nonzero pixel replaces the image pixel; the resolved picture travels in the checkpoint (extra state), so a run
can be evaluated without the file. Cost: one `torch.where` per batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from datamodules.resources import resolve_file
from datamodules.triggers.base import Trigger, check_images


def apply_badnets(x: Tensor, pattern: Tensor, mask: Tensor) -> Tensor:
    """x' = pattern where mask else x, for uint8 x (B, C, H, W), pattern (C, H, W), bool mask (1|C, H, W)."""
    return torch.where(mask.to(x.device), pattern.to(x.device), x)


def square_patch(
    shape: tuple[int, int, int], patch_size: int, value: int, top: int, left: int
) -> tuple[Tensor, Tensor]:
    channels, height, width = shape
    if not (0 <= top and top + patch_size <= height and 0 <= left and left + patch_size <= width):
        raise ValueError(
            f"BadNets patch of {patch_size} px at (top={top}, left={left}) does not fit a {height}x{width} image"
        )
    mask = torch.zeros(1, height, width, dtype=torch.bool)
    mask[:, top : top + patch_size, left : left + patch_size] = True
    pattern = torch.full((channels, height, width), value, dtype=torch.uint8)
    return pattern, mask


class BadNets(Trigger):
    """Args:
        patch_size: side of the square in pixels; None: 3 px per 32 px of image side.
        value: pixel value of the square, 0..255.
        top, left: position of the square's top-left corner; None: flush with the bottom / right edge.
        image: a trigger picture whose nonzero pixels replace the image (overrides the square): a file path, or
            a registered resource name (`badnet_trigger`) found in the run's data folder (given by `bind_run`;
            `data` for a trigger used without one) and downloaded there once when missing.
    """

    def __init__(
        self,
        patch_size: int | None = None,
        value: int = 255,
        top: int | None = None,
        left: int | None = None,
        image: str | None = None,
    ) -> None:
        super().__init__()
        if patch_size is not None and patch_size < 1:
            raise ValueError(f"BadNets patch_size must be >= 1 pixel, got {patch_size}")
        if not 0 <= value <= 255:
            raise ValueError(f"BadNets value must be a pixel value in 0..255, got {value}")
        self.patch_size, self.value, self.top, self.left, self.image = patch_size, value, top, left, image
        self._cache: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}

    def pattern_and_mask(self, shape: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
        if shape not in self._cache:
            if self.image is not None:
                self._cache[shape] = _picture_patch(resolve_file(self.image, self._data_dir, "BadNets image"), shape)
            else:
                size = self.patch_size or max(1, round(3 * shape[1] / 32))
                top = shape[1] - size if self.top is None else self.top
                left = shape[2] - size if self.left is None else self.left
                self._cache[shape] = square_patch(shape, size, self.value, top, left)
        return self._cache[shape]

    def forward(self, x: Tensor) -> Tensor:
        check_images(x)
        return apply_badnets(x, *self.pattern_and_mask(tuple(x.shape[1:])))

    def fit(self, x_train: Tensor, y_train: Tensor) -> None:
        # resolve a picture at the run's image size before the DataModule hashes `record()` and the
        # checkpoint stores it (also when the poisoned set comes from the cache)
        if self.image is not None:
            self.pattern_and_mask(tuple(x_train.shape[1:]))

    def get_extra_state(self) -> Any:
        if self.image is None:  # the square is rebuilt from the arguments
            return {}
        return {"x".join(map(str, k)): v.cpu() for k, (v, _) in self._cache.items()}

    def set_extra_state(self, state: Any) -> None:
        for key, pattern in (state or {}).items():
            self._cache[tuple(int(v) for v in key.split("x"))] = (pattern, pattern != 0)


def _picture_patch(path: str, shape: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    channels, height, width = shape
    with Image.open(path) as img:
        img = img.convert("RGB").resize((width, height), Image.BILINEAR)
        arr = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[:channels]
    return arr.contiguous(), arr != 0
