"""The attack-stage DataModule: a dataset, optionally poisoned by a trigger, served as uint8 tensors.

Training batches are `(x uint8 [B, 3, H, W], y)`; evaluation loaders are `[clean, backdoor]` with clean
batches `(x, y)` and backdoor batches `(x, y_attack, y_true)`. The poisoned copy of the training set is
built once (trigger applied in uint8, before any augmentation) and cached on disk under a hash of its
inputs. Augmentation and normalisation happen on the device, in the LightningModule.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader

from datamodules.cache import cached
from datamodules.datasets import DataSpec, get_dataset
from datamodules.loader import TensorImages, tensor_loader
from datamodules.poisoning import (
    Mode,
    backdoor_candidates,
    check_attack_args,
    poison_indices,
    poison_training_set,
)
from datamodules.tensor_module import TensorDataModule
from datamodules.triggers.base import Trigger

CLEAN, BACKDOOR = 0, 1  # evaluation dataloader indices
DEFAULT_CACHE = os.environ.get("BACKDOOR_BENCH_CACHE", "~/.cache/backdoor-bench")


class BackdoorDataModule(TensorDataModule):
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
        serve_untriggered_backdoor_set: without a trigger, still serve the backdoor test set (non-target test
            images with attack and true labels) untriggered: training-controlled attacks (configs/attack/wanet.yaml,
            iab, bpp, lira) trigger its images themselves at evaluation.
        victim_backbone: the victim's backbone {class_path, init_args}, for triggers made against it (LF's
            surrogate, the survey's per-backbone LF pattern); train.py links it from model.init_args.backbone.
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
        serve_untriggered_backdoor_set: bool = False,
        victim_backbone: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(on_device)
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
        self.download = download
        self.cache_dir = os.path.expanduser(cache_dir) if cache_dir else None
        self.serve_untriggered_backdoor_set, self.victim_backbone = serve_untriggered_backdoor_set, victim_backbone
        self.poison_indices: Tensor | None = None

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
        x_bd, ya_bd, yt_bd = backdoor_candidates(x_test, y_test, self.target, self.mode, self.num_classes)
        if self.trigger is None:
            self.poison_indices = torch.zeros(0, dtype=torch.long)
        else:
            if not self.trigger.from_record:
                self.trigger.bind_run(self.dataset, self.target, self.data_dir, self.victim_backbone)
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
            x_train, y_train = poison_training_set(x_train, y_train, self.trigger, idx, self.target, self.mode,
                                                   self.num_classes, triggered=poisoned["train"])
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

    def tensors(self, part: str) -> tuple[Tensor, ...]:
        """The tensors of one part: "train" (poisoned training set) and "clean" as (images, labels);
        "backdoor" as (images, attack labels, true labels), triggered when this module has a trigger."""
        return super().tensors(part)

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
