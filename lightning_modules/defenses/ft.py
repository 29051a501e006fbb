"""FT: plain fine-tuning on the defender's clean set, the survey's fine-tuning baseline.

All weights fine-tuned on augmented D_m; cosine over the run (the reference's T_max = 100 matches only at 100
epochs; docs/fidelity.md). Defaults: configs/defense/ft.yaml.
Cost: 1 fwd + 1 bwd per D_m sample per epoch; measured: benchmarks/README.md.
"""

from __future__ import annotations

from typing import Any

from core.optim import Schedule, sgd_with_schedule
from lightning_modules.defenses.base import Defense


class FT(Defense):
    """Args:
        lr, momentum, weight_decay: SGD.
        schedule: cosine over the run (default), constant, or multistep.
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    family = "fine-tuning"
    smoke_args = ["--trainer.max_epochs", "2"]

    def __init__(
        self,
        backdoored: str,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        schedule: Schedule = "cosine",
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        return sgd_with_schedule(self.net.parameters(), self.trainer, h.lr, h.momentum, h.weight_decay,
                                 schedule=h.schedule)
