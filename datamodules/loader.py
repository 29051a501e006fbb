"""In-memory tensor datasets whose batches are fetched with one indexing call.

`TensorImages.__getitems__` lets torch's DataLoader gather a whole batch as `x[indices]` instead of
collating B samples, while Lightning can still inject its DistributedSampler under DDP. The tensors may
live on the GPU (then the loader runs in the main process, with no workers and no pinning).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler, Dataset


class TensorImages(Dataset):
    """Equal-length tensors (images first, then labels) indexed together."""

    def __init__(self, *tensors: Tensor) -> None:
        if not tensors or any(len(t) != len(tensors[0]) for t in tensors):
            raise ValueError("TensorImages needs tensors of equal length")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        return tuple(t[index] for t in self.tensors)

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, ...]:
        idx, device = torch.as_tensor(indices), self.tensors[0].device
        if device.type == "cuda":
            # from pinned memory without blocking: a pageable copy would synchronise the stream every step, so the
            # host could not queue the next step's kernels while the GPU runs this one
            idx = idx.pin_memory().to(device, non_blocking=True)
        else:
            idx = idx.to(device)
        return tuple(t[idx] for t in self.tensors)

    def to(self, device: torch.device | str) -> TensorImages:
        return TensorImages(*(t.to(device) for t in self.tensors))


def _batch_as_is(batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return batch


def tensor_loader(data: TensorImages, batch_size: int, shuffle: bool, drop_last: bool = False,
                  num_samples: int | None = None) -> DataLoader:
    """Batches of whole tensors (one indexing per batch). `num_samples` draws that many items per epoch
    uniformly *with replacement* instead of one pass (implies shuffling)."""
    if num_samples is None:
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, collate_fn=_batch_as_is)
    sampler = RandomSampler(data, replacement=True, num_samples=num_samples)
    return DataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=drop_last, collate_fn=_batch_as_is)
