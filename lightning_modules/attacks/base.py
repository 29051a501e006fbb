"""Training-controlled (outsourced-training) attacks: the attacker owns training and poisons inside
`training_step` (WaNet, IAB, BPP, LIRA).

The DataModule stays clean (`data.init_args.trigger: null`) and serves the backdoor test set untriggered
(`serve_untriggered_backdoor_set: true`: non-target test images with attack and true labels), as
configs/attack/{wanet,iab,bpp,lira}.yaml set. The attack's `poison_ratio`, `target` and `mode` are its own
arguments; train.py links them from the DataModule's (data.init_args.*), so the backdoor test set and the
poisoning agree by construction; used directly, give both the same values (`setup` checks that they agree).
The attack's trigger is `self.trigger`, a `datamodules.triggers.Trigger` owned by this module: it triggers the
backdoor test images during evaluation and is stored (config + state: warp field, generator weights, ...) in
the checkpoint's backdoor record, so defenses and notebooks regenerate exactly the trained backdoor with
`build_trigger`.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor

from datamodules.poisoning import MODES, Mode, attack_labels
from datamodules.triggers.base import Trigger
from lightning_modules.attacks.batch_augment import warn_if_unpoisoned
from lightning_modules.victim import VictimTraining


class TrainingControlledAttack(VictimTraining):
    """Base class; subclasses create `self.trigger` in `__init__` and implement `training_step`. They take
    VictimTraining's arguments by keyword (`**kwargs`), declaring only those whose default or meaning differs.

    Args:
        poison_ratio: the share of every training batch that gets the backdoor, int(p * B) samples.
        target: the attack's target class (all-to-one).
        mode: all_to_one (label -> target) or all_to_all (label -> label + 1 mod K).
    """

    trigger: Trigger

    def __init__(self, poison_ratio: float = 0.1, target: int = 0, mode: Mode = "all_to_one", **kwargs: Any) -> None:
        # load_from_checkpoint hands a constructor that takes **kwargs all saved hparams, with the `_class_path`
        # that VictimTraining.on_save_checkpoint adds to them
        kwargs.pop("_class_path", None)
        super().__init__(**kwargs)
        if not 0.0 <= poison_ratio <= 1.0:
            raise ValueError(f"poison_ratio must lie in [0, 1] (a fraction of each batch), got {poison_ratio}")
        if target < 0 or mode not in MODES:
            raise ValueError(f"expected a target class >= 0 and a mode in {MODES}, got target {target}, mode {mode!r}")
        self.poison_ratio, self.target, self.mode = poison_ratio, target, mode

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if getattr(self.trigger, "clean_label", False):
            raise ValueError(f"{type(self).__name__}'s trigger must not be clean-label")
        self.check_data(self.attack_data)

    def check_data(self, data: Any) -> None:
        """The DataModule must serve what this attack is evaluated on; only read, never changed."""
        name = type(self).__name__
        if data.trigger is not None:
            raise ValueError(f"{name} poisons during training: remove data.init_args.trigger "
                             f"({type(data.trigger).__name__}) from the config")
        if not data.serve_untriggered_backdoor_set:
            raise ValueError(f"{name} triggers the backdoor test images itself: set "
                             f"data.init_args.serve_untriggered_backdoor_set: true (configs/attack/*.yaml do), "
                             f"or BackdoorDataModule(serve_untriggered_backdoor_set=True)")
        ours, theirs = (self.poison_ratio, self.target, self.mode), (data.poison_ratio, data.target, data.mode)
        if ours != theirs:
            raise ValueError(f"{name} poisons with (poison_ratio, target, mode) {ours}, but its DataModule's backdoor "
                             f"test set is for {theirs}: give both the same values (train.py links "
                             f"data.init_args.{{poison_ratio,target,mode}} to the model)")
        warn_if_unpoisoned(self, data.batch_size)

    def backdoor_inputs(self, x: Tensor) -> Tensor:
        return self.trigger(x)

    def attack_targets(self, y: Tensor) -> Tensor:
        return attack_labels(y, self.target, self.mode, self.spec.num_classes)

    def num_poisoned(self, batch_size: int) -> int:
        """How many samples of a batch get the backdoor: int(p * B), as the references do."""
        return int(self.poison_ratio * batch_size)

    def attack_record(self) -> dict[str, Any]:
        return {
            "name": type(self).__name__,
            "trigger": self.trigger.record(),
            "target": self.target, "mode": self.mode,
            "poison_ratio": self.poison_ratio, "poison_seed": None,
            "clean_label": False, "training_controlled": True,
            "poison_indices": None,
            "settings": self.attack_settings(),
        }

    def attack_settings(self) -> dict[str, Any]:
        """The record's `settings`: the hyperparameters this attack adds to victim training (plain values);
        subclasses add facts that are not arguments."""
        shared = {*inspect.signature(VictimTraining.__init__).parameters,
                  *inspect.signature(TrainingControlledAttack.__init__).parameters}
        own = [n for n in inspect.signature(type(self).__init__).parameters if n not in shared]
        return {n: list(v) if isinstance(v, tuple) else v for n, v in self.hparams.items() if n in own}
