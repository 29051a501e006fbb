"""The defender's clean set D_m by samples per class or ratio (protocol.md, "SPC")."""

from __future__ import annotations

import pytest
import torch

from datamodules.splits import split_by_ratio, split_by_spc

LABELS = torch.arange(2000) % 10
POISONED = torch.arange(0, 2000, 7)


@pytest.mark.parametrize("spc, train, val", [(2, 2, 1), (10, 9, 1), (100, 90, 10), (5, 5, 1), (20, 18, 2)])
def test_fork_convention_counts(spc: int, train: int, val: int) -> None:
    split = split_by_spc(LABELS, spc, split_seed=0, poisoned=POISONED)
    assert torch.bincount(LABELS[split.train], minlength=10).tolist() == [train] * 10
    assert torch.bincount(LABELS[split.val], minlength=10).tolist() == [val] * 10
    assert "fork" in split.convention


def test_no_validation() -> None:
    split = split_by_spc(LABELS, 10, 0, POISONED, val_fraction=0.0)
    assert len(split.val) == 0 and torch.bincount(LABELS[split.train]).tolist() == [10] * 10


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_disjoint_from_poison_and_each_other(seed: int) -> None:
    split = split_by_spc(LABELS, 100, seed, POISONED)
    assert not torch.isin(split.train, POISONED).any() and not torch.isin(split.val, POISONED).any()
    assert not torch.isin(split.train, split.val).any()


def test_deterministic_per_split_seed() -> None:
    a, b, c = (split_by_spc(LABELS, 10, s, POISONED) for s in (3, 3, 4))
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert not torch.equal(a.train, c.train)


def test_too_few_images_names_class_and_count() -> None:
    labels = torch.cat([torch.zeros(50), torch.ones(5)]).long()
    with pytest.raises(ValueError, match=r"class 1 has 5 clean training images.*spc=10"):
        split_by_spc(labels, 10, 0)
    with pytest.raises(ValueError, match="spc"):
        split_by_spc(LABELS, 0, 0)


def test_ratio_mode() -> None:
    split = split_by_ratio(LABELS, 0.05, 0, POISONED)
    assert len(split.train) + len(split.val) == 100
    assert not torch.isin(torch.cat([split.train, split.val]), POISONED).any()
    assert len(LABELS[split.val].unique()) == len(LABELS[torch.cat([split.train, split.val])].unique())
    with pytest.raises(ValueError, match="ratio"):
        split_by_ratio(LABELS, 0.0, 0)


def test_same_draw_for_every_attack_where_possible() -> None:
    """Each class's order is a seeded permutation of all its images: two poisoned sets give the same D_m except
    where a chosen image is poisoned in one of them (paired comparisons across attacks and ratios)."""
    other = torch.arange(3, 2000, 11)
    a, b, none = (split_by_spc(LABELS, 10, 5, p) for p in (POISONED, other, None))
    for split, poisoned in ((a, POISONED), (b, other)):
        chosen = torch.cat([split.train, split.val])
        unpoisoned_pick = torch.cat([none.train, none.val])
        unpoisoned_pick = unpoisoned_pick[~torch.isin(unpoisoned_pick, poisoned)]
        assert torch.isin(unpoisoned_pick, chosen).all()  # what the clean draw picked, unless poisoned here
    assert len(set(a.train.tolist()) & set(b.train.tolist())) > 0.6 * len(a.train)


def test_clean_label_takes_clean_originals_only_when_needed() -> None:
    """SIG at ratio 0.1 on CIFAR-10 poisons every class-0 image: D_m can only be drawn from their clean
    originals (the survey's code drew from them always); other classes still use unpoisoned images only."""
    every_zero = torch.nonzero(LABELS == 0).flatten()
    with pytest.raises(ValueError, match=r"class 0 has 0 clean training images \(200 of its 200 images are "
                                         r"poisoned\).*no spc can be drawn"):
        split_by_spc(LABELS, 10, 0, every_zero)
    split = split_by_spc(LABELS, 10, 0, every_zero, originals_allowed=True)
    chosen = torch.cat([split.train, split.val])
    assert torch.bincount(LABELS[chosen]).tolist() == [10] * 10
    assert torch.isin(chosen, every_zero).sum() == 10  # class 0 from the originals, nothing else poisoned
    assert split.source == "unpoisoned images + clean originals of poisoned images (class 0: 10)"
    # with enough unpoisoned images left, nothing changes
    some = every_zero[:150]
    allowed, strict = split_by_spc(LABELS, 10, 0, some, originals_allowed=True), split_by_spc(LABELS, 10, 0, some)
    assert torch.equal(allowed.train, strict.train) and torch.equal(allowed.val, strict.val)
    assert allowed.source == strict.source == "unpoisoned images"
    mixed = split_by_spc(LABELS, 10, 0, every_zero[:195], originals_allowed=True)  # 5 clean + 5 originals
    assert torch.isin(torch.cat([mixed.train, mixed.val]), every_zero[:195]).sum() == 5
