"""CIFAR-10 (Krizhevsky 2009): 10 classes, 50,000 / 10,000 images, 32x32; prepared through torchvision."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.datasets.base import DataSpec, ImageDataset
from datamodules.datasets.download import download_failed


class CIFAR10(ImageDataset):
    spec = DataSpec(
        name="cifar10",
        num_classes=10,
        image_size=32,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.247, 0.243, 0.261),
        hflip=True,
    )
    train_class_sizes = (5000,) * 10  # official training images per class (the check of a grid without data)

    def read_source(self, raw_dir: Path, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
        from torchvision.datasets import CIFAR10 as TorchvisionCIFAR10

        try:
            ds = TorchvisionCIFAR10(str(raw_dir), train=split == "train", download=download)
        except (OSError, RuntimeError) as err:
            raise download_failed(self.spec.name, raw_dir, err, "cifar-10-python.tar.gz (https://www.cs.toronto.edu/"
                                  "~kriz/cifar-10-python.tar.gz; or the cifar-10-batches-py/ folder it holds)") from err
        return np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)
