"""Backdoor metrics (protocol.md): ASR and RA as torchmetrics, and the survey's normalised scores.

ACC is torchmetrics' micro-averaged `MulticlassAccuracy` on the clean test set. ASR and RA are computed on
the backdoor test set (non-target images with the trigger), which carries both the attack label and the
true label of every image. States are sums reduced across processes, so the values are exact under DDP.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class _LabelMatchRate(Metric):
    is_differentiable = False
    higher_is_better: bool | None = None
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("matches", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, labels: Tensor) -> None:
        """preds: logits or probabilities (N, K), or predicted classes (N,); labels: (N,)."""
        if preds.ndim == 2:
            preds = preds.argmax(dim=1)
        if preds.shape != labels.shape:
            raise ValueError(f"predictions {tuple(preds.shape)} and labels {tuple(labels.shape)} differ in shape")
        self.matches += (preds == labels).sum()
        self.total += labels.numel()

    def compute(self) -> Tensor:
        return self.matches.float() / self.total.clamp(min=1)


class AttackSuccessRate(_LabelMatchRate):
    r"""Attack success rate: the share of triggered non-target images classified as the attack label.

    .. math:: \mathrm{ASR} = \frac{1}{|D_{bd}|} \sum_{(x, y_t) \in D_{bd}} [f(x \oplus \Delta) = y_t]

    Example:
        >>> asr = AttackSuccessRate()
        >>> asr(torch.tensor([0, 0, 3, 0]), torch.tensor([0, 0, 0, 0]))
        tensor(0.7500)
    """

    higher_is_better = False  # for a defense


class RecoveryAccuracy(_LabelMatchRate):
    r"""Recovery accuracy (robust accuracy): the share of triggered images classified as their true label.

    .. math:: \mathrm{RA} = \frac{1}{|D_{bd}|} \sum_{(x, y) \in D_{bd}} [f(x \oplus \Delta) = y]

    Example:
        >>> ra = RecoveryAccuracy()
        >>> ra(torch.tensor([0, 2, 3, 0]), torch.tensor([1, 2, 3, 4]))
        tensor(0.5000)
    """

    higher_is_better = True


def arr(acc_pre: float, acc_post: float) -> float:
    """Accuracy reduction ratio (ACC_pre - ACC_post) / ACC_pre; 0 is ideal (NaN when ACC_pre is 0)."""
    return (acc_pre - acc_post) / acc_pre if acc_pre else float("nan")


def rdr(acc_pre: float, ra_post: float) -> float:
    """Recovery difference ratio (ACC_pre - RA_post) / ACC_pre; 0 is ideal (NaN when ACC_pre is 0)."""
    return (acc_pre - ra_post) / acc_pre if acc_pre else float("nan")


def der(acc_pre: float, acc_post: float, asr_pre: float, asr_post: float) -> float:
    """BackdoorBench's defense effectiveness rating [max(0, dASR) - max(0, dACC) + 1] / 2."""
    return (max(0.0, asr_pre - asr_post) - max(0.0, acc_pre - acc_post) + 1.0) / 2.0


def rir(acc_pre: float, acc_post: float, ra_pre: float, ra_post: float) -> float:
    """BackdoorBench's robust improvement rating [max(0, RA_post - RA_pre) - max(0, dACC) + 1] / 2."""
    return (max(0.0, ra_post - ra_pre) - max(0.0, acc_pre - acc_post) + 1.0) / 2.0
