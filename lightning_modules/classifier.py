"""The base of every system here: a backbone behind a fixed normalisation, evaluated on ACC / ASR / RA.

`forward` takes pixels (uint8 0..255 or float 0..1) and returns logits, so attacks and defenses work in
pixel space whatever the dataset's normalisation. Evaluation loaders are `[clean, backdoor]`
(datamodules/backdoor.py); metrics are logged as `{stage}/acc`, `{stage}/asr`, `{stage}/ra`.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from core.metrics import AttackSuccessRate, RecoveryAccuracy
from datamodules.backdoor import BACKDOOR, CLEAN
from datamodules.datasets import DataSpec
from datamodules.transforms import BatchAugment, Normalize

EVAL_STAGES = ("val", "test")


class ImageClassifier(L.LightningModule):
    """Holds `net`, its input normalisation, the training augmentation and the evaluation metrics."""

    def __init__(self, channels_last: bool = True) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.net: nn.Module | None = None
        self.spec: DataSpec | None = None

    # -- building ---------------------------------------------------------------------------------------
    def bind_data(self, spec: DataSpec) -> None:
        """Attach what depends on the data: normalisation, augmentation, metrics (idempotent)."""
        if self.spec is not None:
            if self.spec != spec:
                raise ValueError(f"{type(self).__name__} was built for {self.spec.name} data, not {spec.name}")
            return
        self.spec = spec
        self.normalize = Normalize(spec.mean, spec.std)
        self.augment = BatchAugment(spec.crop_padding, spec.hflip)
        metrics = {}
        for stage in EVAL_STAGES:
            metrics[f"{stage}_acc"] = MulticlassAccuracy(spec.num_classes, average="micro")
            metrics[f"{stage}_asr"] = AttackSuccessRate()
            metrics[f"{stage}_ra"] = RecoveryAccuracy()
        self.metrics = nn.ModuleDict(metrics)

    def set_net(self, net: nn.Module) -> None:
        self.net = net.to(memory_format=torch.channels_last) if self.channels_last else net

    # -- forward ----------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        x = self.normalize(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def backdoor_inputs(self, x: Tensor) -> Tensor:
        """Images of a backdoor batch as the model sees them; training-controlled attacks trigger here."""
        return x

    # -- evaluation -------------------------------------------------------------------------------------
    def evaluate_batch(self, stage: str, batch: tuple[Tensor, ...], dataloader_idx: int) -> None:
        if dataloader_idx == CLEAN:
            x, y = batch
            self.metrics[f"{stage}_acc"].update(self(x), y)
            self.log(f"{stage}/acc", self.metrics[f"{stage}_acc"], add_dataloader_idx=False)
        elif dataloader_idx == BACKDOOR:
            x, y_attack, y_true = batch
            logits = self(self.backdoor_inputs(x))
            self.metrics[f"{stage}_asr"].update(logits, y_attack)
            self.metrics[f"{stage}_ra"].update(logits, y_true)
            self.log(f"{stage}/asr", self.metrics[f"{stage}_asr"], add_dataloader_idx=False)
            self.log(f"{stage}/ra", self.metrics[f"{stage}_ra"], add_dataloader_idx=False)
        else:
            raise ValueError(f"unexpected evaluation dataloader {dataloader_idx}; expected [clean, backdoor]")

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluate_batch("val", batch, dataloader_idx)

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluate_batch("test", batch, dataloader_idx)

    def cross_entropy_step(self, x: Tensor, y: Tensor, augment: bool = True) -> Tensor:
        """Augment (optionally), classify, return the CE loss and log it as train/loss."""
        logits = self(self.augment(x) if augment else x)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss
