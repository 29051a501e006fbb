"""SSBA's StegaStamp encoder and decoder: the networks, their training on clean images, and a disk cache.

The reference pipeline (BackdoorBench's resource/ssba, the "Artificial GAN Fingerprints" port of StegaStamp,
Yu et al. ICCV 2021) trains a U-Net encoder E(image, bits) and a decoder D(image) -> bits on the clean training
images with random bit strings: l2_weight(t) * MSE(E(x, s), x) + bce_weight * BCE(D(E(x, s)), s), the L2 term
gated on bit accuracy > 0.9 (`l2_gate`), then ramped. Adam 1e-4, batch 64, 20 epochs, 100 bits.
Differs from the reference (docs/fidelity.md, "SSBA"): secret upsampled by nearest interpolation and
upsample + 3x3 conv (any size divisible by 16); decoder with BN (without it the secret loss stalls at ln 2) and
global average pooling; `width` scales the channels (32 = the reference's); the gate runs on the device; seeded.
Defaults: the reference's, above; the digits CPU setting: configs/attack/ssba.yaml.
Cost: encoder + decoder fwd + bwd per image per epoch; measured: benchmarks/README.md.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.determinism import deterministic_kernels
from datamodules.cache import cached

log = logging.getLogger(__name__)
ENCODER_CACHE = os.path.join(os.environ.get("BACKDOOR_BENCH_CACHE", "~/.cache/backdoor-bench"), "ssba")


def _conv(cin: int, cout: int, stride: int = 1, norm: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, stride, 1), *([nn.BatchNorm2d(cout)] if norm else []), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class StegaStampEncoder(nn.Module):
    """U-Net that embeds `bits` into an image: (x in 0..1 [B,3,H,W], s in {0,1} [B,bits]) -> image in 0..1.

    Args:
        bits: fingerprint length.
        width: channels of the first level (levels use width x 1, 1, 2, 4, 8).
        residual: output x + r (clipped) instead of the reference's sigmoid image.
    """

    def __init__(self, bits: int = 100, width: int = 32, residual: bool = False) -> None:
        super().__init__()
        self.residual = residual
        c = [width, width, 2 * width, 4 * width, 8 * width]
        self.secret_dense = nn.Linear(bits, 3 * 16 * 16)
        self.down = nn.ModuleList([_conv(6, c[0])] + [_conv(c[i - 1], c[i], 2) for i in range(1, 5)])
        self.up = nn.ModuleList([_conv(c[i], c[i - 1]) for i in range(4, 0, -1)])
        self.merge = nn.ModuleList([_conv(2 * c[i - 1], c[i - 1]) for i in range(4, 1, -1)])
        self.head = nn.Sequential(_conv(2 * c[0] + 6, c[0]), _conv(c[0], c[0]), nn.Conv2d(c[0], 3, 1))

    def forward(self, x: Tensor, secret: Tensor) -> Tensor:
        s = F.relu(self.secret_dense(secret)).view(-1, 3, 16, 16)
        inputs = torch.cat([F.interpolate(s, size=x.shape[-2:], mode="nearest"), x], 1)
        skips, h = [], inputs
        for conv in self.down:
            h = conv(h)
            skips.append(h)
        for i, up in enumerate(self.up):
            h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
            skip = skips[3 - i]
            h = self.merge[i](torch.cat([skip, h], 1)) if i < 3 else torch.cat([skip, h, inputs], 1)
        out = self.head(h)
        return (x + out).clamp(0, 1) if self.residual else torch.sigmoid(out)


class StegaStampDecoder(nn.Module):
    """Conv net reading bit logits back from an image in 0..1: [B,3,H,W] -> [B,bits]."""

    def __init__(self, bits: int = 100, width: int = 32) -> None:
        super().__init__()
        w, plan = width, [(3, 1, 2), (1, 1, 1), (1, 2, 2), (2, 2, 1), (2, 2, 2), (2, 4, 2), (4, 4, 2)]
        self.features = nn.Sequential(*[_conv(a if i == 0 else a * w, b * w, s, norm=True)
                                        for i, (a, b, s) in enumerate(plan)])
        self.dense = nn.Sequential(nn.Linear(4 * w, 512), nn.ReLU(inplace=True), nn.Linear(512, bits))

    def forward(self, x: Tensor) -> Tensor:
        return self.dense(self.features(x).mean((2, 3)))


@deterministic_kernels()  # seeded: the same settings and images give the same weights, on a GPU too
def train_stegastamp(
    images: Tensor,
    bits: int = 100,
    width: int = 32,
    residual: bool = False,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-4,
    l2_weight: float = 10.0,
    bce_weight: float = 1.0,
    l2_await: int = 1000,
    l2_ramp: int = 3000,
    l2_gate: float = 0.9,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> tuple[StegaStampEncoder, StegaStampDecoder, dict[str, float]]:
    """Train encoder and decoder on uint8 images [N,3,H,W] (the reference recipe, see the header).

    Returns the networks (eval mode, on the CPU) and a report: seconds, steps, the final L2 weight, the
    decoder's bit accuracy on random secrets and the PSNR (dB) of the uint8-rounded encoded images,
    both over (up to) the first 512 images.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"train_stegastamp takes uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if images.shape[-1] % 16 or images.shape[-2] % 16 or len(images) == 0:
        raise ValueError(f"image sides must be multiples of 16 (32 or 64), got {tuple(images.shape[-2:])}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder, decoder = StegaStampEncoder(bits, width, residual), StegaStampDecoder(bits, width)
    encoder, decoder = encoder.to(device).train(), decoder.to(device).train()
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    data = images.to(device)
    active_since = torch.full((), -1.0, device=device)  # steps since bit accuracy first exceeded 0.9
    l2_w = torch.zeros((), device=device)
    start, steps = time.perf_counter(), 0
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=gen).to(device)
        for i in range(0, len(data), batch_size):
            x = data[order[i : i + batch_size]].float() / 255
            secret = torch.randint(0, 2, (len(x), bits), generator=gen).float().to(device)
            encoded = encoder(x, secret)
            logits = decoder(encoded)
            l2_w = (l2_weight * (active_since - l2_await) / max(l2_ramp, 1)).clamp(0, l2_weight)
            l2_w = torch.where(active_since < 0, torch.zeros_like(l2_w), l2_w)
            loss = l2_w * F.mse_loss(encoded, x) + bce_weight * F.binary_cross_entropy_with_logits(logits, secret)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            acc = ((logits.detach() > 0).float() == secret).float().mean()
            active_since = torch.where((active_since < 0) & (acc > l2_gate), torch.zeros_like(active_since),
                                       active_since + (active_since >= 0).float())
            steps += 1
        log.info("stegastamp epoch %d/%d: bit accuracy %.3f, mse %.5f, l2 weight %.2f", epoch + 1, epochs,
                 float(acc), float(F.mse_loss(encoded.detach(), x)), float(l2_w))
    seconds = time.perf_counter() - start
    encoder, decoder = encoder.eval().cpu(), decoder.eval().cpu()
    report = {"seconds": seconds, "steps": float(steps), "l2_weight_final": float(l2_w),
              **evaluate_stegastamp(encoder, decoder, images[:512], seed)}
    return encoder, decoder, report


