"""Plain helpers shared by the tests (fixtures live in conftest.py; no test file imports another).

- Test-width backbones: the survey's torchvision nets at a fraction of their width, same module names.
- `SmallTestSets` and `run_defense`: a defense fitted on the CPU with the test Trainer and cheap test sets.
- `assert_ignores_test_sets`: a defense's weights do not depend on the benchmark's test sets.
- Small shared pieces: `MaskRange`, offline downloads, an LF pattern file, a tiny grid, W&B records, `dm_images`.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from torch import nn
from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf
from torchvision.models.mobilenetv3 import MobileNetV3, _mobilenet_v3_conf
from torchvision.models.vgg import cfgs, make_layers

from datamodules import MitigationDataModule
from datamodules.loader import TensorImages
from lightning_modules import backbones
from lightning_modules.defenses import DEFENSES, Defense

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


# -- test-width backbones ---------------------------------------------------------------------------------------
# Each subclasses the registered class under the same class name, so the backbone's `layer_roles` and any table
# keyed by class name apply, and builds the same modules under the same names at a fraction of the width: a defense
# that finds its layers and runs on one finds and runs them on the real net. Parameters at 10 classes (real):
# VGG-19-BN 0.18 M (139.6 M), EfficientNet-B3 0.59 M (10.7 M), MobileNetV3-Large 0.30 M (4.2 M).

class VGG19BN(backbones.VGG19BN):
    """VGG-19-BN at 1/16 of the conv widths with a 64-unit head (4,096 in the real one)."""

    def __init__(self, num_classes: int, dropout: float = 0.5) -> None:
        nn.Module.__init__(self)  # VGG.__init__ would first build the real 102.8 M-parameter head
        cfg = [v if v == "M" else v // 16 for v in cfgs["E"]]
        self.features = make_layers(cfg, batch_norm=True)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(cfg[-2] * 7 * 7, 64), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(dropout), nn.Linear(64, num_classes))
        self.num_classes, self.dropout = num_classes, dropout


class EfficientNetB3(backbones.EfficientNetB3):
    """EfficientNet-B3's depth (same blocks) at width multiplier 0.25 (1.2 in the real one)."""

    def __init__(self, num_classes: int, dropout: float = 0.3) -> None:
        setting, last_channel = _efficientnet_conf("efficientnet_b3", width_mult=0.25, depth_mult=1.4)
        EfficientNet.__init__(self, setting, dropout=dropout, num_classes=num_classes, last_channel=last_channel)
        self.num_classes, self.dropout = num_classes, dropout


class MobileNetV3Large(backbones.MobileNetV3Large):
    """MobileNetV3-Large at width multiplier 0.25."""

    def __init__(self, num_classes: int, dropout: float = 0.2) -> None:
        setting, last_channel = _mobilenet_v3_conf("mobilenet_v3_large", width_mult=0.25)
        MobileNetV3.__init__(self, setting, last_channel, num_classes=num_classes, dropout=dropout)
        self.num_classes, self.dropout = num_classes, dropout


# registered name -> the factory the tests build it with (PreAct-ResNet18 at width 8: 0.18 M parameters of 11.2 M)
TEST_WIDTH: dict[str, Callable[..., nn.Module]] = {
    "preact_resnet18": functools.partial(backbones.PreActResNet18, width=8),
    "vgg19_bn": VGG19BN,
    "efficientnet_b3": EfficientNetB3,
    "mobilenet_v3_large": MobileNetV3Large,
    "small_cnn": backbones.SmallCNN,  # small already (0.14 M)
}


# -- defenses on the CPU ------------------------------------------------------------------------------------------

