"""SSBA, the sample-specific invisible backdoor (Li et al., "Invisible Backdoor Attack with Sample-Specific
Triggers", ICCV 2021): x' = E(x, s), a StegaStamp encoder embedding one fixed bit string s in every image.

s is the reference's: "abcd" padded to 7 bytes + its BCH code (GF(2^7), polynomial 137, t = 5) + 4 zero bits =
100 bits, bit-identical to bchlib's (tests/test_ssba.py); `coding="raw"` uses the secret's UTF-8 bits.
Exactly one source: the encoder (default; trained by datamodules/ssba_encoder.py on the clean training images
passed to `Trigger.fit`, cached, resolved lazily; `epochs=0` keeps it untrained for tests), or `arrays`:
BackdoorBench's per-index files, looked up by a hash of each clean image and checked (PSNR >= 15 dB).
Differs from the reference (docs/fidelity.md, "SSBA"): our encoder's network details (ssba_encoder.py); outputs
rounded to uint8 (the reference writes PNGs, also uint8).
Defaults: the reference's on CIFAR-10/GTSRB/Tiny-ImageNet; the CPU digits setting: configs/attack/ssba.yaml.
Cost: one U-Net fwd per image to poison, after training the encoder once; measured: benchmarks/README.md.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from core.determinism import deterministic_kernels
from datamodules.datasets import get_dataset
from datamodules.ssba_encoder import (
    ENCODER_CACHE,
    StegaStampEncoder,
    cached_stegastamp,
    psnr,
)
from datamodules.triggers.base import Trigger, check_images, to_uint8

Coding = Literal["bch", "raw"]
BCH_POLYNOMIAL = 137  # x^7 + x^3 + 1: GF(2^7), codewords up to 127 bits
BCH_LAYOUT = {100: (7, 5, 4), 50: (4, 2, 2)}  # fingerprint bits -> (data bytes, t, zero bits), the reference's


def bch_ecc(data: bytes, t: int, poly: int = BCH_POLYNOMIAL) -> bytes:
    """ECC bytes of a binary BCH code: remainder of data(x) * x^r by the generator (the LCM of the minimal
    polynomials of alpha^1..alpha^2t), MSB first, left-aligned in ceil(r/8) bytes, as bchlib / Linux lib/bch.c."""
    m = poly.bit_length() - 1
    n = (1 << m) - 1
    exp, log = [0] * (2 * n), [0] * (n + 1)
    v = 1
    for i in range(n):
        exp[i] = exp[i + n] = v
        log[v] = i
        v = (v << 1) ^ (poly if v >> (m - 1) & 1 else 0)
    generator, done = 1, set()
    for i in range(1, 2 * t + 1):
        if i in done:
            continue
        coset = [i * 2**k % n for k in range(m)]
        coset = coset[: coset.index(i, 1)] if i in coset[1:] else coset
        done.update(coset)
        minimal = [1]  # product of (x + alpha^j) over the coset, coefficients in GF(2^m), low degree first
        for j in coset:
            shifted = [0, *minimal]
            minimal = [a ^ (exp[log[b] + j] if b else 0) for a, b in zip(shifted, [*minimal, 0])]
        as_int = sum(c << k for k, c in enumerate(minimal))  # coefficients are 0/1 for a minimal polynomial
        generator = _gf2_mul(generator, as_int)
    r = generator.bit_length() - 1
    rem = int.from_bytes(data, "big") << r
    for k in range(rem.bit_length() - 1, r - 1, -1):
        if rem >> k & 1:
            rem ^= generator << (k - r)
    nbytes = (r + 7) // 8
    return (rem << (8 * nbytes - r)).to_bytes(nbytes, "big")


def _gf2_mul(a: int, b: int) -> int:
    out = 0
    for k in range(b.bit_length()):
        if b >> k & 1:
            out ^= a << k
    return out


def fingerprint_bits(secret: str, bits: int = 100, coding: Coding = "bch") -> Tensor:
    """The bit string embedded in every image, float32 (bits,) of 0/1."""
    data = secret.encode("utf-8")
    if coding == "bch":
        if bits not in BCH_LAYOUT:
            raise ValueError(f"BCH coding supports fingerprints of {sorted(BCH_LAYOUT)} bits (the reference's), "
                             f"got bits={bits}; use coding='raw' for other lengths")
        size, t, zeros = BCH_LAYOUT[bits]
        if len(data) > size:
            raise ValueError(f"a {bits}-bit BCH fingerprint holds a secret of at most {size} bytes, got {secret!r}")
        data = data + b" " * (size - len(data))
        packet = data + bch_ecc(data, t)
    elif coding == "raw":
        if 8 * len(data) > bits:
            raise ValueError(f"secret {secret!r} needs {8 * len(data)} bits, more than bits={bits}")
        packet = data
    else:
        raise ValueError(f"coding must be 'bch' or 'raw', got {coding!r}")
    stream = [int(b) for byte in packet for b in format(byte, "08b")]
    return torch.tensor(stream + [0] * (bits - len(stream)), dtype=torch.float32)


@torch.no_grad()
@deterministic_kernels()  # poisoned images are cached by content: the same image must encode the same
def apply_ssba(x: Tensor, encoder: StegaStampEncoder, secret: Tensor, chunk: int = 256) -> Tensor:
    """Encode `secret` (bits,) into uint8 images (B, C, H, W) with `encoder`; rounded, clipped uint8."""
    out = []
    for part in x.split(chunk):
        s = secret.to(part.device).expand(len(part), -1)
        out.append(to_uint8(encoder(part.float() / 255, s) * 255))
    return torch.cat(out) if out else x.clone()


class SSBA(Trigger):
    """Args:
        secret: text embedded in every image (reference: "abcd").
        bits: fingerprint length fixed when the encoder is trained (reference 100; BCH: 100 or 50).
        coding: "bch" (the reference's BCH packet) or "raw" (the secret's UTF-8 bits, zero padded).
        dataset: with `arrays`, the registered dataset whose train and test images the arrays encode (required);
            otherwise optional: a standalone trigger (no DataModule calling `fit`) trains on its training split.
        data_dir: where `dataset`'s prepared files live.
        epochs, batch_size, lr: encoder training (Adam); 0 epochs keeps the seeded untrained encoder.
        l2_weight, bce_weight, l2_await, l2_ramp, l2_gate: loss weights; the L2 term starts once a batch's bit
            accuracy exceeds l2_gate, waits l2_await steps and ramps up over l2_ramp steps (see ssba_encoder).
        width: encoder/decoder channels (reference 32).
        residual: the encoder outputs x + r instead of the reference's sigmoid image.
        seed: initialisation, shuffling and training bit strings.
        arrays: BackdoorBench-layout poisoned copies, a path with "{split}" (train/test); replaces the encoder.
    """
    dynamic = True  # the trigger depends on the image

    def __init__(
        self, secret: str = "abcd", bits: int = 100, coding: Coding = "bch", dataset: str | None = None,
        data_dir: str = "data", epochs: int = 20, batch_size: int = 64, lr: float = 1e-4, l2_weight: float = 10.0,
        bce_weight: float = 1.0, l2_await: int = 1000, l2_ramp: int = 3000, l2_gate: float = 0.9, width: int = 32,
        residual: bool = False, seed: int = 0, arrays: str | None = None,
    ) -> None:
        super().__init__()
        if min(bits, batch_size, width) < 1 or min(epochs, l2_await, l2_ramp) < 0 or lr <= 0:
            raise ValueError(f"SSBA needs bits, batch_size, width >= 1, epochs, l2_await, l2_ramp >= 0 and lr > 0; "
                             f"got {bits}, {batch_size}, {width}, {epochs}, {l2_await}, {l2_ramp}, {lr}")
        if not 0.0 <= l2_gate <= 1.0:
            raise ValueError(f"SSBA l2_gate is a bit accuracy in [0, 1] (1: never add the L2 term), got {l2_gate}")
        if arrays is not None and ("{split}" not in arrays or dataset is None):
            raise ValueError(f"SSBA arrays={arrays!r} must contain '{{split}}' (e.g. 'resource/ssba/cifar10_ssba_"
                             f"{{split}}_b1.npy') and needs dataset= naming the clean images they encode")
        if dataset is not None:
            get_dataset(dataset)  # unknown names fail here
        self.secret, self.bits, self.coding, self.dataset, self.data_dir = secret, bits, coding, dataset, data_dir
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.l2_weight, self.bce_weight = l2_weight, bce_weight
        self.l2_await, self.l2_ramp, self.l2_gate = l2_await, l2_ramp, l2_gate
        self.width, self.residual, self.seed = width, residual, seed
        self.arrays = arrays
        self.register_buffer("secret_bits", fingerprint_bits(secret, bits, coding))
        self.register_buffer("image_size", torch.zeros(1, dtype=torch.long))  # 0: not resolved; -1: any size
        self.encoder: StegaStampEncoder | None = None
        if arrays is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # the same initialisation train_stegastamp starts from
                self.encoder = StegaStampEncoder(bits, width, residual)
            self.encoder.requires_grad_(False).eval()
        else:
            self.register_buffer("arrays_sha256", torch.zeros(2, 32, dtype=torch.uint8))
        self.encoder_report: dict[str, float] = {}  # bit accuracy, PSNR, seconds of the last training
        object.__setattr__(self, "decoder", None)  # set by fit(); outside the state: poisoning needs no decoder
        self._table: tuple[dict[bytes, int], np.ndarray] | None = None

    def report(self) -> dict[str, float]:
        """The encoder's training: seconds, steps, final L2 weight, bit accuracy and PSNR (dB) of encoded
        images (cached encoders report their original training)."""
        return {k: float(v) for k, v in self.encoder_report.items()}

    def settings(self) -> dict:
        """What `train_stegastamp` gets (and what the encoder cache is keyed by, with the images)."""
        return {"bits": self.bits, "width": self.width, "residual": self.residual, "epochs": self.epochs,
                "batch_size": self.batch_size, "lr": self.lr, "l2_weight": self.l2_weight,
                "bce_weight": self.bce_weight, "l2_await": self.l2_await, "l2_ramp": self.l2_ramp,
                "l2_gate": self.l2_gate, "seed": self.seed}

    # -- resolving the encoder or the arrays ------------------------------------------------------------
    def fit(self, x_train: Tensor, y_train: Tensor | None = None) -> SSBA:
        """Train (or load from the cache) the encoder on clean uint8 training images (N, 3, H, W).

        The `Trigger.fit` hook: BackdoorDataModule.setup calls it with the run's clean training set, so
        `dataset` need not be named. A no-op with `arrays`, with `epochs=0`, or once resolved."""
        if self.arrays is not None or int(self.image_size) != 0:
            return self
        if self.epochs == 0:
            self.image_size.fill_(-1)
            return self
        check_images(x_train)
        encoder, decoder, self.encoder_report = cached_stegastamp(x_train, self.settings(), ENCODER_CACHE,
                                                                  self.dataset or "")
        self.encoder.load_state_dict(encoder.state_dict())
        object.__setattr__(self, "decoder", decoder)
        self.image_size.fill_(x_train.shape[-1])
        return self

    def resolve(self) -> SSBA:
        """Make the trigger usable: train/load the encoder, or read the arrays (idempotent)."""
        if self.arrays is not None:
            if self._table is None:
                self._table = self._read_arrays()
        elif int(self.image_size) == 0:
            if self.epochs == 0:
                self.image_size.fill_(-1)
            elif self.dataset is None:
                raise ValueError("SSBA needs clean training images for its encoder: use it in a BackdoorDataModule "
                                 "(which calls fit(x_train)), call fit(x_train) yourself, set dataset= to the "
                                 "run's dataset, or give pre-generated arrays=")
            else:
                self.fit(get_dataset(self.dataset).load(self.data_dir, "train")[0])
        return self

    def record(self) -> dict:
        self.resolve()
        return super().record()

    def forward(self, x: Tensor) -> Tensor:
        check_images(x)
        self.resolve()
        if self.arrays is not None:
            return self._look_up(x)
        size = int(self.image_size)
        if size > 0 and tuple(x.shape[-2:]) != (size, size):
            raise ValueError(f"this SSBA encoder was trained on {size}x{size} images, got {tuple(x.shape[-2:])}; "
                             f"train one on the run's dataset (dataset=)")
        if next(self.encoder.parameters()).device != x.device:
            self.to(x.device)
        return apply_ssba(x, self.encoder, self.secret_bits)

    # -- pre-generated arrays -----------------------------------------------------------------------------
    def _read_arrays(self) -> tuple[dict[bytes, int], np.ndarray]:
        source = get_dataset(self.dataset)
        table, poisoned, digests = {}, [], []
        for split in ("train", "test"):
            path = Path(self.arrays.format(split=split))
            if not path.is_file():
                raise ValueError(f"SSBA arrays file {path} not found (arrays={self.arrays!r}); give BackdoorBench's "
                                 f"{self.dataset}_ssba_{{train,test}}_b1.npy or files in that layout")
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            clean = source.load(self.data_dir, split)[0]
            expected = (len(clean), clean.shape[2], clean.shape[3], 3)
            if array.dtype != np.uint8 or array.shape != expected:
                raise ValueError(f"{path}: expected uint8 {expected} (N x H x W x 3, the {split} split of "
                                 f"{self.dataset} in order), got {array.dtype} {array.shape}")
            digests.append(hashlib.sha256(path.read_bytes()).digest())
            offset = sum(len(p) for p in poisoned)
            for i, key in enumerate(_keys(clean)):
                table.setdefault(key, offset + i)
            poisoned.append(array)
        found = torch.tensor(np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(2, 32))
        if self.arrays_sha256.any() and not torch.equal(found, self.arrays_sha256):
            raise ValueError(f"SSBA arrays {self.arrays!r} differ from the files this trigger was recorded with")
        self.arrays_sha256.copy_(found)
        self.image_size.fill_(expected[1])
        return table, np.concatenate(poisoned)

    def _look_up(self, x: Tensor) -> Tensor:
        table, poisoned = self._table
        rows = [table.get(key, -1) for key in _keys(x.cpu())]
        missing = sum(r < 0 for r in rows)
        if missing:
            raise ValueError(f"{missing} of {len(rows)} images are not among the clean {self.dataset} images in "
                             f"{self.data_dir} that the SSBA arrays encode; this mode can only trigger those")
        out = torch.from_numpy(poisoned[rows]).permute(0, 3, 1, 2).contiguous()
        if len(out) and float(psnr(out, x.cpu())) < 15.0:
            raise ValueError(f"the SSBA arrays {self.arrays!r} do not match the {self.dataset} images in "
                             f"{self.data_dir} index by index (PSNR < 15 dB): they must be in the same order")
        return out.to(x.device)


def _keys(x: Tensor) -> list[bytes]:
    """A 16-byte BLAKE2 digest of each uint8 image (C, H, W), the lookup key of the arrays mode."""
    flat = x.contiguous().view(len(x), -1).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]