@torch.no_grad()
def evaluate_stegastamp(encoder: StegaStampEncoder, decoder: StegaStampDecoder, images: Tensor,
                        seed: int = 0) -> dict[str, float]:
    """Bit accuracy of the decoder and PSNR (dB, 0..255 scale) of the uint8 encoded images, random secrets."""
    gen = torch.Generator().manual_seed(seed + 1)
    bits = encoder.secret_dense.in_features
    secret = torch.randint(0, 2, (len(images), bits), generator=gen).float()
    x = images.float() / 255
    encoded = (encoder(x, secret) * 255).round().clamp(0, 255)
    acc = ((decoder(encoded / 255) > 0).float() == secret).float().mean()
    return {"bit_accuracy": float(acc), "psnr_db": float(psnr(encoded, images.float()))}


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Mean over images of the PSNR (dB) between two batches on the 0..255 scale."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(255.0**2 / mse)).mean()


def cached_stegastamp(
    images: Tensor, settings: dict[str, Any], cache_dir: str | Path | None = ENCODER_CACHE, name: str = ""
) -> tuple[StegaStampEncoder, StegaStampDecoder, dict[str, float]]:
    """`train_stegastamp(images, **settings)`, cached on disk (atomic writes) under a hash of the settings
    and of the images (shape and every 101st image); `name` (the dataset) only labels the entry."""
    images = images.cpu()
    key = {"what": "ssba-stegastamp", "dataset": name, "settings": settings,
           "images": [torch.tensor(images.shape), images[::101]]}

    def build() -> dict[str, Any]:
        encoder, decoder, report = train_stegastamp(images, **settings)
        return {"encoder": encoder.state_dict(), "decoder": decoder.state_dict(), "report": report}

    entry = cached(os.path.expanduser(cache_dir) if cache_dir else None, key, build)
    encoder = StegaStampEncoder(settings.get("bits", 100), settings.get("width", 32), settings.get("residual", False))
    decoder = StegaStampDecoder(settings.get("bits", 100), settings.get("width", 32))
    encoder.load_state_dict(entry["encoder"])
    decoder.load_state_dict(entry["decoder"])
    return encoder.eval(), decoder.eval(), dict(entry["report"])
