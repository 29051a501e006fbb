"""The gallery callback and script write valid PNGs of clean vs. triggered images."""

from __future__ import annotations

import functools

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from callbacks.gallery import Gallery, pick_images, residual_image, tile
from datamodules import BackdoorDataModule
from datamodules.triggers import BadNets
from lightning_modules import VictimTraining
from lightning_modules.attacks import WaNet
from lightning_modules.backbones import SmallCNN


def fit_one_step(tmp_path, model, trigger=None) -> tuple[Gallery, L.Trainer]:
    gallery = Gallery(num_images=4, scale=2)
    data = BackdoorDataModule("digits", data_dir=str(tmp_path), trigger=trigger, batch_size=32, cache_dir=None,
                              serve_untriggered_backdoor_set=isinstance(model, WaNet))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=CSVLogger(tmp_path, name="run"), callbacks=[gallery],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, data)
    return gallery, trainer


def test_data_poisoning_gallery_png(tmp_path) -> None:
    gallery, trainer = fit_one_step(tmp_path, VictimTraining(functools.partial(SmallCNN, width=4)), BadNets())
    (path,) = gallery.paths
    assert path == tmp_path / "run" / "version_0" / "gallery.png"
    image = np.asarray(Image.open(path))
    # 3 rows (clean, triggered, residual) x 4 images of 32 px, 2 px gutters, enlarged 2x
    assert image.shape == (2 * (3 * 34 + 2), 2 * (4 * 34 + 2), 3) and image.dtype == np.uint8
    residual_row = image[2 * (2 + 2 * 34) : 2 * (2 + 2 * 34 + 32), 4 : 2 * (2 + 32)]
    assert residual_row.any(), "the residual row shows the patch"


def test_training_controlled_gallery_before_and_after(tmp_path) -> None:
    gallery, _ = fit_one_step(tmp_path, WaNet(functools.partial(SmallCNN, width=4)))
    assert [p.name for p in gallery.paths] == ["gallery.png", "gallery_trained.png"]
    assert all(Image.open(p).size[0] > 0 for p in gallery.paths)


def test_clean_run_writes_nothing(tmp_path) -> None:
    gallery, _ = fit_one_step(tmp_path, VictimTraining(functools.partial(SmallCNN, width=4)))
    assert gallery.paths == []


def test_pieces() -> None:
    y = torch.tensor([0, 1, 1, 2, 0, 3])
    x = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 3, 2, 2)
    assert pick_images(x, y, 4, exclude=0)[:, 0, 0, 0].tolist() == [1, 3, 5, 2], "one per class first, no target"
    clean = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    changed = clean.clone()
    changed[0, :, 0, 0] = 10
    assert residual_image(clean, changed).max() == 255 and residual_image(clean, changed)[1].max() == 0
    assert tile([clean, changed]).shape == (2 * 6 + 2, 2 * 6 + 2, 3)
    with pytest.raises(ValueError, match="num_images"):
        Gallery(num_images=0)


def test_gallery_script(tmp_path, monkeypatch) -> None:
    from benchmarks.gallery import main

    g = "--data.init_args.trigger.init_args.generate"
    tiny_lf = [f"lf={g}.{k}={v}" for k, v in (("surrogate_epochs", 1), ("num_images", 5), ("passes", 1),
                                               ("max_iter", 5), ("holdout_per_class", 1))]
    tiny_lf.append("lf=--model.init_args.backbone.init_args.width=8")  # the surrogate is the victim's SmallCNN
    monkeypatch.setenv("BACKDOOR_BENCH_CACHE", str(tmp_path / "cache"))  # LF generates against the run's backbone
    out = main(["--attacks", "badnets", "wanet", "lf", "--num_images", "3", "--scale", "1",
                *(a for item in tiny_lf for a in ("--set", item)), "--out", str(tmp_path / "all.png")])
    image = np.asarray(Image.open(out))
    assert image.shape[0] == 4 * 34 + 2 and image.ndim == 3  # rows: clean, badnets, wanet, lf
