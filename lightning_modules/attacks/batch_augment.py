"""The batch augmentation WaNet and BPP apply after poisoning (the reference's `PostTensorTransform`), and
what else these two attacks share.

Random crop (zero padding 5 px, applied with probability 0.8), random rotation (uniform in +-10 degrees,
nearest neighbour, probability 0.5), then a horizontal flip with probability 0.5 where the dataset allows
flips (CIFAR-10 only: `DataSpec.hflip`). These attacks train without the per-image crop/flip of victim
training: their training loader serves the test transform.

One random draw per batch, by default. The survey ran BackdoorBench, whose PostTensorTransform wraps
torchvision's RandomCrop / RandomRotation / RandomHorizontalFlip and calls them on the whole batch tensor:
torchvision draws one crop window, one angle and one flip decision per call, and `ProbTransform` one
apply-or-not decision per batch, so all images of a batch move together. (The original WaNet and BPP code
used kornia's augmentations, which draw crop, angle and flip per image and only the apply-or-not decision
per batch.) `same_on_batch=False` draws everything per image instead, the usual meaning of augmentation.
Per-batch draws come from torch's global CPU generator (seeded by `seed_everything`, no device sync);
per-image draws from the batch's device generator.

The reference transforms normalised tensors, so its padding and the corners a rotation uncovers hold 0 in
normalised space, i.e. the dataset's mean colour (black for GTSRB, whose normalisation is the identity);
`fill` reproduces that on the 0..255 scale (rounded to whole grey levels, so uint8 batches stay exact).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from datamodules.datasets import DataSpec


def pad_with(x: Tensor, padding: int, fill: Tensor) -> Tensor:
    """Pad (B, C, H, W) by `padding` px on every side with the per-channel values `fill` (C,)."""
    b, c, h, w = x.shape
    out = fill.to(x).view(1, c, 1, 1).expand(b, c, h + 2 * padding, w + 2 * padding).clone()
    out[..., padding : padding + h, padding : padding + w] = x
    return out


def crop_windows(x: Tensor, padding: int, fill: Tensor, top: Tensor, left: Tensor) -> Tensor:
    """Cut from each padded image the H x W window at (top[i], left[i]) (offsets in 0..2*padding)."""
    b, c, h, w = x.shape
    padded = pad_with(x, padding, fill)
    rows = (top.view(b, 1, 1) + torch.arange(h, device=x.device).view(1, h, 1)).expand(b, h, w)
    cols = (left.view(b, 1, 1) + torch.arange(w, device=x.device).view(1, 1, w)).expand(b, h, w)
    flat = (rows * (w + 2 * padding) + cols).reshape(b, 1, h * w).expand(b, c, h * w)
    return padded.flatten(2).gather(2, flat).view(b, c, h, w)


def rotate(x: Tensor, degrees: Tensor, fill: Tensor) -> Tensor:
    """Rotate each image about its centre by degrees[i] (nearest neighbour), uncovered pixels = `fill`."""
    b, c, h, w = x.shape
    rad = degrees.to(device=x.device, dtype=torch.float32) * (math.pi / 180)
    cos, sin = torch.cos(rad), torch.sin(rad)
    zero = torch.zeros_like(rad)
    # a pixel-space rotation written in grid_sample's normalised coordinates (exact for non-square images)
    theta = torch.stack([torch.stack([cos, -sin * h / w, zero], -1), torch.stack([sin * w / h, cos, zero], -1)], 1)
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    shift = fill.to(device=x.device, dtype=torch.float32).view(1, c, 1, 1)
    # zero padding of (x - fill) + fill = padding with fill
    out = F.grid_sample(x.float() - shift, grid, mode="nearest", padding_mode="zeros", align_corners=False) + shift
    return out.round_().to(x.dtype) if not x.is_floating_point() else out.to(x.dtype)


class PostPoisonAugment(nn.Module):
    """Args:
        crop_padding: padding of the random crop, in pixels.
        crop_p: probability of cropping.
        rotation: maximum rotation, in degrees (uniform in [-rotation, rotation]).
        rotation_p: probability of rotating.
        hflip: flip horizontally with probability 1/2 (CIFAR-10 only in the reference).
        fill: per-channel value of padding and uncovered corners on the 0..255 scale (one value or C).
        same_on_batch: one random draw per batch (BackdoorBench) instead of one per image.
    """

    def __init__(
        self,
        crop_padding: int = 5,
        crop_p: float = 0.8,
        rotation: float = 10.0,
        rotation_p: float = 0.5,
        hflip: bool = False,
        fill: Sequence[float] = (0.0,),
        same_on_batch: bool = True,
    ) -> None:
        super().__init__()
        if crop_padding < 0 or rotation < 0:
            raise ValueError(f"crop_padding and rotation must be >= 0, got {crop_padding} and {rotation}")
        if not (0 <= crop_p <= 1 and 0 <= rotation_p <= 1):
            raise ValueError(f"crop_p and rotation_p are probabilities in [0, 1], got {crop_p} and {rotation_p}")
        self.crop_padding, self.crop_p, self.rotation, self.rotation_p = crop_padding, crop_p, rotation, rotation_p
        self.hflip, self.same_on_batch = hflip, same_on_batch
        self.fill = tuple(float(round(v)) for v in fill)

    def _fill(self, x: Tensor) -> Tensor:
        fill = torch.tensor(self.fill, device=x.device).expand(x.shape[1]) if len(self.fill) == 1 else \
            torch.tensor(self.fill, device=x.device)
        if len(fill) != x.shape[1]:
            raise ValueError(f"fill has {len(self.fill)} values for images with {x.shape[1]} channels")
        return fill / 255.0 if x.is_floating_point() else fill

    def forward(self, x: Tensor) -> Tensor:
        """uint8 (or 0..1 float) images (B, C, H, W) -> augmented images of the same dtype."""
        if len(x) == 0:
            return x
        return self._per_batch(x) if self.same_on_batch else self._per_image(x)

    def _per_batch(self, x: Tensor) -> Tensor:
        b, pad, fill = len(x), self.crop_padding, self._fill(x)
        u_crop, top, left, u_rot, angle, u_flip = torch.rand(6).tolist()  # CPU draws: no device sync
        if pad > 0 and u_crop < self.crop_p:
            top, left = int(top * (2 * pad + 1)), int(left * (2 * pad + 1))
            x = pad_with(x, pad, fill)[..., top : top + x.shape[-2], left : left + x.shape[-1]]
        if self.rotation > 0 and u_rot < self.rotation_p:
            x = rotate(x, torch.full((b,), (2 * angle - 1) * self.rotation), fill)
        if self.hflip and u_flip < 0.5:
            x = x.flip(-1)
        return x.contiguous()

    def _per_image(self, x: Tensor) -> Tensor:
        b, pad, fill, dev = len(x), self.crop_padding, self._fill(x), x.device
        if pad > 0:
            crop = torch.rand(b, device=dev) < self.crop_p
            top = torch.where(crop, torch.randint(0, 2 * pad + 1, (b,), device=dev), pad)
            left = torch.where(crop, torch.randint(0, 2 * pad + 1, (b,), device=dev), pad)
            x = crop_windows(x, pad, fill, top, left)
        if self.rotation > 0:
            turn = torch.rand(b, device=dev) < self.rotation_p
            x = rotate(x, torch.where(turn, (torch.rand(b, device=dev) * 2 - 1) * self.rotation, 0.0), fill)
        if self.hflip:
            flip = torch.rand(b, device=dev) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x


def post_poison_augment(spec: DataSpec, same_on_batch: bool = True) -> PostPoisonAugment:
    """The reference's setting for a dataset: crop pad 5 (p 0.8), rotation 10 degrees (p 0.5), flip where
    the dataset allows it, padding in the dataset's mean colour."""
    return PostPoisonAugment(crop_padding=5, crop_p=0.8, rotation=10.0, rotation_p=0.5, hflip=spec.hflip,
                             fill=tuple(255.0 * m for m in spec.mean), same_on_batch=same_on_batch)


def warn_if_unpoisoned(attack: Any, batch_size: int) -> None:
    """Warn when int(p * B) = 0: a training-controlled attack would then train a clean model."""
    if attack.poison_ratio > 0 and attack.num_poisoned(batch_size) == 0:
        rank_zero_warn(
            f"{type(attack).__name__}: poison_ratio {attack.poison_ratio} x batch_size {batch_size} < 1, so "
            f"int(p * B) = 0 and no training sample gets the backdoor; raise the ratio or the batch size"
        )
