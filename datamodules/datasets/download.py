"""Shared pieces of preparing datasets from their original files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


class DataUnavailable(RuntimeError):
    """A dataset's original files could not be fetched (offline, or a server down): the message says what to
    place where."""


def download_failed(name: str, raw_dir: Path, err: Exception, place: str) -> DataUnavailable:
    """`place`: which official files to put into raw_dir (and where they come from)."""
    return DataUnavailable(
        f"could not get the original {name} files into {raw_dir} ({type(err).__name__}: {err}). Either run "
        f"`python -m datamodules.prepare {name} --data_dir <dir>` on a machine with internet access and copy "
        f"<dir>/{name}/{{train,test}}.npz into {raw_dir.parent}, or put {place} into {raw_dir} and run it again."
    )


def read_resized(paths: list[Path], size: int) -> np.ndarray:
    """Decode image files as RGB and resize each to size x size (PIL bilinear), as uint8 (N, H, W, 3)."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            out[i] = np.asarray(img)
    return out
