"""Tiny-ImageNet-200: 200 classes, 100,000 train / 10,000 images (the official val split is our test), 64x64.

Read from the standard folder layout of tiny-imagenet-200.zip (downloaded when online):

    <raw>/tiny-imagenet-200/wnids.txt
    <raw>/tiny-imagenet-200/train/<wnid>/images/*.JPEG
    <raw>/tiny-imagenet-200/val/images/*.JPEG
    <raw>/tiny-imagenet-200/val/val_annotations.txt     (filename <tab> wnid <tab> box)

Labels index the sorted wnids (the ImageFolder convention the reference uses). Greyscale images become RGB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.datasets.base import DataSpec, ImageDataset
from datamodules.datasets.download import download_failed, read_resized

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


class TinyImageNet(ImageDataset):
    spec = DataSpec(
        name="tiny_imagenet",
        num_classes=200,
        image_size=64,
        mean=(0.4802, 0.4481, 0.3975),
        std=(0.2302, 0.2265, 0.2262),
        hflip=False,
    )
    train_class_sizes = (500,) * 200  # official training images per class (the check of a grid without data)

    def read_source(self, raw_dir: Path, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
        root = raw_dir / "tiny-imagenet-200"
        if not (root / "wnids.txt").exists():
            if not download:
                raise FileNotFoundError(f"Tiny-ImageNet files not found under {root} (wnids.txt missing)")
            from torchvision.datasets.utils import download_and_extract_archive

            try:
                download_and_extract_archive(URL, str(raw_dir), md5=MD5)
            except (OSError, RuntimeError) as err:
                raise download_failed(self.spec.name, raw_dir, err,
                                      f"tiny-imagenet-200.zip ({URL})") from err
        wnids = sorted((root / "wnids.txt").read_text().split())
        index = {w: i for i, w in enumerate(wnids)}
        if split == "train":
            paths = sorted((root / "train").glob("*/images/*.JPEG"))
            labels = [index[p.parent.parent.name] for p in paths]
        else:
            rows = [line.split("\t") for line in (root / "val" / "val_annotations.txt").read_text().splitlines() if line]
            paths = [root / "val" / "images" / r[0] for r in rows]
            labels = [index[r[1]] for r in rows]
        if not paths:
            raise FileNotFoundError(f"no Tiny-ImageNet {split} images found under {root}")
        return read_resized(paths, self.spec.image_size), np.asarray(labels, dtype=np.int64)
