"""The backdoor record: what every attack checkpoint stores so a defense or notebook can rebuild the run.

`checkpoint["backdoor"]` = {
    "version": 1,
    "backbone": {"class_path", "init_args"},          # rebuilt with num_classes = data.spec.num_classes
    "data": {"dataset", "data_dir", "spec"},            # DataSpec as a dict (normalisation, augmentation)
    "attack": None | {"name", "trigger": {"class_path", "init_args", "state"}, "target", "mode",
                      "poison_ratio", "poison_seed", "clean_label", "training_controlled",
                      "poison_indices": int64 tensor (None, like poison_seed, for training-controlled
                      attacks, which poison inside training_step), ...},
}
Everything is plain Python or tensors, so `torch.load(..., weights_only=True)` reads it.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

BACKDOOR_KEY = "backdoor"
RECORD_VERSION = 1


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """torch.load with weights_only=True and errors that say what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found; attack runs write <run>/checkpoints/last.ckpt "
            f"(e.g. runs/<name>/version_0/checkpoints/last.ckpt)"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as err:
        raise ValueError(
            f"cannot read checkpoint {path}: it is truncated, corrupt, or holds objects that are unsafe to "
            f"load ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Re-run the "
            f"attack that wrote it."
        ) from err
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} does not hold a Lightning checkpoint (found {type(ckpt).__name__})")
    return ckpt


def read_record(ckpt: dict[str, Any], path: str | Path = "<checkpoint>") -> dict[str, Any]:
    record = ckpt.get(BACKDOOR_KEY)
    if not isinstance(record, dict):
        raise ValueError(
            f"{path} has no '{BACKDOOR_KEY}' record: it was not written by this project's attack training "
            f"(train.py fit with a victim or attack model), so its data and trigger cannot be rebuilt"
        )
    if record.get("version") != RECORD_VERSION:
        raise ValueError(f"{path}: backdoor record version {record.get('version')} is not {RECORD_VERSION}")
    return record


def load_record(path: str | Path) -> dict[str, Any]:
    return read_record(load_checkpoint(path), path)
