"""IAB, the input-aware dynamic trigger (Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS 2020):
x' = x + (G(x) - x) * M(x).

G (3 channels) and M (1 channel, sharpened as tanh(20 m - 10) / 2 + 0.5) are the reference's small
encoder-decoders (32/64/128 channels); they are trained by lightning_modules/attacks/iab.py, this module only
holds and applies them. They see pixels scaled to [-1, 1] (the reference: normalised tensors; the first conv + BN
absorbs the difference), and `forward` always runs them in eval mode and full precision, so a triggered image
does not depend on its batch, autocast or the training mode.
Differs from the reference: up-sampling to each down stage's size (any H, W >= 8; identical for multiples of 8);
the uint8 result is rounded and clipped (the reference keeps floats).
Defaults: width 32, seed 0 (initial weights).
Cost: one G and one M fwd per image (~0.7 M parameters each); measured: benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.transforms import to_unit
from datamodules.triggers.base import Trigger, check_images, to_uint8

STAGES = 3


def apply_iab(x: Tensor, pattern: Tensor, mask: Tensor) -> Tensor:
    """Blend float images (B, C, H, W) with patterns (B, C, H, W) where masks (B, 1, H, W) say: x + (p - x) m."""
    return x + (pattern - x) * mask


def sharpen_mask(m: Tensor) -> Tensor:
    """The reference's mask threshold: a steep sigmoid around 0.5, so masks are nearly binary."""
    return torch.tanh(20.0 * m - 10.0) / 2.0 + 0.5


def _block(cin: int, cout: int, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, momentum=0.05)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class EncoderDecoder(nn.Module):
    """The IAB generator / mask network: images scaled to [-1, 1] in, (B, out_channels, H, W) in [0, 1] out.

    Args:
        out_channels: 3 for the pattern generator, 1 for the mask network.
        width: channels of the first stage (doubled per down stage: 32/64/128 by default).
        in_channels: image channels.
    """

    def __init__(self, out_channels: int, width: int = 32, in_channels: int = 3) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(STAGES)]  # 32, 64, 128
        self.down = nn.ModuleList(
            nn.Sequential(_block(cin, c), _block(c, c)) for cin, c in zip([in_channels, *widths[:-1]], widths)
        )
        self.middle = _block(widths[-1], widths[-1])
        outs = [*reversed(widths[:-1]), out_channels]  # 64, 32, out
        self.up = nn.ModuleList(
            nn.Sequential(_block(c, c), _block(c, cout, relu=i < STAGES - 1))
            for i, (c, cout) in enumerate(zip(reversed(widths), outs))
        )

    def forward(self, x: Tensor) -> Tensor:
        sizes = []
        for stage in self.down:
            x = stage(x)
            sizes.append(x.shape[-2:])
            x = F.max_pool2d(x, 2)
        x = self.middle(x)
        for stage, size in zip(self.up, reversed(sizes)):
            x = stage(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        return torch.tanh(x) / 2.0 + 0.5


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class IABTrigger(Trigger):
    """Args:
        width: channels of the networks' first stage (32 in the paper; smaller only for quick CPU checks).
        seed: seed of the networks' initial weights (the trained weights are the trigger's state).
    """
    display_name = "IAB"
    dynamic = True  # the trigger depends on the image

    def __init__(self, width: int = 32, seed: int = 0) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"IAB width must be a positive number of channels, got {width}")
        self.width, self.seed = width, seed
        with torch.random.fork_rng(devices=[]):  # seeded weights without touching the global generator
            torch.manual_seed(seed)
            self.generator = EncoderDecoder(3, width)
            self.mask_net = EncoderDecoder(1, width)

    @staticmethod
    def _net_input(x: Tensor) -> Tensor:
        return x * 2.0 - 1.0

    def patterns(self, x: Tensor) -> Tensor:
        """G: float images on the 0..1 scale -> patterns on the 0..1 scale (B, C, H, W)."""
        return self.generator(self._net_input(x))

    def masks(self, x: Tensor) -> Tensor:
        """M, sharpened: float images on the 0..1 scale -> masks in [0, 1] (B, 1, H, W)."""
        return sharpen_mask(self.mask_net(self._net_input(x)))

    def blend(self, x: Tensor) -> Tensor:
        """The backdoor image of each float 0..1 image, differentiable (for training)."""
        return apply_iab(x, self.patterns(x), self.masks(x))

    def forward(self, x: Tensor) -> Tensor:
        check_images(x)
        _check_size(x)
        weight = next(self.parameters())
        if weight.device != x.device:  # triggers run on the images' device
            self.to(x.device)
        with _eval_mode(self), torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            return to_uint8(self.blend(to_unit(x)).mul_(255.0))


def _check_size(x: Tensor) -> None:
    if min(x.shape[-2:]) < 2**STAGES or x.shape[1] != 3:
        raise ValueError(f"IAB's networks take 3-channel images of at least {2**STAGES}x{2**STAGES} pixels, "
                         f"got shape {tuple(x.shape)}")


def __getattr__(name: str) -> type[IABTrigger]:
    # checkpoints written before the rename record the trigger as datamodules.triggers.iab.IAB, the name of
    # its attack system (lightning_modules.attacks.IAB) too; `build_trigger` still finds it here. A function,
    # not an alias, so that the package scan (datamodules/triggers/__init__.py) sees one Trigger class per file.
    if name == "IAB":
        return IABTrigger
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
