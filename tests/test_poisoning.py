"""Poisoned indices, labels and the backdoor test set (protocol.md, "Poisoning")."""

from __future__ import annotations

import pytest
import torch

from datamodules.poisoning import (attack_labels, backdoor_test_set, check_attack_args, poison_indices,
                                   poison_training_set)
from datamodules.triggers import SIG, BadNets

LABELS = torch.arange(1000) % 10  # 100 per class


@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.05, 0.1, 0.333, 1.0])
def test_count_is_rounded_ratio(ratio: float) -> None:
    idx = poison_indices(LABELS, ratio, seed=0)
    assert len(idx) == round(ratio * len(LABELS))
    assert len(idx.unique()) == len(idx) and torch.equal(idx, idx.sort().values)


def test_seeded_and_uniform_over_classes() -> None:
    a, b, c = (poison_indices(LABELS, 0.1, seed=s) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(LABELS[a].unique()) > 1, "drawn from the whole training set, not one class"


def test_clean_label_only_target_class() -> None:
    idx = poison_indices(LABELS, 0.05, seed=0, target=3, clean_label=True)
    assert len(idx) == 50 and (LABELS[idx] == 3).all()


def test_clean_label_infeasible_names_largest_ratio() -> None:
    with pytest.raises(ValueError, match=r"poison_ratio <= 0\.1000"):
        poison_indices(LABELS, 0.2, seed=0, target=3, clean_label=True)
    idx = poison_indices(LABELS, 0.2, seed=0, target=3, clean_label=True, ratio_over_target=True)
    assert len(idx) == 20 and (LABELS[idx] == 3).all()


def test_attack_labels() -> None:
    y = torch.tensor([0, 1, 9])
    assert attack_labels(y, 2, "all_to_one", 10).tolist() == [2, 2, 2]
    assert attack_labels(y, 2, "all_to_all", 10).tolist() == [1, 2, 0]


def test_poison_training_set_changes_only_indices() -> None:
    x = torch.zeros(20, 3, 32, 32, dtype=torch.uint8)
    y = torch.arange(20) % 10
    idx = torch.tensor([2, 5, 11])
    xp, yp = poison_training_set(x, y, BadNets(), idx, target=0, mode="all_to_one", num_classes=10)
    changed = (xp != x).flatten(1).any(1)
    assert torch.nonzero(changed).flatten().tolist() == idx.tolist()
    assert yp[idx].tolist() == [0, 0, 0]
    keep = torch.ones(20, dtype=torch.bool)
    keep[idx] = False
    assert torch.equal(yp[keep], y[keep])
    _, yc = poison_training_set(x, y, SIG(), idx, target=0, mode="all_to_one", num_classes=10)
    assert torch.equal(yc, y), "clean-label attacks keep labels"


@pytest.mark.parametrize("mode", ["all_to_one", "all_to_all"])
def test_backdoor_test_set(mode: str) -> None:
    x = torch.zeros(30, 3, 32, 32, dtype=torch.uint8)
    y = torch.arange(30) % 10
    xb, ya, yt = backdoor_test_set(x, y, BadNets(), target=0, mode=mode, num_classes=10)
    if mode == "all_to_one":
        assert len(xb) == 27 and (yt != 0).all() and (ya == 0).all()
    else:
        assert len(xb) == 30 and torch.equal(ya, (yt + 1) % 10)
    assert (xb[:, :, 29:, 29:] == 255).all()


@pytest.mark.parametrize("ratio, target, mode, match", [
    (-0.1, 0, "all_to_one", "poison_ratio"), (1.5, 0, "all_to_one", "poison_ratio"),
    (0.1, 10, "all_to_one", r"target must be a class index in 0\.\.9"), (0.1, -1, "all_to_one", "target"),
    (0.1, 0, "one_to_one", "unknown mode"),
])
def test_bad_attack_args(ratio, target, mode, match) -> None:
    with pytest.raises(ValueError, match=match):
        check_attack_args(ratio, target, 10, mode)


@pytest.mark.parametrize("trigger, ratio", [(BadNets(), 0.1), (SIG(), 0.05)])
def test_datamodule_poisons_exactly_the_recorded_indices(trigger, ratio: float) -> None:
    """What BackdoorDataModule trains on: pixels changed only at its poison_indices (all of them, by the trigger),
    labels set to the target there and nowhere else; a clean-label trigger keeps every label."""
    from datamodules import BackdoorDataModule
    from datamodules.datasets import get_dataset

    data = BackdoorDataModule("digits", trigger=trigger, poison_ratio=ratio, target=0, cache_dir=None)
    data.setup("fit")
    x, y = data.tensors("train")
    x0, y0 = get_dataset("digits").load("data", "train")
    idx = data.poison_indices
    changed = torch.nonzero((x != x0).flatten(1).any(1)).flatten()
    assert len(idx) == round(ratio * len(y0)) and torch.equal(changed, idx)
    assert torch.equal(x[idx], trigger(x0[idx]))
    relabelled = torch.nonzero(y != y0).flatten()
    if trigger.clean_label:
        assert len(relabelled) == 0 and (y0[idx] == 0).all()
    else:
        assert (y[idx] == 0).all() and torch.equal(relabelled, idx[y0[idx] != 0])
