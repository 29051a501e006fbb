"""LIRA (Doan et al., "LIRA: Learnable, Imperceptible and Robust Backdoor Attacks", ICCV 2021): a learned,
input-specific additive trigger x_n' = x_n + eps g(x_n) in normalised space, x_n = (x / 255 - mean) / std.

In pixels that adds eps * std_c * 255 * g grey levels to channel c: at the reference's eps = 0.01 at most 0.63 on
CIFAR-10 (0.83 digits, 2.55 GTSRB), below one grey level, so the uint8 backdoor images differ by -1, 0 or +1.
g is the reference's CIFAR autoencoder (H, W multiples of 16), seeded, always in eval mode; `mean` and `std` come
from the dataset (None: identity). The attack (lightning_modules/attacks/lira.py) trains on the unrounded output.
Differs from the reference: each channel clipped to its own valid range (the reference: one scalar range over the
channels); the result rounded to uint8.
Cost: one small autoencoder fwd per image; measured: benchmarks/README.md.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from datamodules.triggers.base import Trigger, check_images, to_uint8


def _down(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


def _up(cin: int, cout: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


class Autoencoder(nn.Module):
    """LIRA's trigger generator for 32 and 64 px images: output in [-1, 1], the input's shape."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Sequential(*_down(channels, 16), *_down(16, 32), *_down(32, 64), *_down(64, 128))
        self.decoder = nn.Sequential(*_up(128, 64), *_up(64, 32), *_up(32, 16),
                                     nn.ConvTranspose2d(16, channels, 4, stride=2, padding=1), nn.Tanh())

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


def lira_perturb(x: Tensor, generator: nn.Module, eps: float, mean: Tensor, std: Tensor) -> Tensor:
    """Float pixels in [0, 1] (B, C, H, W) -> triggered float pixels in [0, 1], differentiable in `generator`."""
    noise = generator((x - mean) / std) * eps  # in normalised units
    return (x + noise * std).clamp(0.0, 1.0)


class LIRATrigger(Trigger):
    """Args:
        eps: scale of the generator's tanh output, in normalised units (std of the dataset's normalisation).
        mean, std: the dataset's per-channel normalisation on the 0..1 scale; None: identity.
        seed: seed of the generator's initial weights.
    """
    display_name = "LIRA"
    dynamic = True  # the trigger depends on the image

    def __init__(
        self,
        eps: float = 0.01,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"LIRA eps must be > 0 (the reference uses 0.01), got {eps}")
        if (mean is None) != (std is None) or (std is not None and min(std) <= 0):
            raise ValueError(f"LIRA needs both mean and std (std > 0) or neither; got mean={mean}, std={std}")
        self.eps, self.seed = eps, seed
        self.mean = self.std = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.generator = Autoencoder(3)
        self.register_buffer("_mean", torch.zeros(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.ones(1, 3, 1, 1), persistent=False)
        self.set_normalization(mean, std)
        self.train(False)

    def set_normalization(self, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> None:
        """Bind the dataset's normalisation (recorded with the trigger's config)."""
        self.mean = tuple(float(m) for m in mean) if mean is not None else None
        self.std = tuple(float(s) for s in std) if std is not None else None
        if mean is not None:
            self._mean.copy_(torch.tensor(self.mean).view(1, -1, 1, 1))
            self._std.copy_(torch.tensor(self.std).view(1, -1, 1, 1))

    def train(self, mode: bool = True) -> LIRATrigger:
        return super().train(False)  # a trigger is a fixed function: BN always uses its running statistics

    def perturb(self, x: Tensor, generator: nn.Module | None = None) -> Tensor:
        """Float pixels [0, 1] -> triggered float pixels, unrounded (what the attack trains on). `generator`
        replaces this trigger's own (the attack's trainable copy)."""
        return lira_perturb(x, generator if generator is not None else self.generator, self.eps, self._mean, self._std)

    def forward(self, x: Tensor) -> Tensor:
        check_images(x)
        # fp32 whatever the Trainer's precision: the backdoor set evaluated under bf16-mixed must be the one a
        # defense rebuilds from the record (in fp32)
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            return to_uint8(self.perturb(x.float() / 255.0) * 255.0)


def __getattr__(name: str) -> type[LIRATrigger]:
    # checkpoints written before the rename record the trigger as datamodules.triggers.lira.LIRA, the name of
    # its attack system (lightning_modules.attacks.LIRA) too; `build_trigger` still finds it here. A function,
    # not an alias, so that the package scan (datamodules/triggers/__init__.py) sees one Trigger class per file.
    if name == "LIRA":
        return LIRATrigger
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
