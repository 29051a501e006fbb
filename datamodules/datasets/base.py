"""What every dataset source shares: its `DataSpec` and the prepared `.npz` format.

Prepared format (also the layout of ../shared/data): `<data_dir>/<name>/{train,test}.npz`, written with
`numpy.savez_compressed`, holding `x` uint8 (N, H, W, 3) RGB and `y` int64 (N,); no pickled objects.
`ImageDataset.load` reads it when present; otherwise a built-in source builds its arrays, and any other
source raises an error that names the missing file and the command that writes it. A process keeps the last two
files it read (a grid worker runs many defenses on one dataset: CIFAR-10's training file takes ~1-2 s to
decompress) and hands out copies; a file rewritten since (new inode, size or time) is read again.
"""

from __future__ import annotations

import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SPLITS = ("train", "test")
LOADED_FILES = 2  # how many prepared files a process keeps in memory (train + test of one dataset)
_loaded: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()


@dataclass(frozen=True)
class DataSpec:
    """Facts about a dataset that a model needs without loading it.

    Args:
        name: registry name, also the folder name of the prepared files.
        num_classes: number of labels K; labels are 0..K-1.
        image_size: height = width of the stored images, in pixels.
        mean, std: per-channel normalisation on the 0..1 pixel scale.
        hflip: whether training augmentation may flip images horizontally (not for signs or digits).
        crop_padding: zero padding, in pixels, of the random-crop training augmentation.
    """

    name: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hflip: bool
    crop_padding: int = 4

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DataSpec:
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


class ImageDataset:
    """A dataset source: its spec, how to read it, and how to prepare it from the original files."""

    spec: DataSpec
    builtin: bool = False  # True: `build` makes the arrays without any file

    def prepared_path(self, data_dir: str | Path, split: str) -> Path:
        return Path(data_dir) / self.spec.name / f"{split}.npz"

    def is_prepared(self, data_dir: str | Path) -> bool:
        return self.builtin or all(self.prepared_path(data_dir, s).exists() for s in SPLITS)

    def load(self, data_dir: str | Path, split: str) -> tuple[Tensor, Tensor]:
        """Images as uint8 (N, 3, H, W) and labels as int64 (N,), on the CPU."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        path = self.prepared_path(data_dir, split)
        if path.exists():
            return load_prepared(path, self.spec)
        if self.builtin:
            x, y = self.build(split)
        else:
            raise FileNotFoundError(
                f"{self.spec.name}: prepared file {path} not found. Run "
                f"`python -m datamodules.prepare {self.spec.name} --data_dir {data_dir}` on a machine "
                f"with internet access (it downloads the original files and writes {path.parent}/"
                f"{{train,test}}.npz), or copy prepared files there, or point --data.data_dir at the "
                f"folder that holds {self.spec.name}/."
            )
        check_arrays(x, y, self.spec, str(path))
        return to_tensors(x, y)

    def build(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError(f"{type(self).__name__} is not a built-in dataset")

    def prepare(self, data_dir: str | Path, download: bool = True) -> None:
        """Write the prepared files from the original dataset (downloading it if allowed)."""
        for split in SPLITS:
            x, y = self.read_source(Path(data_dir) / self.spec.name / "raw", split, download)
            check_arrays(x, y, self.spec, f"{self.spec.name} {split} source")
            write_npz(self.prepared_path(data_dir, split), x, y)

    def read_source(self, raw_dir: Path, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError(f"{type(self).__name__} has no original source to prepare from")


def load_prepared(path: Path, spec: DataSpec) -> tuple[Tensor, Tensor]:
    """A prepared file as tensors, checked; from this process's memory when it has read the same file before."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, spec.name)
    if key not in _loaded:
        x, y = read_npz(path)
        check_arrays(x, y, spec, str(path))
        _loaded[key] = to_tensors(x, y)
        while len(_loaded) > LOADED_FILES:
            _loaded.popitem(last=False)
    _loaded.move_to_end(key)
    return tuple(t.clone() for t in _loaded[key])  # callers may write into theirs


def read_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a prepared file; a truncated or foreign file gives an error that says how to recover."""
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = f["x"], f["y"]
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"{path} is not a valid prepared dataset file ({type(err).__name__}: {err}). It must be a "
            f"numpy .npz with arrays 'x' (uint8, N x H x W x 3) and 'y' (int64, N). Delete it and run "
            f"`python -m datamodules.prepare <dataset> --data_dir <dir>` again."
        ) from err
    return x, y


def write_npz(path: str | Path, x: np.ndarray, y: np.ndarray) -> None:
    """Write atomically: a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, x=x, y=y.astype(np.int64))
    tmp.replace(path)


def check_arrays(x: np.ndarray, y: np.ndarray, spec: DataSpec, where: str) -> None:
    size = spec.image_size
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (size, size, 3):
        raise ValueError(
            f"{where}: expected x as uint8 (N, {size}, {size}, 3), got {x.dtype} {tuple(x.shape)}; "
            f"re-create the file with `python -m datamodules.prepare {spec.name}`"
        )
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: expected integer labels y of shape ({len(x)},), got {y.dtype} {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= spec.num_classes):
        raise ValueError(
            f"{where}: labels must lie in 0..{spec.num_classes - 1} for {spec.name}, "
            f"found {int(y.min())}..{int(y.max())}"
        )


def to_tensors(x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
    images = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(y.astype(np.int64))
