"""PAM: path-aware minimisation (Min, Qin, Zhang, Shen, Cheng, "Uncovering, Explaining, and Mitigating the
Superficial Safety of Backdoor Defense", NeurIPS 2024).

BTI-DBF(U) (btidbfu.py: the generator, mask and rounds are its) whose unlearning step takes the loss and its gradient
at theta + e, e = rho (theta_bd - theta) / ||theta_bd - theta||_2 (one norm over all parameters): the unlearning
loss must stay low along the path back to the backdoored weights. Then theta is restored (from a copy: exact) and the
base optimiser steps. At the first step theta = theta_bd and e = 0. One forward pass per step, at theta + e: the BN
running statistics are that pass's, as the reference's.
Differs from the reference (details: docs/fidelity.md, "PAM"): BTI-DBF(U)'s differences; int(0.2 B + 1) images
replaced (the code's count; anchors.md wrote ceil(20%) + 1); the same loss as BTI-DBF(U) with feature_weight 0, the
reference's plain CE.
Defaults: configs/defense/pam.yaml (the authors' demo: rho 0.5, 3 rounds, SGD lr 0.01 momentum 0.1).
Cost: as BTI-DBF(U) with 3 rounds (50 + 3 x 80 = 290 epochs over D_m); an unlearning step is G fwd + 1 fwd + 1 bwd
per sample plus three parameter-sized copies (theta_bd, the saved theta, e);
measured: benchmarks/README.md, "Newer defenses".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_modules.defenses.btidbfu import BTIDBFU


@torch.no_grad()
def toward_anchor(params: list[Tensor], anchor: list[Tensor], rho: float) -> list[Tensor]:
    """e = rho (anchor - theta) / ||anchor - theta||_2, the norm over all tensors together; 0 where theta = anchor."""
    d = [a - p for p, a in zip(params, anchor)]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v.float()) for v in d]))
    scale = torch.where(norm > 0, rho / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)
    return [v * scale.to(v.dtype) for v in d]


class PAM(BTIDBFU):
    """Args:
        rho: length of the step e toward the backdoored weights at which the unlearning loss is taken (0: plain
            BTI-DBF(U) unlearning with this optimiser).
        (the BTI-DBF(U) arguments, lightning_modules/defenses/btidbfu.py, with the PAM demo's defaults: nround 3,
        poison_fraction 0.2, feature_weight 0 (CE only), optimizer "sgd", lr 0.01, momentum 0.1)
    """

    display_name = "PAM"
    smoke_args = BTIDBFU.smoke_args

    def __init__(
        self,
        backdoored: str,
        rho: float = 0.5,
        preround: int = 50,
        nround: int = 3,
        mround: int = 20,
        uround: int = 30,
        ul_round: int = 30,
        generator_filters: int = 32,
        generator_blocks: int = 4,
        generator_lr: float = 1e-3,
        mask_lr: float = 0.01,
        norm_bound: float = 0.3,
        feat_bound: float = 3.0,
        benign_weight: float = 0.01,
        noise: float = 0.03,
        poison_fraction: float = 0.2,
        feature_weight: float = 0.0,
        optimizer: Literal["adam", "sgd"] = "sgd",
        lr: float = 0.01,
        momentum: float = 0.1,
        feature_layer: str | dict[str, str] | None = None,
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        self.check(("rho", rho, rho >= 0, ">= 0"), finite=True)
        super().__init__(backdoored, preround, nround, mround, uround, ul_round, generator_filters, generator_blocks,
                         generator_lr, mask_lr, norm_bound, feat_bound, benign_weight, noise, poison_fraction,
                         feature_weight, optimizer, lr, momentum, feature_layer, result_file, save_defended,
                         channels_last)

    def prepare(self) -> None:
        self.reference("backdoored", self.frozen_copy())  # theta_bd: the weights before any unlearning
        super().prepare()

    @contextmanager
    def loss_point(self) -> Iterator[None]:
        """theta + e within the block, theta (bit for bit) after it."""
        params = list(self.net.parameters())
        e = toward_anchor(params, list(self.references["backdoored"].parameters()), self.hparams.rho)
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            for p, v in zip(params, e):
                p.add_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, original in zip(params, saved):
                    p.copy_(original)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        with torch.no_grad():
            d = [a - p for p, a in zip(self.net.parameters(), self.references["backdoored"].parameters())]
            distance = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v.float()) for v in d]))
        self.history["unlearn"][-1]["distance_to_backdoored"] = float(distance)

    def info(self) -> dict[str, Any]:
        return {"rho": self.hparams.rho, **super().info()}
