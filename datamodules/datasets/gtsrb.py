"""GTSRB (Stallkamp et al. 2012): 43 traffic-sign classes, 39,209 / 12,630 images of varying size.

Resized to 32x32 (PIL bilinear) without the ROI crop and with identity normalisation, as BackdoorBench
does; never flipped (signs are not symmetric). The download goes through torchvision; the reader parses
the official layout itself (labels from the class-folder names and GT-final_test.csv), so it also works
on a partial or hand-copied tree:

    <raw>/gtsrb/GTSRB/Training/<00000..00042>/*.ppm
    <raw>/gtsrb/GTSRB/Final_Test/Images/*.ppm
    <raw>/gtsrb/GT-final_test.csv            (Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId)
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from datamodules.datasets.base import DataSpec, ImageDataset
from datamodules.datasets.download import download_failed, read_resized


class GTSRB(ImageDataset):
    spec = DataSpec(
        name="gtsrb",
        num_classes=43,
        image_size=32,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        hflip=False,
    )
    # official training images per class, 39,209 in all (the check of a grid without data)
    train_class_sizes = (210, 2220, 2250, 1410, 1980, 1860, 420, 1440, 1410, 1470, 2010, 1320, 2100, 2160, 780, 630,
                         420, 1110, 1200, 210, 360, 330, 390, 510, 270, 1500, 600, 240, 540, 270, 450, 780, 240, 689,
                         420, 1200, 390, 210, 2070, 300, 360, 240, 240)

    def read_source(self, raw_dir: Path, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
        root = raw_dir / "gtsrb"
        train_dir = root / "GTSRB" / "Training"
        test_dir = root / "GTSRB" / "Final_Test" / "Images"
        test_csv = root / "GT-final_test.csv"
        present = train_dir.is_dir() if split == "train" else test_dir.is_dir() and test_csv.exists()
        if not present:
            if not download:
                raise FileNotFoundError(f"GTSRB {split} files not found under {root} (official layout expected)")
            from torchvision.datasets import GTSRB as TorchvisionGTSRB

            try:
                TorchvisionGTSRB(str(raw_dir), split=split, download=True)
            except (OSError, RuntimeError) as err:
                raise download_failed(self.spec.name, raw_dir, err,
                                      "gtsrb/ with GTSRB-Training_fixed.zip, GTSRB_Final_Test_Images.zip and "
                                      "GTSRB_Final_Test_GT.zip (https://sid.erda.dk/public/archives/"
                                      "daaeac0d7ce1152aea9b61d9f1e19370/)") from err
        if split == "train":
            paths = sorted(train_dir.glob("*/*.ppm"))
            labels = [int(p.parent.name) for p in paths]
        else:
            with open(test_csv, newline="") as f:
                rows = list(csv.DictReader(f, delimiter=";"))
            paths = [test_dir / row["Filename"] for row in rows]
            labels = [int(row["ClassId"]) for row in rows]
        if not paths:
            raise FileNotFoundError(f"no GTSRB {split} images found under {root}")
        return read_resized(paths, self.spec.image_size), np.asarray(labels, dtype=np.int64)
