"""A gallery of the run's attack: clean test images above the same images with the trigger, and the
amplified residual below (like the survey's Figure 2), saved as a PNG in the run directory and, under a
WandbLogger, logged to W&B as an image.

Written at fit start (`gallery.png`: for training-controlled attacks, whose generators are still untrained
then, the caption says so) and, for training-controlled attacks, again at train end (`gallery_trained.png`).
Runs without a trigger (clean training) or without a BackdoorDataModule (defenses) write nothing.

All attacks in one picture (one row per attack): `python -m benchmarks.gallery` (benchmarks/gallery.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from torch import Tensor

from datamodules.backdoor import BackdoorDataModule
from datamodules.triggers.base import Trigger


def pick_images(x: Tensor, y: Tensor, n: int, exclude: int | None = None) -> Tensor:
    """Up to n images, one per class in class order first (skipping `exclude`, the target), then the rest."""
    order, seen = [], set()
    for i, label in enumerate(y.tolist()):
        if label != exclude and label not in seen:
            seen.add(label)
            order.append(i)
    rest = [i for i in range(len(y)) if i not in set(order) and y[i] != exclude]
    return x[(order + rest)[:n]]


@torch.no_grad()
def apply_trigger(trigger: Trigger, x: Tensor) -> Tensor:
    """The trigger on uint8 images, run on the trigger's own device (in eval mode), returned on the CPU."""
    state = next(iter([*trigger.parameters(), *trigger.buffers()]), None)
    device = state.device if state is not None else x.device
    was_training = trigger.training
    trigger.eval()
    try:
        return trigger(x.to(device)).cpu()
    finally:
        trigger.train(was_training)


def residual_image(clean: Tensor, triggered: Tensor) -> Tensor:
    """|triggered - clean| stretched to 0..255 per image (black: no change), uint8 (B, C, H, W)."""
    diff = (triggered.float() - clean.float()).abs()
    peak = diff.flatten(1).amax(1).clamp_(min=1.0).view(-1, 1, 1, 1)
    return (diff / peak * 255).round().to(torch.uint8)


def tile(rows: list[Tensor], pad: int = 2, fill: int = 255) -> np.ndarray:
    """uint8 (B, C, H, W) rows (equal B, C, H, W) -> one H x W x 3 uint8 grid with `pad` px gutters."""
    b, c, h, w = rows[0].shape
    grid = np.full((len(rows) * (h + pad) + pad, b * (w + pad) + pad, 3), fill, dtype=np.uint8)
    for r, row in enumerate(rows):
        for i, img in enumerate(row):
            pixels = img.permute(1, 2, 0).numpy()
            top, left = pad + r * (h + pad), pad + i * (w + pad)
            grid[top : top + h, left : left + w] = pixels if c == 3 else pixels[..., :1]
    return grid


def upscale(grid: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement, so 32 px images stay crisp in viewers."""
    return grid.repeat(factor, 0).repeat(factor, 1) if factor > 1 else grid


def gallery_rows(trigger: Trigger, x: Tensor) -> list[Tensor]:
    """[clean, triggered, amplified residual] for uint8 images x (B, C, H, W) on the CPU."""
    x = x.cpu()
    triggered = apply_trigger(trigger, x)
    return [x, triggered, residual_image(x, triggered)]


class Gallery(L.Callback):
    """Args:
        num_images: images per row (one per non-target class first).
        scale: nearest-neighbour enlargement of the saved PNG.
        filename: the PNG's name in the run directory (the trained version gets a `_trained` suffix).
    """

    def __init__(self, num_images: int = 8, scale: int = 3, filename: str = "gallery.png") -> None:
        if num_images < 1 or scale < 1:
            raise ValueError(f"Gallery num_images and scale must be >= 1, got {num_images} and {scale}")
        self.num_images, self.scale, self.filename = num_images, scale, filename
        self.paths: list[Path] = []

    @staticmethod
    def trigger_of(trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Trigger | None, bool]:
        """(the run's trigger, whether it is trained inside the run)."""
        data = getattr(trainer, "datamodule", None)
        if not isinstance(data, BackdoorDataModule):  # defenses and foreign data: nothing to show
            return None, False
        own = getattr(pl_module, "trigger", None)
        if isinstance(own, Trigger):
            return own, True
        trigger = getattr(data, "trigger", None)
        return (trigger, False) if isinstance(trigger, Trigger) else (None, False)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trigger, trained_in_run = self.trigger_of(trainer, pl_module)
        if trigger is not None:
            note = " (generator/trigger untrained: fit start)" if trained_in_run else ""
            self.save(trainer, self.folder(trainer), trigger, self.filename, note)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trigger, trained_in_run = self.trigger_of(trainer, pl_module)
        if trigger is not None and trained_in_run:
            stem, ext = os.path.splitext(self.filename)
            self.save(trainer, self.folder(trainer), trigger, f"{stem}_trained{ext}",
                      f" (after {trainer.current_epoch} epochs)")

    @staticmethod
    def folder(trainer: L.Trainer) -> Path:
        # on every rank: `trainer.log_dir` broadcasts under DDP, so calling it from rank 0 alone hangs
        return Path(trainer.log_dir or trainer.default_root_dir)

    @rank_zero_only
    def save(self, trainer: L.Trainer, folder: Path, trigger: Trigger, filename: str, note: str = "") -> None:
        data = trainer.datamodule
        x, y = data.tensors("clean")[:2]
        images = pick_images(x.cpu(), y.cpu(), self.num_images, exclude=getattr(data, "target", None))
        grid = upscale(tile(gallery_rows(trigger, images)), self.scale)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / filename
        Image.fromarray(grid).save(path)
        self.paths.append(path)
        caption = f"{type(trigger).__name__}: clean / triggered / |residual| (stretched){note}"
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=f"gallery/{Path(filename).stem}", images=[grid], caption=[caption])
