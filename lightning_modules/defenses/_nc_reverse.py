"""Neural Cleanse's trigger reverse engineering for all candidate classes in one batched optimisation, and its
outlier test (used by lightning_modules/defenses/nc.py).

For every candidate class t, a mask m_t (1 x H x W) and a pattern delta_t (C x H x W), both tanh-parametrised in
[0, 1], minimise  CE(f((1 - m_t) x + m_t delta_t), t) + lambda_t ||m_t||_1  over batches of 0..1 pixels. The
classes share one tensor with a leading class dimension: each batch is stamped with every active class's
trigger and classified as one (K B) batch. The per-class losses are *summed* over classes (each one the batch
mean of the class's CE plus its own L1 term), so the gradient that reaches m_t, delta_t is exactly the one of
optimising t alone; Adam is elementwise, so one Adam over the stacked tensors keeps the classes uncoupled. The
network must be in eval mode (batch statistics would couple the classes). A class that stops early leaves the
forward pass and its slice is restored after every later step (Adam would otherwise move it on momentum).
`class_chunk` classifies the classes in groups with gradients accumulated, which changes memory, not results.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

EPSILON = 1e-7  # keeps tanh / (2 + eps) + 0.5 strictly inside (0, 1), as the reference


@dataclass(frozen=True)
class SearchSettings:
    """The optimisation and its per-class cost schedule (defaults: the survey's fork of BackdoorBench)."""

    epochs: int = 80
    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    init_cost: float = 1e-3
    success_threshold: float = 0.98  # attack success that counts as reaching the class
    patience: int = 5  # epochs above (below) the threshold before lambda goes up (down)
    cost_multiplier: float = 2.0  # up: x2; down: / 2 ** 1.5
    early_stop_patience: int = 25
    early_stop_threshold: float = 0.99  # "improved" means best L1 < 0.99 x the best so far
    class_chunk: int | None = None  # classes per forward pass (memory); None: all at once


@dataclass
class Triggers:
    """The reversed trigger of each candidate class: the smallest-L1 mask that reached the success threshold
    (or the last one, where none did), with the facts of its search."""

    classes: list[int]
    mask: Tensor  # (K, 1, H, W) in [0, 1]
    pattern: Tensor  # (K, C, H, W) in [0, 1]
    l1: Tensor  # (K,) ||mask||_1
    reached: Tensor  # (K,) bool: some epoch reached the success threshold
    epochs: Tensor  # (K,) epochs each class ran
    cost: Tensor  # (K,) lambda at the end
    history: list[dict[str, Any]] = field(default_factory=list)  # per epoch, per class: active, success, l1, cost


def unit_box(raw: Tensor) -> Tensor:
    return torch.tanh(raw) / (2 + EPSILON) + 0.5


def stamp(x: Tensor, mask: Tensor, pattern: Tensor) -> Tensor:
    """A(x, m, delta) = (1 - m) x + m delta, in 0..1 pixels."""
    return (1 - mask) * x + mask * pattern


def reverse_engineer(
    classify: Callable[[Tensor], Tensor],
    batches: Callable[[], Iterable[Tensor]],
    classes: Sequence[int],
    image_shape: tuple[int, int, int],
    settings: SearchSettings = SearchSettings(),
    device: torch.device | str = "cpu",
) -> Triggers:
    """Reverse-engineer a trigger toward each of `classes` at once.

    classify: 0..1 pixels (N, C, H, W) -> logits (N, num_classes), in eval mode.
    batches: called once per epoch, yields 0..1 pixel batches (B, C, H, W) (augmented, shuffled, as wished).
    """
    s = settings
    k, (c, h, w) = len(classes), image_shape
    targets = torch.as_tensor(list(classes), dtype=torch.long, device=device)
    mask_raw = torch.ones(k, 1, h, w, device=device, requires_grad=True)  # the reference's init: tanh(1) -> 0.88
    pattern_raw = torch.ones(k, c, h, w, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([mask_raw, pattern_raw], lr=s.lr, betas=s.betas)
    cost = torch.full((k,), s.init_cost, device=device)
    best_l1 = torch.full((k,), math.inf, device=device)
    best_mask, best_pattern = unit_box(mask_raw).detach().clone(), unit_box(pattern_raw).detach().clone()
    last_mask, last_pattern, last_l1 = best_mask.clone(), best_pattern.clone(), torch.zeros(k, device=device)
    up = torch.zeros(k, dtype=torch.long, device=device)
    down, stall = torch.zeros_like(up), torch.zeros_like(up)
    went_up = torch.zeros(k, dtype=torch.bool, device=device)
    went_down, reached = torch.zeros_like(went_up), torch.zeros_like(went_up)
    stall_best = torch.full((k,), math.inf, device=device)
    active, epochs_run = torch.ones_like(went_up), torch.zeros_like(up)
    history: list[dict[str, Any]] = []

    for epoch in range(s.epochs):
        live = active.nonzero().flatten()  # one host read per epoch
        if len(live) == 0:
            break
        chunks = live.split(s.class_chunk or len(live))
        hits, seen = torch.zeros(k, device=device), 0
        for x in batches():
            optimizer.zero_grad(set_to_none=True)
            for idx in chunks:
                mask, pattern = unit_box(mask_raw[idx]), unit_box(pattern_raw[idx])
                stamped = stamp(x[None], mask[:, None], pattern[:, None])  # (k, B, C, H, W)
                logits = classify(rearrange(stamped, "k b c h w -> (k b) c h w")).float()
                logits = rearrange(logits, "(k b) n -> k b n", k=len(idx))
                ce = F.cross_entropy(logits.transpose(1, 2), targets[idx, None].expand(-1, len(x)),
                                     reduction="none").mean(1)  # (k,): each class's batch-mean CE
                l1 = mask.flatten(1).sum(1)
                (ce + cost[idx] * l1).sum().backward()  # summed over classes: no class scales another's gradient
                hits[idx] += (logits.detach().argmax(2) == targets[idx, None]).sum(1).float()
                last_mask[idx], last_pattern[idx], last_l1[idx] = mask.detach(), pattern.detach(), l1.detach()
            seen += len(x)
            if len(live) < k:
                frozen = mask_raw.detach().clone(), pattern_raw.detach().clone()
            optimizer.step()
            if len(live) < k:  # stopped classes keep their slice (Adam would move it on momentum)
                with torch.no_grad():
                    keep = active.view(-1, 1, 1, 1)
                    mask_raw.copy_(torch.where(keep, mask_raw, frozen[0]))
                    pattern_raw.copy_(torch.where(keep, pattern_raw, frozen[1]))

        # -- per-class bookkeeping at the end of the epoch, vectorised over classes -------------------------------
        success = hits / max(1, seen)
        ok = success >= s.success_threshold
        # the mask of the epoch's last batch (the one the success was measured with on one-batch epochs)
        better = active & ok & (last_l1 < best_l1)
        best_mask[better], best_pattern[better], best_l1[better] = last_mask[better], last_pattern[better], last_l1[better]
        reached |= active & ok
        epochs_run += active.long()
        # early stop: lambda has moved both ways and the best L1 has not improved by 1% for `early_stop_patience`
        found = torch.isfinite(best_l1)
        stalled = found & (best_l1 >= s.early_stop_threshold * stall_best)
        stall = torch.where(active & found, torch.where(stalled, stall + 1, 0), stall)
        stall_best = torch.where(active, torch.minimum(stall_best, best_l1), stall_best)
        stop = active & went_up & went_down & (stall >= s.early_stop_patience)
        adapt = active & ~stop
        # cost adaptation: x multiplier after `patience` epochs in a row at or above the threshold, / multiplier^1.5
        # after `patience` epochs below it
        up = torch.where(adapt, torch.where(ok, up + 1, 0), up)
        down = torch.where(adapt, torch.where(ok, 0, down + 1), down)
        raise_ = adapt & (up >= s.patience)
        lower = adapt & ~raise_ & (down >= s.patience)
        cost = torch.where(raise_, cost * s.cost_multiplier, torch.where(lower, cost / s.cost_multiplier**1.5, cost))
        up, down = torch.where(raise_, 0, up), torch.where(lower, 0, down)
        went_up, went_down = went_up | raise_, went_down | lower
        active = active & ~stop
        history.append({"epoch": epoch, "active": active.tolist(), "success": success.tolist(),
                        "l1": last_l1.tolist(), "cost": cost.tolist()})

    # a class that never reached the threshold keeps its last mask (the reference keeps its first-epoch one)
    none = ~reached
    best_mask[none], best_pattern[none], best_l1[none] = last_mask[none], last_pattern[none], last_l1[none]
    return Triggers(list(classes), best_mask, best_pattern, best_l1, reached, epochs_run, cost, history)


def anomaly_index(l1: Tensor, consistency: float = 1.4826) -> tuple[Tensor, float, float]:
    """|l1 - median| / (consistency * median(|l1 - median|)) per class, the median and the scaled MAD. The median
    is the statistical one (mean of the two middle values for even K, as numpy's in the original NC code)."""
    l1 = l1.double()
    median = torch.quantile(l1, 0.5)
    mad = consistency * torch.quantile((l1 - median).abs(), 0.5)
    index = (l1 - median).abs() / mad.clamp_min(1e-12)
    return index.float(), float(median), float(mad)


def flag_low_outliers(l1: Tensor, threshold: float = 2.0) -> tuple[list[int], Tensor, float, float]:
    """Positions whose L1 lies below the median with an anomaly index above `threshold` (small triggers only)."""
    index, median, mad = anomaly_index(l1)
    flagged = ((l1.double() < median) & (index > threshold)).nonzero().flatten().tolist()
    return flagged, index, median, mad
