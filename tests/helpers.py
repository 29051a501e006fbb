"""Helpers shared by the defense tests: a mitigation datamodule whose test sets are cut short or replaced by noise,
a seeded CPU fit, and the check that a defense's weights do not depend on the benchmark's test sets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

from datamodules import MitigationDataModule
from datamodules.loader import TensorImages
from lightning_modules.defenses import Defense


class SmallTestSets(MitigationDataModule):
    """D_m (and D_v) as configured; the benchmark's test sets cut to their first `n_test` images (None: all of
    them), or replaced by random images and labels (`noise`), so that the before/after measurements are cheap or
    differ while D_m stays the same."""

    def __init__(self, *args, n_test: int | None = 32, noise: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.n_test, self.noise = n_test, noise

    def setup(self, stage: str | None = None) -> None:
        fresh = not self._sets
        super().setup(stage)
        if not fresh:
            return
        gen = torch.Generator().manual_seed(1)  # its own generator: the training draws stay the same
        for name in ("clean", "backdoor"):
            x, *labels = (t[: self.n_test] for t in self._sets[name].tensors)
            if self.noise:
                x = torch.randint(0, 256, x.shape, generator=gen, dtype=torch.uint8)
                labels = [torch.randint(0, 10, (len(x),), generator=gen) for _ in labels]
            self._sets[name] = TensorImages(x, *labels)


def fit_defense(defense: Defense, data: MitigationDataModule, root: Path, callbacks=(), **trainer_args) -> Defense:
    """`trainer.fit(defense, data)` on the CPU, seeded, without logger, checkpoints or progress bar."""
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(**{"accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                           "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                           "default_root_dir": root, "callbacks": list(callbacks), **trainer_args})
    trainer.fit(defense, data)
    return defense


def assert_ignores_test_sets(make: Callable[[Path], Defense], checkpoint: Path, root: Path,
                             **data_args) -> tuple[Defense, Defense]:
    """Fit `make(root / name)` twice, once with the real test sets and once with noise in their place (D_m the same):
    the test sets must really differ and the defended weights (buffers included) must be identical. `data_args` go to
    the datamodule; a `trainer` dict among them to the Trainer. Returns the two fitted defenses."""
    trainer_args = data_args.pop("trainer", {})
    runs = []
    for noise in (False, True):
        L.seed_everything(0, verbose=False)
        defense = make(root / str(noise))
        data = SmallTestSets(backdoored=str(checkpoint), n_test=None, noise=noise, **data_args)
        runs.append(fit_defense(defense, data, root / str(noise), **trainer_args))
    plain, swapped = runs
    assert plain.result["before"]["acc"] > 0.9 and swapped.result["before"]["acc"] < 0.3  # the test sets differ
    other = swapped.state_dict()
    assert plain.state_dict().keys() == other.keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, other[key]), key
    return plain, swapped


def wandb_records(run_dir: Path) -> dict[str, list]:
    """The records of an offline W&B run (`<dir>/run-<id>.wandb`: a 7-byte header, then LevelDB-log blocks of
    32 KiB whose records hold protobuf wandb Records), grouped by record type: what `wandb sync` would upload."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    raw = next(run_dir.glob("run-*.wandb")).read_bytes()
    out: dict[str, list] = {}
    pos, buf = 7, b""
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        buf += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(buf)
            out.setdefault(record.WhichOneof("record_type"), []).append(record)
            buf = b""
    return out


def dm_images(checkpoint: str | Path, spc: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """D_m of a checkpoint (split seed 0) as float images in [0, 1] and their labels."""
    from datamodules.transforms import to_unit

    data = MitigationDataModule(spc=spc, backdoored=str(checkpoint))
    data.setup("fit")
    x, y = data.tensors("train")
    return to_unit(x), y
