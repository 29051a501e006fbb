"""Batched crop / flip / normalise, and the one-call batch loader."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from datamodules.loader import TensorImages, tensor_loader
from datamodules.transforms import BatchAugment, Normalize, batch_random_crop, batch_random_flip


def test_crop_is_a_window_of_the_padded_image() -> None:
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = batch_random_crop(x, 2)
    padded = F.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(16):
        hits = [(t, l) for t in range(5) for l in range(5) if torch.equal(padded[i, :, t:t + 8, l:l + 8], out[i])]
        assert hits, f"image {i} is not a crop of its padded input"
        offsets.add(hits[0])
    assert len(offsets) > 1, "offsets differ across the batch"
    assert out.dtype == torch.uint8 and torch.equal(batch_random_crop(x, 0), x)


def test_flip_flips_about_half() -> None:
    x = torch.randint(0, 256, (200, 3, 4, 4), dtype=torch.uint8)
    out = batch_random_flip(x)
    same = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    assert (same | flipped).all() and 60 < int(flipped.sum()) < 140


def test_augment_respects_hflip_flag() -> None:
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(64, 3, 1, 1)
    out = BatchAugment(crop_padding=0, hflip=False)(x)
    assert torch.equal(out, x)


def test_normalize_uint8_and_float_agree() -> None:
    norm = Normalize((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    a, b = norm(x), norm(x.float() / 255)
    assert torch.allclose(a, b)
    assert torch.allclose(a[:, 1], (x[:, 1].float() / 255 - 0.4) / 0.2)


def test_loader_batches_with_one_index_call() -> None:
    calls = []

    class Spy(TensorImages):
        def __getitems__(self, indices):
            calls.append(len(indices))
            return super().__getitems__(indices)

    data = Spy(torch.arange(10).view(10, 1).to(torch.uint8), torch.arange(10))
    batches = list(tensor_loader(data, batch_size=4, shuffle=False))
    assert calls == [4, 4, 2]
    assert batches[0][1].tolist() == [0, 1, 2, 3] and batches[2][0].shape == (2, 1)
    torch.manual_seed(1)
    a = [b[1].tolist() for b in tensor_loader(data, 4, shuffle=True)]
    torch.manual_seed(1)
    assert a == [b[1].tolist() for b in tensor_loader(data, 4, shuffle=True)]


@pytest.mark.gpu
def test_device_batches_do_not_synchronise() -> None:
    """On a GPU, fetching a batch (the index copy), crop / flip and normalisation queue their kernels without waiting
    for the GPU: a host sync per step would serialise the launch-bound training loop (sync debug mode raises on one;
    `torch.as_tensor(indices, device="cuda")`, a pageable copy, was one)."""
    n = 1000
    data = TensorImages(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.arange(n) % 10).to("cuda")
    augment, normalize = BatchAugment(4, hflip=True), Normalize((0.5,) * 3, (0.25,) * 3).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = [normalize(augment(x)).sum() + y.sum() for x, y in tensor_loader(data, 128, shuffle=True)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(batches) == 8 and torch.isfinite(torch.stack(batches)).all()
