"""The attack-stage DataModule: a dataset, optionally poisoned by a trigger, served as uint8 tensors.

Training batches are `(x uint8 [B, 3, H, W], y)`; evaluation loaders are `[clean, backdoor]` with clean
batches `(x, y)` and backdoor batches `(x, y_attack, y_true)`. The poisoned copy of the training set is
built once (trigger applied in uint8, before any augmentation) and cached on disk under a hash of its
inputs. Augmentation and normalisation happen on the device, in the LightningModule.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader

from datamodules.cache import cached
from datamodules.datasets import DataSpec, get_dataset
from datamodules.loader import TensorImages, tensor_loader
from datamodules.poisoning import Mode, attack_labels, check_attack_args, poison_indices
from datamodules.triggers.base import Trigger

CLEAN, BACKDOOR = 0, 1  # evaluation dataloader indices
DEFAULT_CACHE = os.environ.get("BACKDOOR_BENCH_CACHE", "~/.cache/backdoor-bench")


class BackdoorDataModule(L.LightningDataModule):
    """Args:
        dataset: registered dataset name (digits, cifar10, gtsrb, tiny_imagenet).
        data_dir: folder holding `<dataset>/{train,test}.npz` (written by `python -m datamodules.prepare`).
        trigger: the data-poisoning trigger; None for clean training or training-controlled attacks.
        poison_ratio: fraction of the whole training set to poison, in [0, 1].
        target: the attack's target class (all-to-one).
        mode: all_to_one (label -> target) or all_to_all (label -> label + 1 mod K).
        poison_seed: seed of the poisoned indices.
        ratio_over_target: clean-label triggers only: read poison_ratio as a fraction of the target class.
        batch_size: training batch size.
        eval_batch_size: evaluation batch size.
        download: prepare missing dataset files by downloading the originals.
        cache_dir: where poisoned copies are cached; None: no disk cache.
        on_device: keep the whole dataset on the accelerator (GPU runs).
    """

    def __init__(
        self,
        dataset: str = "digits",
        data_dir: str = "data",
        trigger: Trigger | None = None,
        poison_ratio: float = 0.1,
        target: int = 0,
        mode: Mode = "all_to_one",
        poison_seed: int = 0,
        ratio_over_target: bool = False,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        download: bool = True,
        cache_dir: str | None = DEFAULT_CACHE,
        on_device: bool = True,
    ) -> None:
        super().__init__()
        self.source = get_dataset(dataset)
        check_attack_args(poison_ratio, target, self.source.spec.num_classes, mode)
        if trigger is not None and trigger.clean_label and mode != "all_to_one":
            raise ValueError(f"{type(trigger).__name__} is a clean-label attack: it supports mode all_to_one only")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {eval_batch_size}")
        self.dataset, self.data_dir, self.trigger = dataset, data_dir, trigger
        self.poison_ratio, self.target, self.mode, self.poison_seed = poison_ratio, target, mode, poison_seed
        self.ratio_over_target = ratio_over_target
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.download, self.on_device = download, on_device
        self.cache_dir = os.path.expanduser(cache_dir) if cache_dir else None
        # Training-controlled attacks trigger test images themselves: they set this to get the untriggered
        # backdoor candidates (non-target images with attack and true labels) when `trigger` is None.
        self.serve_untriggered_backdoor_set = False
        self.poison_indices: Tensor | None = None
        self._sets: dict[str, TensorImages] = {}

    @property
    def spec(self) -> DataSpec:
        return self.source.spec

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def prepare_data(self) -> None:
        if self.download and not self.source.is_prepared(self.data_dir):
            self.source.prepare(self.data_dir, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self._sets:
            return
        x_train, y_train = self.source.load(self.data_dir, "train")
        x_test, y_test = self.source.load(self.data_dir, "test")
        y_attack = attack_labels(y_test, self.target, self.mode, self.num_classes)
        keep = y_attack != y_test
        x_bd, ya_bd, yt_bd = x_test[keep], y_attack[keep], y_test[keep]
        if self.trigger is None:
            self.poison_indices = torch.zeros(0, dtype=torch.long)
        else:
            if not self.trigger.from_record:
                victim = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
                self.trigger.bind_run(self.dataset, self.target, self.data_dir, getattr(victim, "backbone_spec", None))
                self.trigger.fit(x_train, y_train)  # e.g. SSBA trains its encoder on the clean training set
                if self.trigger.report():
                    rank_zero_info(f"{type(self.trigger).__name__} trigger: "
                                   + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in self.trigger.report().items()))
            idx = poison_indices(y_train, self.poison_ratio, self.poison_seed, self.target,
                                 self.trigger.clean_label, self.ratio_over_target)
            poisoned = cached(self.cache_dir, self._cache_key(x_train, y_train, x_test, idx),
                              lambda: {"train": self.trigger.apply_chunked(x_train[idx]),
                                       "test": self.trigger.apply_chunked(x_bd)})
            x_train = x_train.clone()
            x_train[idx] = poisoned["train"]
            if not self.trigger.clean_label:
                y_train = y_train.clone()
                y_train[idx] = attack_labels(y_train[idx], self.target, self.mode, self.num_classes)
            x_bd, self.poison_indices = poisoned["test"], idx
        device = self._device()
        self._sets = {
            "train": TensorImages(x_train, y_train).to(device),
            "clean": TensorImages(x_test, y_test).to(device),
            "backdoor": TensorImages(x_bd, ya_bd, yt_bd).to(device),
        }

    def _cache_key(self, x_train: Tensor, y_train: Tensor, x_test: Tensor, idx: Tensor) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "content": [y_train, x_train[::997], x_test[::997]],  # a cheap fingerprint of the files
            "trigger": self.trigger.record(),
            "indices": idx, "target": self.target, "mode": self.mode,
        }

    def _device(self) -> torch.device:
        if self.on_device and self.trainer is not None and self.trainer.strategy.root_device.type == "cuda":
            return self.trainer.strategy.root_device
        return torch.device("cpu")

    def tensors(self, part: str) -> tuple[Tensor, ...]:
        """The tensors of one part: "train" (poisoned training set) and "clean" as (images, labels);
        "backdoor" as (images, attack labels, true labels), triggered when this module has a trigger."""
        if part not in self._sets:
            raise KeyError(f"no {part!r} data (have {sorted(self._sets)}; call setup() first)")
        return self._sets[part].tensors

    @property
    def has_backdoor_set(self) -> bool:
        return self.trigger is not None or self.serve_untriggered_backdoor_set

    def train_dataloader(self) -> DataLoader:
        return tensor_loader(self._sets["train"], self.batch_size, shuffle=True)

    def _eval_loaders(self) -> list[DataLoader]:
        names = ["clean", "backdoor"] if self.has_backdoor_set else ["clean"]
        return [tensor_loader(self._sets[n], self.eval_batch_size, shuffle=False) for n in names]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()

    def record(self) -> dict[str, Any]:
        """The data part of the checkpoint's backdoor record (see datamodules/record.py)."""
        return {"dataset": self.dataset, "data_dir": self.data_dir, "spec": self.spec.to_dict()}

    def attack_record(self) -> dict[str, Any] | None:
        if self.trigger is None:
            return None
        return {
            "name": type(self.trigger).__name__,
            "trigger": self.trigger.record(),
            "target": self.target, "mode": self.mode,
            "poison_ratio": self.poison_ratio, "poison_seed": self.poison_seed,
            "ratio_over_target": self.ratio_over_target,
            "clean_label": self.trigger.clean_label, "training_controlled": False,
            "trigger_report": self.trigger.report(),
            "poison_indices": self.poison_indices.cpu() if self.poison_indices is not None else None,
        }
