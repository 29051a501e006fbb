"""Dataset sources by name: `DATASETS` is their registry (core/registry.py), `get_dataset("cifar10")` an instance.
A new source registers itself: `DATASETS.register("name", MyDataset)`."""

from core.registry import Registry
from datamodules.datasets.base import DataSpec, ImageDataset, read_npz, write_npz
from datamodules.datasets.cifar10 import CIFAR10
from datamodules.datasets.digits import Digits
from datamodules.datasets.gtsrb import GTSRB
from datamodules.datasets.tiny_imagenet import TinyImageNet

DATASETS: Registry[type[ImageDataset]] = Registry("dataset", ImageDataset)
for _cls in (Digits, CIFAR10, GTSRB, TinyImageNet):
    DATASETS.register(_cls.spec.name, _cls)


def get_dataset(name: str) -> ImageDataset:
    return DATASETS.get_class(name)()


__all__ = ["CIFAR10", "DATASETS", "DataSpec", "Digits", "GTSRB", "ImageDataset", "TinyImageNet",
           "get_dataset", "read_npz", "write_npz"]
