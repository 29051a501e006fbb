"""All attacks in one picture, like the survey's Figure 2: a row of clean test images, then one row per
attack with the same images triggered (and, with --residuals, a row of each trigger's stretched |residual|).

    python -m benchmarks.gallery --data configs/data/digits.yaml --out gallery.png
    python -m benchmarks.gallery --attacks badnets blended wanet --checkpoint wanet=runs/.../last.ckpt
    python -m benchmarks.gallery --set ssba=--data.init_args.trigger.init_args.epochs=0

Each attack is built from its config (configs/attack/<name>.yaml composed with --data and
configs/model/small_cnn.yaml, through the project's CLI without running it). Data-poisoning triggers get
`fit` on the clean training set, as BackdoorDataModule does (SSBA trains or loads its cached encoder; LF
generates or loads its cached pattern: slow the first time). Training-controlled attacks (WaNet, IAB, BPP,
LIRA) are shown with their trigger as initialised, unless a trained checkpoint is given with --checkpoint
name=path: the label then says "trained" for IAB and LIRA (learned generators), "from its run" otherwise;
without one, IAB's and LIRA's rows show untrained generators and are labelled "untrained" (WaNet's warp and
BPP's quantisation need no training).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from callbacks.gallery import apply_trigger, pick_images, residual_image, tile, upscale
from datamodules.triggers.base import Trigger

REPO = Path(__file__).resolve().parents[1]
SURVEY = ["badnets", "blended", "sig", "lf", "ssba", "iab", "bpp", "wanet", "lira"]
LEARNED_IN_TRAINING = {"iab", "lira"}  # generators: untrained unless a checkpoint is given


def build_attack(name: str, data_config: str, extra: list[str], fit: bool = True) -> tuple[Trigger, object]:
    """(the attack's trigger, its DataModule) from configs/attack/<name>.yaml, without training; `fit=False`
    skips fitting a data-poisoning trigger (a checkpoint's trigger replaces it)."""
    from lightning_modules.cli import BackdoorCLI

    args = ["--config", data_config, "--config", str(REPO / "configs" / "attack" / f"{name}.yaml"),
            "--config", str(REPO / "configs" / "model" / "small_cnn.yaml"), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--seed_everything", "0", *extra]
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when this script's own arguments are in argv
    try:
        cli = BackdoorCLI(args=args, run=False)
    finally:
        sys.argv = argv
    data, model = cli.datamodule, cli.model
    trigger = getattr(model, "trigger", None)
    if not isinstance(trigger, Trigger):
        trigger = data.trigger
        if fit:
            x_train, y_train = data.source.load(data.data_dir, "train")
            trigger.bind_run(data.dataset, data.target, data.data_dir, model.backbone_spec)
            trigger.fit(x_train, y_train)
    return trigger, data


def label_column(names: list[str], height: int, width: int = 170) -> np.ndarray:
    """A white column with one text label per row (rows of `height` px)."""
    canvas = Image.new("RGB", (width, height * len(names)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(names):
        draw.text((4, i * height + height // 2 - 6), text, fill="black")
    return np.asarray(canvas)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO / "configs" / "data" / "digits.yaml"), help="data config")
    parser.add_argument("--attacks", nargs="+", default=SURVEY, help="attack config names")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                        help="a trained run of that attack: its trigger (with its learned state) is used")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=--key=value",
                        help="an extra CLI argument for one attack's config")
    parser.add_argument("--num_images", type=int, default=8)
    parser.add_argument("--scale", type=int, default=3)
    parser.add_argument("--residuals", action="store_true", help="add each trigger's |residual| row")
    parser.add_argument("--out", default="gallery.png")
    args = parser.parse_args(argv)

    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    extras: dict[str, list[str]] = {}
    for item in args.set:
        name, _, arg = item.partition("=")
        extras.setdefault(name, []).extend(arg.split("=", 1) if arg.startswith("--") else [arg])

    clean, rows, names = None, [], []
    for name in args.attacks:
        trigger, data = build_attack(name, args.data, extras.get(name, []), fit=name not in checkpoints)
        label = name
        if name in checkpoints:
            from datamodules.checkpoint import load_attacked

            trigger = load_attacked(checkpoints[name]).trigger
            label = f"{name} ({'trained' if name in LEARNED_IN_TRAINING else 'from its run'})"
        elif name in LEARNED_IN_TRAINING:
            label = f"{name} (untrained)"
        if clean is None:
            x, y = data.source.load(data.data_dir, "test")
            clean = pick_images(x, y, args.num_images, exclude=data.target)
            rows, names = [clean], ["clean"]
        triggered = apply_trigger(trigger, clean)
        rows.append(triggered)
        names.append(label)
        if args.residuals:
            rows.append(residual_image(clean, triggered))
            names.append(f"{name} |residual|")
        print(f"{label}: mean |change| {float((triggered.float() - clean.float()).abs().mean()):.2f} grey levels")

    grid = upscale(tile(rows), args.scale)
    labels = label_column(names, grid.shape[0] // len(names))
    labels = np.pad(labels, ((0, grid.shape[0] - labels.shape[0]), (0, 0), (0, 0)), constant_values=255)
    out = Path(args.out)
    Image.fromarray(np.concatenate([labels, grid], axis=1)).save(out)
    print(f"wrote {out} ({len(names)} rows)")
    return out


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_grad_enabled(True)
    main()
