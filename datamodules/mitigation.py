"""The defender's DataModule: the clean mitigation set D_m (and D_v) of an attacked run, plus its test sets.

Everything about the data comes from the attacked checkpoint's backdoor record: the dataset, the
trigger (to build the backdoor *test* set, which only the benchmark's evaluation sees) and the poisoned
indices (which D_m must avoid). `backdoored` names that checkpoint; train.py links it from the defense's
`model.init_args.backdoored`.

Loaders: train = D_m minus D_v, `(x, y)` uint8 batches; val = D_v; test = [clean, backdoor] as in
`BackdoorDataModule`. `tensors()` gives D_m directly for defenses that iterate themselves.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from datamodules.cache import fingerprint
from datamodules.datasets import DataSpec, get_dataset
from datamodules.loader import TensorImages, tensor_loader
from datamodules.poisoning import backdoor_test_set
from datamodules.record import load_record
from datamodules.retuning import Retuning, clean_split, poisons, qra_set
from datamodules.splits import MitigationSplit, split_by_ratio, split_by_spc
from datamodules.tensor_module import TensorDataModule
from datamodules.triggers.base import Trigger, build_trigger


class MitigationDataModule(TensorDataModule):
    """Args:
        spc: clean samples per class in D_m (the survey's SPC: 2, 10 or 100). Exactly one of spc / ratio.
        ratio: D_m as a fraction of the training set instead (BackdoorBench's default 0.05).
        split_seed: seed of the draw (the survey repeats each setting over split seeds 0..9).
        val_fraction: share of D_m held out as D_v (see datamodules/splits.py); 0 (the default) disables
            D_v: only FP and ANP carve one (their configs set 0.1), the others train on all of D_m.
        batch_size: batch size over D_m (256 in the survey unless a defense says otherwise).
        samples_per_epoch: draw this many D_m images per epoch *with replacement* (uniformly, seeded by the
            global seed) instead of one shuffled pass; ANP's fork samples 2,000 batches of 256 this way
            (its config: 128,000 = 500 batches per epoch). None (the default): one pass without replacement.
        eval_batch_size: batch size of D_v and the test sets.
        backdoored: path of the attacked checkpoint (train.py links it from model.init_args.backdoored);
            None, for direct use with a Trainer only: the record of the defense it runs with.
        data_dir: override the data folder recorded by the attack run.
        on_device: keep the tensors on the accelerator.
        retune: the retuning attack's settings (datamodules/retuning.py): its set is built beside D_m and the
            defense retunes the defended model after "after" (and, once per attacked model and D_m, the attacked
            model and `clean_model` on the same set); None (the default): no retuning.
    """

    def __init__(
        self,
        spc: int | None = 10,
        ratio: float | None = None,
        split_seed: int = 0,
        val_fraction: float = 0.0,
        batch_size: int = 256,
        samples_per_epoch: int | None = None,
        eval_batch_size: int = 512,
        backdoored: str | None = None,
        data_dir: str | None = None,
        on_device: bool = True,
        retune: Retuning | None = None,
    ) -> None:
        super().__init__(on_device)
        if (spc is None) == (ratio is None):
            raise ValueError(f"give exactly one of spc and ratio (got spc={spc}, ratio={ratio})")
        if spc is not None and spc < 1:
            raise ValueError(f"spc (clean samples per class) must be >= 1, got {spc}")
        if ratio is not None and not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must lie in (0, 1], got {ratio}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1 (null: one pass over D_m), got {samples_per_epoch}")
        self.spc, self.ratio, self.split_seed, self.val_fraction = spc, ratio, split_seed, val_fraction
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.samples_per_epoch = samples_per_epoch
        self.backdoored, self.data_dir, self.retune = backdoored, data_dir, retune
        self._retune_info: dict[str, Any] = {}
        self.split: MitigationSplit | None = None
        self.spec: DataSpec | None = None

    def _record(self) -> dict[str, Any]:
        if self.backdoored is not None:
            return load_record(self.backdoored)
        # direct use (tests, notebooks) without `backdoored`: the record the defense module loaded
        module = self.trainer.lightning_module if self.trainer is not None else None
        record = getattr(module, "backdoor_record", None)
        if record is None:
            raise ValueError(
                "MitigationDataModule needs the attacked run: give data.backdoored=<checkpoint> or use it "
                "with a defense model that loads one (model.backdoored)"
            )
        return record

    def setup(self, stage: str | None = None) -> None:
        if self._sets:
            return
        record = self._record()
        data, attack = record["data"], record["attack"]
        source = get_dataset(data["dataset"])
        self.spec = DataSpec.from_dict(data["spec"])
        data_dir = self.data_dir or data["data_dir"]
        x_train, y_train = source.load(data_dir, "train")
        x_test, y_test = source.load(data_dir, "test")
        poisoned = attack["poison_indices"] if attack else None
        if self.spc is not None:
            # clean-label attacks may leave a class without unpoisoned images: D_m then takes clean originals
            originals = bool(attack and attack.get("clean_label"))
            self.split = split_by_spc(y_train, self.spc, self.split_seed, poisoned, self.val_fraction, originals)
        else:
            self.split = split_by_ratio(y_train, self.ratio, self.split_seed, poisoned, self.val_fraction)
        tr, va = self.split.train, self.split.val
        sets = {
            "train": TensorImages(x_train[tr], y_train[tr]),
            "val": TensorImages(x_train[va], y_train[va]),
            "clean": TensorImages(x_test, y_test),
        }
        if attack is not None:
            trigger = build_trigger(attack["trigger"])
            sets["backdoor"] = TensorImages(*backdoor_test_set(x_test, y_test, trigger, attack["target"],
                                                               attack["mode"], self.spec.num_classes))
            if self.retune is not None:
                sets |= self._retuning_sets(x_train, y_train, attack, trigger)
        device = self._device()
        self._sets = {k: v.to(device) for k, v in sets.items()}

    def _retuning_sets(self, x: Tensor, y: Tensor, attack: dict[str, Any], trigger: Trigger
                       ) -> dict[str, TensorImages]:
        r, split = self.retune, self.split
        dm = torch.cat([split.train, split.val])
        chosen = clean_split(y, attack["poison_indices"], r, exclude=dm) if r.clean == "split" else dm
        x_p, y_p = poisons(x, y, attack, trigger, self.spec.num_classes, r, exclude=torch.cat([chosen, dm]))
        flags = torch.cat([torch.zeros(len(chosen), dtype=torch.bool), torch.ones(r.k, dtype=torch.bool)])
        sets = {"retune": TensorImages(torch.cat([x[chosen], x_p]), torch.cat([y[chosen], y_p]), flags)}
        # D_m images the split's draw skipped (the next ones took their places)
        skipped = int(torch.isin(clean_split(y, attack["poison_indices"], r), dm).sum()) if r.clean == "split" else 0
        self._retune_info = {"clean_source": r.clean, "size": len(chosen) + r.k, "poisons": r.k,
                             "poison_fraction": r.k / (len(chosen) + r.k), "dm_images_skipped": skipped}
        if r.qra:
            sets["qra"] = TensorImages(*qra_set(x, y, chosen, attack, trigger, self.spec.num_classes, r))
        return sets

    def retuning(self) -> tuple[tuple[Tensor, ...], dict[str, Any]] | None:
        """The retuning set (images, labels, is-poison flags) and what it holds (datamodules/retuning.py); None
        when retuning is off or the model is clean (no poisons to retune with)."""
        if "retune" not in self._sets:
            return None
        return self._sets["retune"].tensors, self._retune_info

    def qra_data(self) -> tuple[Tensor, Tensor] | None:
        """QRA's training images and their true labels (datamodules/retuning.py), or None when QRA is off."""
        return self._sets["qra"].tensors if "qra" in self._sets else None

    def tensors(self, part: str = "train") -> tuple[Tensor, ...]:
        """The tensors of one part: "train" (D_m minus D_v) and "val" (D_v) as (images, labels); the test sets
        "clean" as (images, labels) and "backdoor" as (triggered images, attack labels, true labels)."""
        return super().tensors(part)

    def test_set(self, part: str) -> tuple[Tensor, ...]:
        """The benchmark's test set "clean" (images, labels) or "backdoor" (triggered images, attack labels, true
        labels), for the base's before/after measurement only: a defense reads its data through `tensors`."""
        if part not in ("clean", "backdoor"):
            raise KeyError(f"no test set {part!r} (have clean and backdoor)")
        return self._sets[part].tensors

    def test_digest(self) -> str:
        """A digest of the test sets' tensors as they are now: what the cache of "before" measurements
        (lightning_modules/defenses/evaluation.py) keys them by."""
        return fingerprint([self._sets[k].tensors for k in ("clean", "backdoor") if k in self._sets])

    def train_dataloader(self) -> DataLoader:
        return tensor_loader(self._sets["train"], self.batch_size, shuffle=True, num_samples=self.samples_per_epoch)

    def val_dataloader(self) -> DataLoader | list:
        if len(self._sets["val"]) == 0:
            return []  # no D_v: no validation loop
        return tensor_loader(self._sets["val"], self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> list[DataLoader]:
        names = [n for n in ("clean", "backdoor") if n in self._sets]
        return [tensor_loader(self._sets[n], self.eval_batch_size, shuffle=False) for n in names]

    def record(self) -> dict[str, Any]:
        """What a defense result records about its data."""
        return {
            "spc": self.spc, "ratio": self.ratio, "split_seed": self.split_seed,
            "val_fraction": self.val_fraction, "samples_per_epoch": self.samples_per_epoch,
            "val_convention": self.split.convention if self.split else None,
            "dm_source": self.split.source if self.split else None,
            "num_train": len(self.split.train) if self.split else None,
            "num_val": len(self.split.val) if self.split else None,
        }
