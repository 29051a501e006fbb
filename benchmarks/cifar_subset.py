"""A class-balanced CIFAR-10 subset in the project's layout, small enough to travel to a lent GPU (64 MiB).

Takes the first `train` training and `test` test images of each class from <src>/cifar10/{train,test}.npz and the
trigger pictures under <src>/triggers/, and writes <dst>/cifar10/{train,test}.npz and <dst>/triggers/.
    python benchmarks/cifar_subset.py data/cifar10_subset --src ../shared/data --train 800 --test 100
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.datasets import write_npz


def first_per_class(y: np.ndarray, n: int) -> np.ndarray:
    """Indices of the first n images of each class, in the file's order."""
    keep = np.concatenate([np.flatnonzero(y == c)[:n] for c in np.unique(y)])
    if len(keep) < n * len(np.unique(y)):
        raise SystemExit(f"cifar_subset: fewer than {n} images in some class")
    return np.sort(keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dst")
    parser.add_argument("--src", default="../shared/data")
    parser.add_argument("--train", type=int, default=800, help="training images per class")
    parser.add_argument("--test", type=int, default=100, help="test images per class")
    args = parser.parse_args()
    src, dst = Path(args.src), Path(args.dst)
    for split, n in (("train", args.train), ("test", args.test)):
        path = src / "cifar10" / f"{split}.npz"
        if not path.is_file():
            raise SystemExit(f"cifar_subset: {path} is missing; --src names the folder holding cifar10/")
        with np.load(path) as data:
            x, y = data["x"], data["y"]
        keep = first_per_class(y, n)
        write_npz(dst / "cifar10" / f"{split}.npz", x[keep], y[keep])
    if (src / "triggers").is_dir():
        shutil.copytree(src / "triggers", dst / "triggers", dirs_exist_ok=True)
    print(f"cifar_subset: {dst} ({args.train} train and {args.test} test images per class)")


if __name__ == "__main__":
    main()
