"""Deterministic kernels for a block of GPU work whose output is a seeded artefact (LF's universal pattern, SSBA's
encoder): the same seed must give the same bytes every time on one machine, and cuDNN's defaults do not
(autotuned algorithms, atomics in convolution backward passes; found by the fast suite on an H200, where two LF
generations with one seed differed). On the CPU it changes nothing. Costs a slower backward pass on the GPU."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def deterministic_kernels() -> Iterator[None]:
    """cuDNN deterministic and unbenchmarked, TF32 off, torch's deterministic algorithms (a warning where an op has
    none); every switch is put back afterwards."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs to be deterministic
    cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = True, False, False, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved[:4]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])
