"""Extending the benchmark touches only the new files: a backbone (its class, declaring its layer roles), a defense
(its file and its config), a data-poisoning attack (its trigger and its config). Each is defined here, registered,
and run end to end through train.py; nothing else in the repository knows about it."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from core.backbones import BACKBONES, LayerRoles
from datamodules.triggers import TRIGGERS, Trigger
from experiments.names import attack_display, attack_kind, defense_display, defense_family, defense_order
from lightning_modules.defenses import DEFENSES, Defense
from tests.conftest import CONFIGS, run_cli

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


class TinyResNet(nn.Module):
    """A stem, one residual block, one strided block with a 1x1 skip conv, a linear classifier."""

    layer_roles = LayerRoles(
        classifier="fc", head=("fc",), attention={"block2": 1000.0}, polarizer="block2.conv",
        activations=("ReLU",), skip_convs=("skip",),
        reinit={"stem": 0.01, "block1": 0.03, "block2": 0.27, "fc": 0.10},
    )

    def __init__(self, num_classes: int, width: int = 8) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.block1 = nn.ModuleDict({"conv": nn.Conv2d(w, w, 3, padding=1, bias=False), "bn": nn.BatchNorm2d(w),
                                     "relu": nn.ReLU()})
        self.block2 = Strided(w, 2 * w)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        b = self.block1
        x = b["relu"](b["bn"](b["conv"](x)) + x)
        return self.fc(self.pool(self.block2(x)).flatten(1))


class Strided(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.skip = nn.Conv2d(cin, cout, 1, stride=2, bias=False)  # after bn in module order, yet it feeds no BN
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)) + self.skip(x))


class Shrink(Defense):
    """A toy defense: scale the classifier head's weights towards zero by `factor`, then fine-tune (the FT step)."""

    family = "pruning"
    display_name = "Shrink (test)"
    smoke_args = ["--trainer.max_epochs", "1"]

    def __init__(self, backdoored: str, factor: float = 0.5, lr: float = 0.01, result_file: str | None = None,
                 save_defended: bool = True, channels_last: bool = True) -> None:
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()

    @torch.no_grad()
    def prepare(self) -> None:
        for name in self.net.layer_roles.head if hasattr(self.net, "layer_roles") else ():
            self.net.get_submodule(name).weight.mul_(self.hparams.factor)

    def info(self) -> dict[str, Any]:
        return {"factor": self.hparams.factor}

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.net.parameters(), lr=self.hparams.lr)


class Corner(Trigger):
    """A white square in the top-left corner."""

    def __init__(self, size: int = 2) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        x = x.clone()
        x[..., : self.size, : self.size] = 255
        return x


@pytest.fixture(scope="module")
def registered():
    """Register the three newcomers for this module's tests, and only for them."""
    BACKBONES.register("tiny_resnet", TinyResNet)
    DEFENSES.register("shrink", Shrink)
    TRIGGERS.register("corner", Corner)
    yield
    BACKBONES.unregister("tiny_resnet")
    DEFENSES.unregister("shrink")
    TRIGGERS.unregister("corner")


@pytest.fixture(scope="module")
def tiny_attacked(registered, tmp_path_factory) -> dict:
    """A TinyResNet (width 16) trained briefly on digits with the new Corner trigger, through train.py (test ACC
    ~0.75, ASR ~1; ~10 s on 2 CPU cores)."""
    root = tmp_path_factory.mktemp("extension")
    attack = root / "corner.yaml"  # the new attack's config: the trigger, ratio and target
    attack.write_text("model:\n  class_path: lightning_modules.VictimTraining\n"
                      "data:\n  init_args:\n    trigger:\n      class_path: tests.test_extension.Corner\n"
                      "      init_args: {size: 6}\n    poison_ratio: 0.1\n    target: 0\n")
    cli = run_cli("fit", "--config", str(CONFIGS / "data" / "digits.yaml"), "--config", str(attack),
                  "--model.init_args.backbone.class_path", "tests.test_extension.TinyResNet",
                  "--model.init_args.backbone.init_args.width", "16", "--data.batch_size", "64",
                  "--trainer.max_epochs", "15", "--model.init_args.lr", "0.1", "--trainer.limit_val_batches", "0",
                  "--trainer.num_sanity_val_steps", "0", "--trainer.logger.init_args.name", "tiny", *QUIET, cwd=root)
    ckpt = root / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    return {"root": root, "checkpoint": ckpt, "metrics": {k: float(v) for k, v in cli.trainer.callback_metrics.items()}}


def test_new_attack_and_backbone_train(tiny_attacked) -> None:
    metrics = tiny_attacked["metrics"]
    assert metrics["test/asr"] > 0.5 and metrics["test/acc"] > 0.3, metrics  # chance: 0.1
    assert attack_display("Corner") == "Corner" and attack_kind("Corner") == "static"


@pytest.mark.parametrize("name", [*sorted(DEFENSES), "shrink"])
def test_every_defense_runs_on_the_new_backbone(name: str, tiny_attacked) -> None:
    defense = DEFENSES[name]
    config = CONFIGS / "defense" / f"{name}.yaml"
    if name == "shrink":  # the new defense's config, beside its file
        config = tiny_attacked["root"] / "shrink.yaml"
        config.write_text("model:\n  class_path: tests.test_extension.Shrink\n  init_args:\n    factor: 0.5\n"
                          "data:\n  class_path: datamodules.MitigationDataModule\n  init_args:\n    batch_size: 64\n"
                          "trainer:\n  max_epochs: 2\n")
    out = tiny_attacked["root"] / name
    out.mkdir(exist_ok=True)
    run_cli("fit", "--config", str(config), "--model.backdoored", str(tiny_attacked["checkpoint"]),
            "--data.spc", "10", "--data.split_seed", "0", *defense.smoke_args, *QUIET,
            "--trainer.logger.init_args.name", name, cwd=out)
    result = json.loads((out / "runs" / name / "version_0" / "result.json").read_text())
    assert result["backbone"] == "TinyResNet" and result["defense"] == defense.__name__
    assert result["attack"] == "Corner"
    for stage in ("before", "after"):
        assert all(0 <= result[stage][k] <= 1 for k in ("acc", "asr", "ra")), result[stage]
    assert math.isfinite(result["der"])


def test_reports_know_the_new_defense(registered) -> None:
    assert defense_family("Shrink") == "pruning" and defense_display("Shrink") == "Shrink (test)"
    order = defense_order(["FT", "Shrink", "FP", "SAU"])
    assert order.index("Shrink") < order.index("FT") < order.index("SAU")  # pruning family first, FT heads the rest
