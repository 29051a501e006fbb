"""The SGD + schedule recipes that victim training and the defenses share."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import lightning as L
import torch

Schedule = Literal["cosine", "constant", "multistep"]


def sgd_with_schedule(
    params: Iterable[torch.nn.Parameter],
    trainer: L.Trainer,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = False,
    schedule: Schedule = "cosine",
    milestones: list[int] | None = None,
    gamma: float = 0.1,
    cosine_t_max: int | None = None,
) -> dict[str, Any]:
    """`configure_optimizers` output: SGD and an epoch-wise schedule.

    cosine: T_max = `cosine_t_max` epochs, by default the run's max_epochs ("cosine over the run"; the
    reference fixes T_max = 100 whatever the run length, a pitfall, unless a method's spec asks for it);
    a run bounded only by max_steps anneals per step over those steps.
    """
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if schedule == "constant":
        return {"optimizer": optimizer}
    if schedule == "multistep":
        if not milestones:
            raise ValueError("schedule 'multistep' needs milestones (epochs at which lr is multiplied by gamma)")
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=gamma)
    elif schedule == "cosine":
        t_max = cosine_t_max or trainer.max_epochs
        if t_max is None or t_max < 1:  # a run bounded by max_steps: anneal per step over those steps
            steps = trainer.estimated_stepping_batches
            if not math.isfinite(steps):
                raise ValueError(f"a cosine schedule needs a finite run: got --trainer.max_epochs {trainer.max_epochs} "
                                 f"and no --trainer.max_steps; set max_epochs >= 1 (or max_steps)")
            steps = int(steps)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose cosine, constant or multistep")
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
