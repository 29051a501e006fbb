"""FT: every weight is fine-tuned (the optimiser steps), the lr follows a cosine over max_epochs stepped per epoch, and
the defended weights do not depend on the benchmark's test sets."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lightning_modules.checkpoint import load_attacked
from lightning_modules.defenses import FT
from tests.helpers import assert_ignores_test_sets


class EpochLR(L.Callback):
    """The lr at the start of every epoch."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        groups = trainer.optimizers[0].param_groups if trainer.optimizers else []  # none: Lightning's mock optimiser
        self.lrs.append(groups[0]["lr"] if groups else math.nan)


def test_weights_move_and_lr_follows_a_cosine_over_max_epochs(backdoored_checkpoint, run_defense) -> None:
    path = backdoored_checkpoint["path"]
    watch = EpochLR()
    model = run_defense(FT, path, epochs=3, callbacks=[watch], save_defended=False)
    # all weights train: every parameter tensor moved, by more than rounding
    original = load_attacked(str(path)).net.state_dict()
    for name, p in model.net.named_parameters():
        assert float((p.detach() - original[name]).abs().max()) > 1e-4, name
    assert model.trainer.global_step == 3 * 7  # 100 images in batches of 16: 7 optimiser steps per epoch
    # cosine with T_max = max_epochs = 3, stepped per epoch: 0.01 (1 + cos(pi e / 3)) / 2 at the start of epoch e
    expected = [0.01 * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(4)]
    assert watch.lrs == pytest.approx(expected[:3], abs=1e-12)
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected[3], abs=1e-12)  # 0 at the end
    assert model.result["after"] != model.result["before"]


def test_defended_weights_ignore_the_test_sets(backdoored_checkpoint, tmp_path) -> None:
    path = backdoored_checkpoint["path"]

    def make(root):
        return FT(str(path), result_file=str(root / "result.json"), save_defended=False)

    plain, _ = assert_ignores_test_sets(make, path, tmp_path, epochs=2, batch_size=32)
    original = load_attacked(str(path)).net.state_dict()
    assert any(not torch.equal(v, original[k]) for k, v in plain.net.state_dict().items())  # it did train
