"""Generate the LF trigger pattern (Zeng et al., "Rethinking the Backdoor Attacks' Triggers: A Frequency
Perspective", ICCV 2021): a targeted universal adversarial perturbation, low-pass filtered, against a clean
surrogate model, cached on disk per (dataset, surrogate, seed, settings).

BackdoorBench's resource/lowFrequency algorithm: per pass over `num_images` shuffled images, a targeted DeepFool
step for every image not yet sent to the target, v <- minmax(G(v + G(r))) (Gaussian sigma 6 px, rescaled to
[0, `max_value` = 0.2]), stored as uint8 0..51; stop at `fooling_rate` or on a plateau of 5 passes.
Differs from the reference (docs/fidelity.md, "LF"): 0..1 pixels normalised inside the surrogate; held-out
images from the training set, not the test set; "moved" means predicted as the target; `chunk` > 1 batches
DeepFool (chunk 1 = the reference's sequence); the surrogate is trained here (`surrogate_epochs`, victim recipe)
or a clean checkpoint of this project.
Defaults: configs/attack/lf.yaml.
Cost: surrogate training, then up to `passes` x `num_images` DeepFool runs (<= `max_iter` fwd + bwd each);
measured: benchmarks/README.md.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.backbones import build_backbone
from core.determinism import deterministic_kernels
from datamodules.cache import cached
from datamodules.datasets import DataSpec, get_dataset
from datamodules.transforms import BatchAugment, Normalize

log = logging.getLogger(__name__)
VERSION = 1  # bump when the algorithm changes, so cached patterns are regenerated
_NOT_KEYED = {"data_dir"}  # where the data lives does not change the pattern (its content is fingerprinted)


@dataclass(frozen=True)
class PatternGeneration:
    """How to generate an LF pattern.

    Args:
        dataset: the dataset to attack; None: the run's (`data.init_args.dataset`, filled by the trigger's
            `bind_run`).
        surrogate: backbone of the clean surrogate, {class_path, init_args} or a class path; None: the run's
            victim backbone (the survey: a surrogate of the victim's architecture); ignored when
            `surrogate_checkpoint` is given.
        surrogate_checkpoint: a clean checkpoint of this project (train.py fit with configs/attack/clean.yaml)
            to use as the surrogate instead of training one.
        data_dir: folder of the prepared dataset; None: the run's.
        target: the target class; None: the run's (`data.init_args.target`).
        seed: seeds the surrogate's training, the image draws and the pass orders.
        surrogate_epochs: epochs of the surrogate's clean training.
        num_images: training images the perturbation is fitted on.
        passes: most passes over them.
        max_iter: most DeepFool iterations per image.
        overshoot: DeepFool's overshoot.
        max_value: top of the pattern's [0, max_value] range on the 0..1 pixel scale.
        sigma: standard deviation of the Gaussian low-pass filter, in pixels (30 taps at 6).
        fooling_rate: stop once this share of held-out images changes prediction.
        holdout_per_class: held-out training images per class for that early stop.
        chunk: images given to DeepFool at once (1: the reference's sequence exactly).
    """

    dataset: str | None = None
    surrogate: dict[str, Any] | str | None = None
    surrogate_checkpoint: str | None = None
    data_dir: str | None = None
    target: int | None = None
    seed: int = 0
    surrogate_epochs: int = 20
    num_images: int = 100
    passes: int = 50
    max_iter: int = 200
    overshoot: float = 0.02
    max_value: float = 0.2
    sigma: float = 6.0
    fooling_rate: float = 0.2
    holdout_per_class: int = 10
    chunk: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.surrogate, str):
            object.__setattr__(self, "surrogate", {"class_path": self.surrogate, "init_args": {}})
        if self.surrogate is not None and "class_path" not in self.surrogate:
            raise ValueError(f"LF surrogate must be {{class_path, init_args}}, got {self.surrogate!r}")
        for name in ("surrogate_epochs", "num_images", "passes", "max_iter", "holdout_per_class", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"LF generation {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.max_value <= 1.0:
            raise ValueError(f"LF max_value is on the 0..1 pixel scale: it must lie in (0, 1], got {self.max_value}")
        if self.sigma <= 0 or self.overshoot < 0 or not 0.0 < self.fooling_rate <= 1.0:
            raise ValueError(f"LF needs sigma > 0, overshoot >= 0 and fooling_rate in (0, 1]; got sigma "
                             f"{self.sigma}, overshoot {self.overshoot}, fooling_rate {self.fooling_rate}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def unbound(self) -> list[str]:
        """Settings still left to the run (filled by `LowFrequency.bind_run`)."""
        missing = [n for n in ("dataset", "target") if getattr(self, n) is None]
        return missing + (["surrogate"] if self.surrogate is None and self.surrogate_checkpoint is None else [])

    @classmethod
    def from_value(cls, value: PatternGeneration | dict[str, Any]) -> PatternGeneration:
        if isinstance(value, cls):
            return value
        known = {f.name for f in fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown LF generation settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**value)


def default_cache_dir() -> str:
    return os.path.expanduser(os.environ.get("BACKDOOR_BENCH_CACHE", "~/.cache/backdoor-bench"))


def generate_pattern(cfg: PatternGeneration, cache_dir: str | None = "default") -> dict[str, Tensor]:
    """{"pattern": uint8 (C, H, W) in 0..round(255 max_value), "fooling_rates": per pass, "seconds"}; cached
    under `cache_dir`/lf_patterns ("default": $BACKDOOR_BENCH_CACHE or ~/.cache/backdoor-bench; None: no cache)."""
    if cfg.unbound():
        raise ValueError(
            f"LF pattern generation needs {', '.join(cfg.unbound())}: run it through a BackdoorDataModule (which "
            f"fills them from the run: its dataset, target and victim backbone) or name them in `generate` "
            f"(surrogate: {{class_path, init_args}}, e.g. core.backbones.PreActResNet18, or a clean "
            f"surrogate_checkpoint)")
    source = get_dataset(cfg.dataset)
    if not 0 <= cfg.target < source.spec.num_classes:
        raise ValueError(f"LF target must be a class of {cfg.dataset} (0..{source.spec.num_classes - 1}), "
                         f"got {cfg.target}")
    x_train, y_train = source.load(cfg.data_dir or "data", "train")
    surrogate_state = None
    if cfg.surrogate_checkpoint is not None:
        net, spec = load_clean_surrogate(cfg.surrogate_checkpoint, source.spec)
        surrogate_state = net.state_dict()
    key = {"lf_pattern": VERSION, **{k: v for k, v in cfg.to_dict().items() if k not in _NOT_KEYED},
           "content": [y_train, x_train[::997]], "surrogate_state": surrogate_state}
    root = default_cache_dir() if cache_dir == "default" else cache_dir
    folder = os.path.join(root, "lf_patterns") if root is not None else None

    def build() -> dict[str, Tensor]:
        start = time.perf_counter()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # enable_grad: the pattern may be resolved lazily inside a no_grad caller (Trigger.apply_chunked)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad(), \
                deterministic_kernels():
            torch.manual_seed(cfg.seed)
            if surrogate_state is None:
                model = train_surrogate(cfg, x_train, y_train, source.spec, device)
            else:
                model = nn.Sequential(Normalize(spec.mean, spec.std), net).to(device)
            out = universal_pattern(model.eval().requires_grad_(False), x_train, y_train, cfg, device)
        out["seconds"] = torch.tensor(time.perf_counter() - start)
        return out

    return cached(folder, key, build)


def load_clean_surrogate(path: str, spec: DataSpec) -> tuple[nn.Module, DataSpec]:
    from datamodules.checkpoint import (
        load_attacked,  # lazy: the checkpoint module imports the triggers, LF among them
    )

    if not os.path.isfile(path):
        raise ValueError(f"LF surrogate_checkpoint {path} not found; train one with configs/attack/clean.yaml")
    run = load_attacked(path)
    if run.record["attack"] is not None:
        raise ValueError(f"LF surrogate_checkpoint {path} holds a backdoored model ({run.record['attack']['name']}); "
                         f"the surrogate must be clean (configs/attack/clean.yaml)")
    if run.spec.name != spec.name:
        raise ValueError(f"LF surrogate_checkpoint {path} was trained on {run.spec.name}, not {spec.name}")
    return run.net, run.spec


def train_surrogate(cfg: PatternGeneration, x: Tensor, y: Tensor, spec: DataSpec, device: torch.device) -> nn.Module:
    """A clean classifier (pixels in, logits out) trained briefly with the victim recipe."""
    net = build_backbone(cfg.surrogate, spec.num_classes).to(device)
    model = nn.Sequential(Normalize(spec.mean, spec.std), net).to(device)
    augment = BatchAugment(spec.crop_padding, spec.hflip)
    batch, steps_per_epoch = 128, math.ceil(len(x) / 128)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.surrogate_epochs * steps_per_epoch)
    x, y = x.to(device), y.to(device)
    model.train()
    for _ in range(cfg.surrogate_epochs):
        order = torch.randperm(len(x), device=device)
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            loss = F.cross_entropy(model(augment(x[idx])), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model


def low_pass(v: Tensor, sigma: float = 6.0) -> Tensor:
    """The reference's separable Gaussian filter of (..., C, H, W): round(5 sigma) taps centred at (taps-1)/2,
    zero padding (taps//2 - [taps even]) before and taps//2 after, so the output keeps the input's size."""
    taps = max(1, round(5 * sigma))
    offsets = torch.arange(taps, dtype=torch.float64) - (taps - 1) / 2
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(device=v.device, dtype=v.dtype)
    shape = v.shape
    x = v.reshape(-1, 1, *shape[-2:])
    before, after = taps // 2 - (1 - taps % 2), taps // 2
    x = F.conv2d(F.pad(x, (0, 0, before, after)), kernel.view(1, 1, taps, 1))
    x = F.conv2d(F.pad(x, (before, after, 0, 0)), kernel.view(1, 1, 1, taps))
    return x.reshape(shape)


def rescale(v: Tensor, max_value: float) -> Tensor:
    """Min-max rescale of the whole pattern to [0, max_value]; a constant pattern is left as it is."""
    span = v.max() - v.min()
    return (v - v.min()) / span * max_value if span > 0 else v


def targeted_deepfool(
    model: nn.Module, x0: Tensor, target: int, overshoot: float, max_iter: int
) -> tuple[Tensor, Tensor]:
    """Per-image targeted DeepFool on a batch (each image independent: the model is in eval mode).

    Linearises f_target - f_start (start: each image's class at x0) and steps r_i = |f| w / ||w||^2 until the
    prediction is the target, at most `max_iter` steps. Returns ((1 + overshoot) r_tot, reached) as the
    reference does (r_tot accumulated, the overshoot applied to the total)."""
    with torch.no_grad():
        start = model(x0).argmax(1)
    r_tot = torch.zeros_like(x0)
    reached = start == target
    active = ~reached
    for _ in range(max_iter):
        if not active.any():
            break
        idx = active.nonzero().flatten()
        x = (x0[idx] + (1 + overshoot) * r_tot[idx]).requires_grad_(True)
        logits = model(x)
        f = logits[:, target] - logits.gather(1, start[idx, None])[:, 0]
        (w,) = torch.autograd.grad(f.sum(), x)
        norm_sq = w.flatten(1).pow(2).sum(1).clamp_min(1e-24)
        r_tot[idx] += (f.detach().abs() / norm_sq).view(-1, 1, 1, 1) * w
        with torch.no_grad():
            now = model(x0[idx] + (1 + overshoot) * r_tot[idx]).argmax(1) == target
        reached[idx] = now
        active[idx] = ~now
    return (1 + overshoot) * r_tot, reached


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, v: Tensor | None = None, batch: int = 512) -> Tensor:
    out = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch].float() / 255
        out.append(model(xb if v is None else (xb + v).clamp_(0, 1)).argmax(1))
    return torch.cat(out)


def draw_images(y: Tensor, cfg: PatternGeneration, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(indices of the fitted images, indices of the held-out ones): holdout_per_class per class first."""
    holdout = []
    for c in range(int(y.max()) + 1):
        pool = torch.nonzero(y == c).flatten()
        holdout.append(pool[torch.randperm(len(pool), generator=gen)[: cfg.holdout_per_class]])
    held = torch.cat(holdout)
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[held] = False
    pool = rest.nonzero().flatten()
    if len(pool) < cfg.num_images:
        raise ValueError(f"LF num_images {cfg.num_images} exceeds the {len(pool)} training images left after "
                         f"the held-out ones")
    return pool[torch.randperm(len(pool), generator=gen)[: cfg.num_images]], held


def universal_pattern(
    model: nn.Module, x: Tensor, y: Tensor, cfg: PatternGeneration, device: torch.device
) -> dict[str, Tensor]:
    """The LF pattern against `model` (eval mode, pixels in) from the training images (x, y); see the header."""
    gen = torch.Generator().manual_seed(cfg.seed)
    fit_idx, held_idx = draw_images(y, cfg, gen)
    images = x[fit_idx].to(device).float() / 255
    held = x[held_idx].to(device)
    clean_pred = predict(model, held)
    v = torch.zeros(x.shape[1:], device=device)
    rates: list[float] = []
    for p in range(cfg.passes):
        order = torch.randperm(len(images), generator=gen)
        for i in range(0, len(order), cfg.chunk):
            xs = (images[order[i : i + cfg.chunk]] + v).clamp(0, 1)
            with torch.no_grad():
                need = model(xs).argmax(1) != cfg.target
            if not need.any():
                continue
            r, reached = targeted_deepfool(model, xs[need], cfg.target, cfg.overshoot, cfg.max_iter)
            for step in r[reached]:
                v = rescale(low_pass(v + low_pass(step, cfg.sigma), cfg.sigma), cfg.max_value)
        rates.append((predict(model, held, v) != clean_pred).float().mean().item())
        log.info("LF pattern: pass %d, fooling rate %.3f", p + 1, rates[-1])
        if rates[-1] >= cfg.fooling_rate or (len(rates) >= 5 and max(rates[-5:]) - min(rates[-5:]) < 0.01):
            break
    pattern = (v * 255).round_().clamp_(0, 255).to(torch.uint8).cpu()
    targeted = (predict(model, held, v) == cfg.target).float().mean()
    return {"pattern": pattern, "fooling_rates": torch.tensor(rates), "target_rate": targeted.cpu()}