class SmallTestSets(MitigationDataModule):
    """D_m (and D_v) as configured; the benchmark's test sets cut to their first `n_test` images (None: all of
    them), or replaced by random images and labels (`noise`), so that the before/after measurements are cheap or
    differ while D_m stays the same; `shuffle_labels` permutes D_m's labels (its images stay)."""

    def __init__(self, *args, n_test: int | None = 32, noise: bool = False, shuffle_labels: bool = False,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.n_test, self.noise, self.shuffle_labels = n_test, noise, shuffle_labels

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
        if self.shuffle_labels:
            x, y = self._sets["train"].tensors
            self._sets["train"] = TensorImages(x, y[torch.randperm(len(y), generator=gen)])


def cpu_trainer(root: Path, **overrides) -> L.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar, model summary or sanity check."""
    return L.Trainer(**{"accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                        "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                        "default_root_dir": root, **overrides})


def run_defense(defense: Defense | type[Defense] | str, checkpoint: str | Path | None, root: Path, *,
                epochs: int = 1, data: MitigationDataModule | dict | None = None, callbacks=(),
                trainer: dict | None = None, **kwargs) -> Defense:
    """Fit a defense with `cpu_trainer`, seeded; returns it (its `result`, `info()`, `trainer`).

    defense: a registered name or a Defense class, built here on `checkpoint` with `kwargs` (result file in `root`);
        or a built Defense (on its own checkpoint unless `checkpoint` is given).
    data: a datamodule, or SmallTestSets arguments on top of spc 10, the first 32 test images, batch 16.
    epochs, trainer, callbacks: max_epochs, further Trainer arguments (max_steps, precision, ...), callbacks.
    """
    L.seed_everything(0, verbose=False)
    if not isinstance(defense, Defense):
        cls = DEFENSES[defense] if isinstance(defense, str) else defense
        defense = cls(str(checkpoint), **{"result_file": str(root / "result.json"), **kwargs})
    elif kwargs:
        raise TypeError(f"run_defense: constructor arguments {sorted(kwargs)} given with a built defense")
    checkpoint = checkpoint or defense.backdoored
    if not isinstance(data, MitigationDataModule):
        data = SmallTestSets(**{"spc": 10, "n_test": 32, "batch_size": 16, "backdoored": str(checkpoint),
                                **(data or {})})
    fit = cpu_trainer(root, max_epochs=epochs, callbacks=list(callbacks), **(trainer or {}))
    fit.fit(defense, data)
    return defense


def assert_ignores_test_sets(make: Callable[[Path], Defense], checkpoint: Path, root: Path, *, epochs: int = 1,
                             **data_args) -> tuple[Defense, Defense]:
    """Fit `make(root / name)` twice, once with the real test sets and once with noise in their place (D_m the same):
    the test sets must really differ and the defended weights (buffers included) must be identical. `data_args` go to
    SmallTestSets. Returns the two fitted defenses."""
    runs = []
    for noise in (False, True):
        L.seed_everything(0, verbose=False)
        defense = make(root / str(noise))
        data = {"n_test": None, **data_args, "noise": noise}
        runs.append(run_defense(defense, checkpoint, root / str(noise), epochs=epochs, data=data))
    plain, swapped = runs
    assert plain.result["before"]["acc"] > 0.9 and swapped.result["before"]["acc"] < 0.3  # the test sets differ
    other = swapped.state_dict()
    assert plain.state_dict().keys() == other.keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, other[key]), key
    return plain, swapped


class MaskRange(L.Callback):
    """(min, max) of all masks after every training step, and which masks had a nonzero gradient (ANP, AWM)."""

    def __init__(self) -> None:
        self.ranges: list[tuple[float, float]] = []
        self.moved: list[list[bool]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        flat = torch.cat([m.detach().flatten() for m in module.neuron_masks])
        self.ranges.append((float(flat.min()), float(flat.max())))
        self.moved.append([m.grad is not None and bool(m.grad.abs().sum() > 0) for m in module.neuron_masks])


def dm_images(checkpoint: str | Path, spc: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """D_m of a checkpoint (split seed 0) as float images in [0, 1] and their labels."""
    from datamodules.transforms import to_unit

    data = MitigationDataModule(spc=spc, backdoored=str(checkpoint))
    data.setup("fit")
    x, y = data.tensors("train")
    return to_unit(x), y


# -- small shared pieces ------------------------------------------------------------------------------------------

def block_downloads(monkeypatch) -> None:
    """Make every download fail as if offline."""
    import urllib.error

    from datamodules import resources

    def offline(url, timeout=None):
        raise urllib.error.URLError(f"downloads are disabled in tests ({url})")

    monkeypatch.setattr(resources, "urlopen", offline)


def lf_blob(size: int = 32) -> np.ndarray:
    """A smooth non-negative uint8 LF pattern (H, W, 3) in 0..51, like BackdoorBench's reference files."""
    from datamodules.lf_pattern import low_pass, rescale

    v = low_pass(torch.rand(3, size, size, generator=torch.Generator().manual_seed(0)) - 0.5)
    return (rescale(v, 0.2) * 255).round().permute(1, 2, 0).numpy().astype(np.uint8)


def lf_pattern_file() -> str:
    """`lf_blob()` saved as a .npy pattern file (written once per machine)."""
    path = Path(tempfile.gettempdir()) / "bb-lf-example-0-255.npy"
    if not path.exists():
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, lf_blob())
        tmp.replace(path)  # atomic: parallel test processes never read half a file
    return str(path)


def write_grid(tmp_path: Path, **overrides) -> Path:
    """A tiny grid file: BadNets on digits with SmallCNN (width 8, 3 epochs); FT at SPC 2 over 3 split seeds and CLP
    (u 1) once per model. `overrides` replace top-level keys."""
    spec = {
        "name": "tiny", "runs_dir": str(tmp_path / "runs"), "data_dir": str(tmp_path / "data"),
        "attacks": {"datasets": ["digits"], "attacks": ["badnets"], "backbones": ["small_cnn"],
                    "poison_ratios": [0.1], "seeds": [0],
                    "args": ["--trainer.max_epochs", "3", "--model.init_args.backbone.init_args.width", "8",
                             "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
                             "--data.init_args.cache_dir", "null"]},
        "defenses": {"defenses": ["ft", "clp"], "spc": [2], "split_seeds": [0, 1, 2], "once_per_model": ["clp"],
                     "args": ["--trainer.enable_model_summary", "false"],
                     # CLP at u = 1 (3 in the paper) zeroes a few neurons even of this barely trained model
                     "per_defense_args": {"ft": ["--trainer.max_epochs", "3"], "clp": ["--model.init_args.u", "1"]}},
        "exclude": [],
    }
    spec.update(overrides)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def wandb_records(run_dir: Path, timeout: float = 60.0) -> dict[str, list]:
    """The records of an offline W&B run (`<dir>/run-<id>.wandb`: a 7-byte header, then LevelDB-log blocks of
    32 KiB whose records hold protobuf wandb Records), grouped by record type: what `wandb sync` would upload.
    `run.finish()` returns before the W&B service has written the run's last records (it only informs the
    service), so this reads again until the exit record is there, for at most `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        out = _wandb_records(next(run_dir.glob("run-*.wandb")).read_bytes())
        if "exit" in out or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def _wandb_records(raw: bytes) -> dict[str, list]:
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    out: dict[str, list] = {}
    pos, buf = 7, b""
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if (kind == 0 and length == 0) or pos + 7 + length > len(raw):  # the end, or a record still being written
            break
        buf += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(buf)
            out.setdefault(record.WhichOneof("record_type"), []).append(record)
            buf = b""
    return out
