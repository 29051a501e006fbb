"""The defender's clean mitigation set D_m and its validation split D_v (protocol.md, "SPC").

By samples per class (`spc`): drawn per class, with a seeded generator, from the training images that were
never poisoned. Each class's order is a seeded permutation of *all* its images (poisoned or not), taken in
turn, so a split seed gives the same D_m for every attack wherever their poisoned sets allow: comparisons
across attacks and ratios stay paired. Clean-label attacks (SIG) can poison every image of the target class
(CIFAR-10 at ratio 0.1); for them `originals_allowed` lets D_m fall back on the *clean originals* of poisoned
images of a class that has too few unpoisoned ones, as the survey's code did (it drew D_m from the clean
originals of the whole training set). The defender still never sees a poisoned image; `MitigationSplit.source`
records where D_m came from.

Validation ("fork" convention of the survey): int(val_fraction * spc) images per class are held out of the spc
drawn; when that is < 1, spc + 1 are drawn and 1 is held out (SPC 2: 2 + 1, SPC 10: 9 + 1, SPC 100: 90 + 10).
By `ratio`: round(ratio * N) images drawn uniformly from the clean pool, and val_fraction of each class (at
least 1) held out. `val_fraction=0` gives no D_v.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MitigationSplit:
    train: Tensor  # indices into the training set (D_m minus D_v)
    val: Tensor  # indices of D_v (may be empty)
    convention: str  # how D_v was carved, recorded with every result
    source: str = "unpoisoned images"  # where D_m came from (clean originals of poisoned images, see above)


def clean_pool(num_train: int, poisoned: Tensor | None) -> Tensor:
    keep = torch.ones(num_train, dtype=torch.bool)
    if poisoned is not None and len(poisoned):
        keep[poisoned] = False
    return torch.nonzero(keep).flatten()


def split_by_spc(
    labels: Tensor, spc: int, split_seed: int, poisoned: Tensor | None = None, val_fraction: float = 0.1,
    originals_allowed: bool = False,
) -> MitigationSplit:
    if spc < 1:
        raise ValueError(f"spc (samples per class) must be >= 1, got {spc}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    per_val = int(val_fraction * spc)
    extra = 1 if val_fraction > 0 and per_val < 1 else 0
    per_val = max(per_val, extra)
    draw = spc + extra
    is_poisoned = torch.zeros(len(labels), dtype=torch.bool)
    if poisoned is not None and len(poisoned):
        is_poisoned[poisoned] = True
    gen = torch.Generator().manual_seed(split_seed)
    train, val, originals = [], [], {}
    for c in range(int(labels.max()) + 1):
        members = torch.nonzero(labels == c).flatten()
        order = members[torch.randperm(len(members), generator=gen)]  # same draws whatever is poisoned
        hit = is_poisoned[order]
        clean = order[~hit]
        if len(clean) < draw and originals_allowed:  # clean-label: the clean originals of poisoned images
            originals[c] = min(draw - len(clean), int(hit.sum()))
            clean = torch.cat([clean, order[hit]])
        if len(clean) < draw:
            poisoned_note = f" ({int(hit.sum())} of its {len(members)} images are poisoned)" if hit.any() else ""
            largest = len(clean) - extra
            raise ValueError(
                f"class {c} has {len(clean)} clean training images{poisoned_note}, fewer than the {draw} needed "
                f"for spc={spc}" + (" plus 1 validation image" if extra else "") +
                (f"; lower spc to {largest} or less" if largest >= 1 else "; no spc can be drawn from this class")
            )
        chosen = clean[:draw]
        val.append(chosen[:per_val])
        train.append(chosen[per_val:])
    convention = f"fork: {draw} drawn per class, {per_val} held out for validation"
    source = "unpoisoned images"
    if originals:
        source += " + clean originals of poisoned images (" + ", ".join(
            f"class {c}: {n}" for c, n in originals.items()) + ")"
    return MitigationSplit(torch.cat(train).sort().values, torch.cat(val).sort().values, convention, source)


def split_by_ratio(
    labels: Tensor, ratio: float, split_seed: int, poisoned: Tensor | None = None, val_fraction: float = 0.1
) -> MitigationSplit:
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must lie in (0, 1] (a fraction of the training set), got {ratio}")
    pool = clean_pool(len(labels), poisoned)
    count = round(ratio * len(labels))
    if count > len(pool):
        raise ValueError(f"ratio {ratio} asks for {count} clean images but only {len(pool)} are clean")
    gen = torch.Generator().manual_seed(split_seed)
    chosen = pool[torch.randperm(len(pool), generator=gen)[:count]]
    val = []
    if val_fraction > 0:
        for c in labels[chosen].unique():
            members = chosen[labels[chosen] == c]
            if len(members) < 2:
                raise ValueError(
                    f"class {int(c)} has {len(members)} image(s) in the ratio-{ratio} draw; a validation "
                    f"split needs >= 2 per class: raise ratio or set val_fraction: 0"
                )
            val.append(members[: max(1, int(val_fraction * len(members)))])
    val_idx = torch.cat(val) if val else chosen[:0]
    train_idx = chosen[~torch.isin(chosen, val_idx)]
    convention = f"ratio: {count} drawn, {val_fraction:.0%} of each class (>= 1) held out for validation"
    return MitigationSplit(train_idx.sort().values, val_idx.sort().values, convention)
