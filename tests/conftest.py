"""Shared fixtures: offline W&B, a per-session cache, ../shared/data when present, an in-process CLI."""

from __future__ import annotations

import functools
import itertools
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["BACKDOOR_BENCH_CACHE"] = tempfile.mkdtemp(prefix="bb-cache-")  # before datamodules is imported
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # pytest -n N: N processes share the cores
if XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"  # for this worker's torch and the processes its tests start

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

if XDIST_WORKER:
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real CIFAR-10 and trigger files); tests using it skip in a user's clone."""
    if not (SHARED_DATA / "cifar10" / "train.npz").exists():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def run_cli(*args: str, cwd: Path) -> object:
    """Run train.py's CLI in this process (cwd holds runs/); returns the LightningCLI object."""
    from lightning_modules.cli import BackdoorCLI

    old_cwd, old_argv = os.getcwd(), sys.argv
    os.chdir(cwd)
    sys.argv = ["train.py"]  # LightningCLI warns when pytest's own argv sits beside `args`
    try:
        return BackdoorCLI(args=list(args))
    finally:
        os.chdir(old_cwd)
        sys.argv = old_argv


def write_synthetic_prepared(data_dir: Path, name: str, num_classes: int, size: int, per_class: int = 2) -> None:
    """A tiny prepared dataset (<data_dir>/<name>/{train,test}.npz) with every class present."""
    from datamodules.datasets import write_npz

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 1)):
        y = np.repeat(np.arange(num_classes), n)
        x = rng.integers(0, 256, (len(y), size, size, 3), dtype=np.uint8)
        write_npz(data_dir / name / f"{split}.npz", x, y)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """A data folder holding digits as prepared files (<dir>/digits/{train,test}.npz), recorded as the data folder of
    the checkpoints below: every datamodule built on them reads these (0.07 s) instead of rebuilding the set from
    scikit-learn's copy (0.3 s on 2 CPU cores); the built-in path itself is tested in tests/test_datasets.py."""
    from datamodules.datasets import Digits, write_npz

    root = tmp_path_factory.mktemp("data")
    for split in ("train", "test"):
        write_npz(root / "digits" / f"{split}.npz", *Digits().build(split))
    return root


@pytest.fixture(scope="session")
def backdoored_checkpoint(tmp_path_factory, digits_dir) -> dict:
    """A tiny backdoored model: SmallCNN (width 16) trained 15 epochs (batch 64) on digits with BadNets
    (ratio 0.1): test ACC 0.98, ASR 0.97. Trained once per test session (~11 s on 2 CPU cores). Returns the checkpoint
    path and the test metrics the Trainer measured right after training.
    """
    import lightning as L

    from datamodules import BackdoorDataModule
    from datamodules.triggers import BadNets
    from lightning_modules import VictimTraining
    from lightning_modules.backbones import SmallCNN

    root = tmp_path_factory.mktemp("backdoored")
    L.seed_everything(0, verbose=False)
    data = BackdoorDataModule("digits", data_dir=str(digits_dir), trigger=BadNets(), poison_ratio=0.1,
                              batch_size=64, cache_dir=None)
    model = VictimTraining(functools.partial(SmallCNN, width=16))
    trainer = L.Trainer(max_epochs=15, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, default_root_dir=root)
    trainer.fit(model, data)
    metrics = trainer.test(model, data, verbose=False)
    path = root / "backdoored.ckpt"
    trainer.save_checkpoint(path)
    merged = {k: v for d in metrics for k, v in d.items()}
    return {"path": path, "data_dir": digits_dir, "metrics": merged, "poison_indices": data.poison_indices.clone()}


def write_backbone_checkpoint(path: Path, backbone: str, seed: int = 0, data_dir: str = "data", **init_args) -> Path:
    """An untrained 'attacked' checkpoint of a registered backbone at its test width (tests/helpers.py: TEST_WIDTH;
    the same module names), with a digits + BadNets record: what a defense needs to build and run on it."""
    from datamodules.datasets import Digits
    from datamodules.poisoning import poison_indices
    from datamodules.record import BACKDOOR_KEY, RECORD_VERSION
    from datamodules.triggers import BadNets
    from lightning_modules.backbones import BACKBONES, backbone_config
    from tests.helpers import TEST_WIDTH

    factory = functools.partial(TEST_WIDTH.get(backbone, BACKBONES[backbone]), **init_args)
    torch.manual_seed(seed)
    net = factory(10)
    labels = torch.from_numpy(Digits().build("train")[1])
    trigger = BadNets()
    record = {
        "version": RECORD_VERSION,
        "backbone": backbone_config(factory),
        "data": {"dataset": "digits", "data_dir": str(data_dir), "spec": Digits.spec.to_dict()},
        "attack": {"name": "BadNets", "trigger": trigger.record(), "target": 0, "mode": "all_to_one",
                   "poison_ratio": 0.1, "poison_seed": 0, "ratio_over_target": False, "clean_label": False,
                   "training_controlled": False, "poison_indices": poison_indices(labels, 0.1, 0)},
    }
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, BACKDOOR_KEY: record, "hyper_parameters": {}}, path)
    return path


@pytest.fixture(scope="session")
def backbone_checkpoint(tmp_path_factory, digits_dir):
    """Factory: backbone_checkpoint("vgg19_bn") -> path of an untrained checkpoint of that backbone at its test
    width, written once per session and argument set; treat it as read-only."""
    root = tmp_path_factory.mktemp("backbones")
    written: dict[tuple, Path] = {}

    def make(name: str, **init_args) -> Path:
        key = (name, tuple(sorted(init_args.items())))
        if key not in written:
            tag = "-".join(f"{k}{v}" for k, v in key[1])
            written[key] = write_backbone_checkpoint(root / f"{name}{tag}.ckpt", name, data_dir=digits_dir, **init_args)
        return written[key]

    return make


@pytest.fixture
def run_defense(tmp_path):
    """run_defense(NAD, checkpoint, epochs=1, data={"spc": 3}, teacher_epochs=1) -> the fitted defense:
    tests/helpers.py's `run_defense`, each call in its own folder under tmp_path (or `root=`)."""
    from tests import helpers

    count = itertools.count()

    def run(defense, checkpoint=None, *, root: Path | None = None, **kwargs):
        return helpers.run_defense(defense, checkpoint, root or tmp_path / f"run{next(count)}", **kwargs)

    return run
