"""Post-purification robustness: the retuning attack (RtA; Min et al., "Uncovering, Explaining, and Mitigating the
Superficial Safety of Backdoor Defense", NeurIPS 2024), an evaluation stage after "after".

A copy of the defended model (all its parameters, in train mode) is fine-tuned on the retuning set of
datamodules/retuning.py: plain SGD (lr 0.01, momentum 0.9, no weight decay, no schedule), batch 128, 5 epochs, the
training augmentation on the clean images only (the authors load the poisons with the test transform). Its ACC,
ASR and RA on the test sets are `rta_acc`, `rta_asr`, `rta_ra`. The same retuning of the attacked model ("no
defense") and of a clean model of the same dataset and backbone ("never backdoored") gives the reference rows,
measured once per attacked model and cached beside it like "before" (evaluation.py). The retuning draws from its
own seeded random stream, so it changes no run's other numbers and repeats exactly.
Cost: epochs x (set size) forward + backward passes (5 x 1,000 on CIFAR-10) and one test-set pass per model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.retuning import Retuning


@contextlib.contextmanager
def own_random_stream(seed: int, device: torch.device) -> Iterator[None]:
    """The global generators seeded with `seed` inside the block and restored after it."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def retune(forward: Callable[[Tensor], Tensor], params: list[nn.Parameter], modules: list[nn.Module],
           data: tuple[Tensor, Tensor, Tensor], r: Retuning, augment: Callable[[Tensor], Tensor],
           autocast: Callable[[], Any]) -> None:
    """Fine-tune `params` in place: cross-entropy of `forward` on shuffled batches of (images, labels), clean images
    augmented, poisons as they are; `modules` in train mode. The caller keeps what it needs to restore."""
    x, y, poisoned = data
    for p in params:
        p.requires_grad_(True)
    for m in modules:
        nn.Module.train(m, True)  # past a defense's own train() (a frozen-BN method is retuned in train mode too)
    optimizer = torch.optim.SGD(params, lr=r.lr, momentum=r.momentum, weight_decay=0.0)
    with torch.enable_grad(), own_random_stream(r.seed, x.device):
        for _ in range(r.epochs):
            order = torch.randperm(len(x), device=x.device)
            for i in range(0, len(x), r.batch_size):
                idx = order[i : i + r.batch_size]
                xb, keep = x[idx], poisoned[idx].view(-1, 1, 1, 1)
                xb = torch.where(keep, xb, augment(xb))
                with autocast():
                    loss = F.cross_entropy(forward(xb).float(), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()


def rta_scores(scores: dict[str, float]) -> dict[str, float]:
    return {f"rta_{k}": v for k, v in scores.items()}
