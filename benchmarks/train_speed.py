"""Training throughput: this project's data path and module vs a plain PyTorch loop, in one process.

(a) project: `BackdoorDataModule` (uint8 tensors, on the GPU when there is one, batched crop/flip on the
    device) + `VictimTraining` (normalisation in the module, channels_last) under a Lightning Trainer;
(b) reference: the way BackdoorBench trains, a plain loop over a torchvision DataLoader whose dataset
    applies per-sample PIL transforms (RandomCrop(32, 4), RandomHorizontalFlip, ToTensor, Normalize).

Both train the same backbone with SGD (lr 0.01, momentum 0.9, wd 5e-4) and batch 128 for the same number
of steps; the first `--warmup` steps are not timed. Prints images/second and the ratio project / reference.
`--compile MODE` also measures the project with its backbone compiled (`VictimTraining(compile_mode=MODE)`;
"reduce-overhead" = CUDA graphs): the compilation falls in the untimed warm-up steps.

    python benchmarks/train_speed.py --backbone small_cnn --steps 60               # 2 CPU cores
    python benchmarks/train_speed.py --backbone preact_resnet18 --steps 300 --device cuda --precision bf16-mixed \
        --compile reduce-overhead
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import get_args

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from datamodules import BackdoorDataModule
from datamodules.datasets import CIFAR10, write_npz
from datamodules.triggers import BadNets
from lightning_modules import VictimTraining
from lightning_modules.victim import CompileMode
from core.backbones import BACKBONES

BATCH = 128


class StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.steps = warmup, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.steps == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()
        self.steps += 1

    def on_train_end(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def project_throughput(args, data_dir: str, channels_last: bool, compile_mode: str | None = None) -> float:
    data = BackdoorDataModule("cifar10", data_dir=data_dir, trigger=BadNets(), poison_ratio=0.1,
                              batch_size=BATCH, cache_dir=None)
    model = VictimTraining(BACKBONES[args.backbone], channels_last=channels_last, compile_mode=compile_mode)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(max_steps=args.steps, accelerator=args.device, devices=1, precision=args.precision,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[timer])
    trainer.fit(model, data)
    return (args.steps - args.warmup) * BATCH / timer.seconds


class PILDataset(Dataset):
    """BackdoorBench-style: HWC uint8 images, a PIL image and a transform pipeline per sample."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def reference_throughput(args, data_dir: str, workers: int) -> float:
    with np.load(Path(data_dir) / "cifar10" / "train.npz") as f:
        x, y = f["x"], f["y"]
    spec = CIFAR10.spec
    pipeline = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])
    device = torch.device(args.device)
    loader = DataLoader(PILDataset(x, y, pipeline), batch_size=BATCH, shuffle=True, num_workers=workers,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0)
    net = BACKBONES[args.backbone](10).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    autocast = args.precision == "bf16-mixed"
    step, start = 0, None
    while step < args.steps:
        for images, labels in loader:
            if step == args.warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(net(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step == args.steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (args.steps - args.warmup) * BATCH / (time.perf_counter() - start)


def random_cifar(root: Path, train: int = 50000, test: int = 1000) -> str:
    """Random images in the CIFAR-10 layout, for pure speed runs where the real files are absent."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        write_npz(root / "cifar10" / f"{split}.npz", rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                  np.arange(n) % 10)
    return str(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="small_cnn", choices=sorted(BACKBONES))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                        help="DataLoader workers of the reference loop (each is measured)")
    parser.add_argument("--data_dir", default=None, help="folder with cifar10/{train,test}.npz; default: random")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--compile", default=None, choices=get_args(CompileMode),
                        help="also measure the project with its backbone compiled in this mode")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    data_dir = args.data_dir or random_cifar(Path("/tmp/train_speed_data"))
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"GPU: {gpu}; torch {torch.__version__}, lightning {L.__version__}")
    print(f"backbone {args.backbone}, batch {BATCH}, {args.steps - args.warmup} timed steps, {args.precision}")
    rows = []
    for r in range(args.repeats):
        ours = project_throughput(args, data_dir, channels_last=True)
        plain_layout = project_throughput(args, data_dir, channels_last=False)
        compiled = project_throughput(args, data_dir, True, args.compile) if args.compile else None
        refs = {w: reference_throughput(args, data_dir, w) for w in args.workers}
        best = max(refs.values())
        rows.append((ours / best, compiled / best if compiled else float("nan")))
        print(f"[{r}] project {ours:8.0f} img/s (without channels_last {plain_layout:8.0f}"
              + (f", compiled {args.compile} {compiled:8.0f}" if compiled else "") + ") | reference "
              + ", ".join(f"{w} workers {v:8.0f} img/s" for w, v in refs.items())
              + f" | ratio vs best reference {ours / best:.2f}x"
              + (f", compiled {compiled / best:.2f}x" if compiled else ""))
    ratios = np.array(rows)
    print(f"median ratio over {len(rows)} repeat(s): {float(np.median(ratios[:, 0])):.2f}x"
          + (f", compiled ({args.compile}) {float(np.median(ratios[:, 1])):.2f}x" if args.compile else ""))


if __name__ == "__main__":
    main()
