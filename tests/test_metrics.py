"""ACC / ASR / RA against hand-computed values, the normalised scores, and the DDP reduction."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_modules.metrics import AttackSuccessRate, RecoveryAccuracy, arr, der, rdr, rir


def test_hand_computed() -> None:
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0], [0, 0, 5.0]])  # preds 0, 1, 0, 2
    asr, ra = AttackSuccessRate(), RecoveryAccuracy()
    asr.update(logits, torch.tensor([0, 0, 0, 0]))
    ra.update(logits, torch.tensor([1, 1, 2, 2]))
    assert asr.compute().item() == pytest.approx(0.5)
    assert ra.compute().item() == pytest.approx(0.5)


def test_all_target_batch_and_accumulation() -> None:
    asr, ra = AttackSuccessRate(), RecoveryAccuracy()
    preds = torch.zeros(8, dtype=torch.long)  # the model answers the target for every triggered image
    asr.update(preds, torch.zeros(8, dtype=torch.long))
    ra.update(preds, torch.arange(1, 9) % 3 + 1)
    assert asr.compute().item() == 1.0 and ra.compute().item() == 0.0
    asr.update(torch.ones(8, dtype=torch.long), torch.zeros(8, dtype=torch.long))  # a second, failing batch
    assert asr.compute().item() == pytest.approx(0.5)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        AttackSuccessRate().update(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))


def test_normalised_scores() -> None:
    assert arr(0.9, 0.81) == pytest.approx(0.1)
    assert rdr(0.9, 0.45) == pytest.approx(0.5)
    assert math.isnan(arr(0.0, 0.5)) and math.isnan(rdr(0.0, 0.5))  # an untrained model: undefined, not a crash
    assert der(0.9, 0.85, 1.0, 0.1) == pytest.approx((0.9 - 0.05 + 1) / 2)
    assert rir(0.9, 0.92, 0.0, 0.6) == pytest.approx((0.6 - 0 + 1) / 2)


def _ddp_worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    asr = AttackSuccessRate()
    # rank 0: 3 of 4 hit; rank 1: 0 of 2 hit -> global 3 / 6
    preds = torch.tensor([0, 0, 0, 1]) if rank == 0 else torch.tensor([1, 1])
    asr.update(preds, torch.zeros_like(preds))
    out[rank] = asr.compute().item()
    dist.destroy_process_group()


def test_ddp_sync() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(port, out), nprocs=2, join=True)
    assert out[0] == pytest.approx(0.5) and out[1] == pytest.approx(0.5)


def test_docstring_examples() -> None:
    import doctest

    import lightning_modules.metrics as metrics

    assert doctest.testmod(metrics, raise_on_error=False).failed == 0
