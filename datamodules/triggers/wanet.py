"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible warp of the whole image as the trigger.

A k x k x 2 field of uniform noise in [-1, 1] is normalised to mean |noise| = 1, upsampled bicubically
(align_corners=True) to H x W, and added to the identity sampling grid: grid = clamp(identity + s * noise / H,
-1, 1); x' = grid_sample(x, grid, bilinear, align_corners=True), rounded and clipped to uint8.
Defaults k = 4, s = 0.5 (BackdoorBench; the survey used them unchanged). The field is drawn once from a
CPU generator seeded with `seed` and kept as a buffer, so checkpoints carry it and every device draws the
same one; the grid is rebuilt at the size of the images it is applied to (a few microseconds).
Differs from the reference: we round the warped images to uint8 (the trigger contract), at most half a grey
level away from the reference's float images; offsets are divided by H for both axes, as the reference
does (all datasets here are square). `warp` and `cross_grids` are shared with the training-controlled
attack (lightning_modules/attacks/wanet.py), which adds the noise-mode ("cross") samples.
Cost: one bilinear grid_sample per batch; measured: benchmarks/README.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.triggers.base import Trigger, check_images, to_uint8


def warp_noise(k: int, seed: int) -> Tensor:
    """The k x k x 2 field as (1, 2, k, k): uniform in [-1, 1], scaled to mean |noise| = 1."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 2, k, k, generator=gen) * 2 - 1
    return noise / noise.abs().mean()


def warp_grid(noise: Tensor, height: int, width: int, strength: float) -> Tensor:
    """The sampling grid (1, H, W, 2) in grid_sample's [-1, 1] coordinates (last dim: x = column, y = row)."""
    field = F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    rows = torch.linspace(-1, 1, height, device=noise.device)
    cols = torch.linspace(-1, 1, width, device=noise.device)
    identity = torch.stack(torch.meshgrid(cols, rows, indexing="xy"), dim=-1)[None]  # (1, H, W, [x, y])
    return (identity + strength * field / height).clamp_(-1, 1)


def cross_grids(grid: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """n noise-mode grids (n, H, W, 2): the warp grid plus per-pixel uniform(-1, 1) / H offsets, clamped."""
    _, height, width, _ = grid.shape
    offsets = torch.rand(n, height, width, 2, device=grid.device, generator=generator) * 2 - 1
    return (grid + offsets / height).clamp_(-1, 1)


def warp(x: Tensor, grid: Tensor) -> Tensor:
    """uint8 images (B, C, H, W) resampled at `grid` (1 or B, H, W, 2), rounded back to uint8."""
    grid = grid.to(x.device).expand(len(x), -1, -1, -1)
    return to_uint8(F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True))


def apply_wanet(x: Tensor, noise: Tensor, strength: float) -> Tensor:
    """Warp uint8 images (B, C, H, W) with the field `noise` (1, 2, k, k) at `strength`."""
    return warp(x, warp_grid(noise.to(x.device), x.shape[-2], x.shape[-1], strength))


class WaNetTrigger(Trigger):
    """Args:
        k: side of the random control field (k x k x 2), upsampled to the image size.
        strength: s, the warp magnitude (0 leaves images unchanged).
        seed: seed of the control field.
    """
    display_name = "WaNet"
    dynamic = True  # the trigger depends on the image

    def __init__(self, k: int = 4, strength: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"WaNet k (side of the control field) must be an integer >= 1, got {k!r}")
        if strength < 0:
            raise ValueError(f"WaNet strength s must be >= 0 (0: no warp; the paper uses 0.5), got {strength}")
        self.k, self.strength, self.seed = k, strength, seed
        self.register_buffer("noise", warp_noise(k, seed))

    def grid(self, height: int, width: int) -> Tensor:
        """The warp grid (1, H, W, 2) for H x W images, on the trigger's device."""
        return warp_grid(self.noise, height, width, self.strength)

    def forward(self, x: Tensor) -> Tensor:
        check_images(x)
        return apply_wanet(x, self.noise, self.strength)


def __getattr__(name: str) -> type[WaNetTrigger]:
    # checkpoints written before the rename record the trigger as datamodules.triggers.wanet.WaNet, the name of
    # its attack system (lightning_modules.attacks.WaNet) too; `build_trigger` still finds it here. A function,
    # not an alias, so that the package scan (datamodules/triggers/__init__.py) sees one Trigger class per file.
    if name == "WaNet":
        return WaNetTrigger
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
