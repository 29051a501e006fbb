"""MM-BD: which activations are bounded per backbone, that the bounds really clamp them (and nothing before
`prepare`), their initialisation, the lambda schedule, that only the bounds train, that a defended
checkpoint restores them, and that the test sets play no part in the result."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from datamodules.loader import TensorImages
from datamodules.mitigation import MitigationDataModule
from lightning_modules.backbones import BACKBONES, layer_roles
from lightning_modules.checkpoint import load_attacked
from lightning_modules.defenses import MMBD, load_defended
from lightning_modules.defenses.hooks import capture
from lightning_modules.defenses.mmbd import bounded_layers, is_check_epoch, next_lambda
from tests.conftest import CONFIGS, run_cli
from tests.helpers import QUIET

# (how many activations are bounded, a prefix none of them may have)
EXPECTED = {
    "preact_resnet18": (16, "linear"),      # every BatchNorm2d
    "vgg19_bn": (16, "classifier"),         # 18 ReLUs minus the classifier's two
    "efficientnet_b3": (78, "classifier"),  # every SiLU, 26 SE blocks included
    "mobilenet_v3_large": (39, "classifier"),  # 20 Hardswish + 19 ReLU (11 in blocks, 8 in SE)
    "small_cnn": (5, "linear"),
}


def observe(defense: MMBD) -> dict[str, torch.Tensor]:
    """Register, after the bounding hooks, hooks that store what each bounded module finally outputs."""
    seen: dict[str, torch.Tensor] = {}
    modules = dict(defense.net.named_modules())
    for name in defense.layer_names:
        modules[name].register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.detach()))
    return seen


def with_data(defense: MMBD, x: torch.Tensor, y: torch.Tensor) -> MMBD:
    """Serve (x, y) as D_m without a Trainer (for unit tests of prepare / the hooks)."""
    defense.mitigation_data = lambda part="train": (x, y)
    return defense


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_layer_selection(name: str) -> None:
    with torch.device("meta"):
        net = BACKBONES[name](10)
    roles = layer_roles(net)
    names = bounded_layers(net, roles.activations, roles.activations_exclude)
    count, forbidden = EXPECTED[name]
    assert len(names) == count and not any(n.startswith(forbidden) for n in names)
    if name == "mobilenet_v3_large":
        assert "features.1.block.0.2" in names and "classifier.1" not in names  # first ReLU block; classifier


def test_unbounded_before_prepare(backdoored_checkpoint) -> None:
    """Bounds start at +inf: the 'before' measurement sees exactly the backdoored model."""
    defense = MMBD(str(backdoored_checkpoint["path"])).eval()
    original = load_attacked(backdoored_checkpoint["path"]).classifier
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        logits = defense(x)
        with defense.unbounded():
            assert torch.equal(defense(x), logits)
        torch.testing.assert_close(logits, original(x))  # channels_last vs contiguous convs: not bit-equal


def test_bounds_clamp_activations(backdoored_checkpoint) -> None:
    defense = MMBD(str(backdoored_checkpoint["path"])).eval()
    seen = observe(defense)
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        for i, bound in enumerate(defense.bounds):
            bound.copy_(torch.linspace(0.05, 0.5, bound.shape[0]).view_as(bound))
        with defense.unbounded():
            free = defense(x)
        raw = dict(seen)
        bounded = defense(x)
    assert not torch.allclose(free, bounded)
    for name, bound in zip(defense.layer_names, defense.bounds):
        assert torch.all(seen[name] <= bound), name  # never above B, channel by channel
        assert torch.any(raw[name] > bound), name  # and the bound did act
    first = defense.layer_names[0]  # its input is the same in both passes
    assert torch.equal(seen[first], torch.minimum(raw[first], defense.bounds[0]))


def test_initial_bounds_are_layer_maxima(backdoored_checkpoint) -> None:
    x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (40,))
    defense = with_data(MMBD(str(backdoored_checkpoint["path"]), init_augment=False), x, y)
    with torch.no_grad(), capture(defense.net, defense.layer_names) as store:
        original = defense.eval()(x)
    maxima = {name: store[name].max() for name in defense.layer_names}
    defense.prepare()
    for name, bound in zip(defense.layer_names, defense.bounds):
        assert torch.all(bound == maxima[name]), name  # one value per layer, copied to every channel
    with torch.no_grad():
        assert torch.equal(defense(x), original)  # at its own maxima the model is unchanged on D_m
    assert defense.history["initial_accuracy"] == pytest.approx((original.argmax(1) == y).float().mean().item())


class Roll(nn.Module):
    """A fixed stand-in for the random crop: every image shifted by (3, -2) pixels."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.roll(images, shifts=(3, -2), dims=(2, 3))


def test_initial_bounds_come_from_augmented_dm_by_default(backdoored_checkpoint) -> None:
    """The fork takes the initial maxima on D_m fed with the training augmentation (zero-padded crops give larger
    early activations at the borders, so looser bounds): a fixed stand-in augmentation must decide them."""
    x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (40,))
    defense = with_data(MMBD(str(backdoored_checkpoint["path"])), x, y)
    assert defense.hparams.init_augment
    shift = Roll()
    defense.augment = shift
    with torch.no_grad(), capture(defense.net, defense.layer_names) as store:
        defense.eval()(shift(x))
    defense.prepare()
    for name, bound in zip(defense.layer_names, defense.bounds):
        assert torch.all(bound == store[name].max()), name
    assert defense.history["init_augment"] is True


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # training_step without a Trainer
def test_running_train_accuracy_decides_lambda(backdoored_checkpoint, monkeypatch) -> None:
    """lam_signal running_train_acc: the check reads the accuracy of the epoch's (bounded) training forwards."""
    x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (40,))
    defense = with_data(MMBD(str(backdoored_checkpoint["path"]), lam_signal="running_train_acc", lam_every=1), x, y)
    defense.augment = nn.Identity()
    defense.prepare()
    # the epoch's batches (stand-ins for augmented D_m) differ from D_m itself, which an eval pass would read
    xt = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for b in defense.bounds:  # tighter bounds: the bounded model differs from the original
            b.mul_(0.3)
        yt = defense(xt).argmax(1)
        yt[:13] = (yt[:13] + 1) % 10  # a running accuracy of 27/40, unlike the eval accuracy on (x, y)
        expected = (defense(xt).argmax(1) == yt).float().mean().item()
        assert expected == pytest.approx(27 / 40) and defense.accuracy(x, y) != pytest.approx(expected)
    monkeypatch.setattr(MMBD, "current_epoch", property(lambda self: 1))
    defense.on_train_epoch_start()
    defense.training_step((xt[:25], yt[:25]), 0)
    defense.training_step((xt[25:], yt[25:]), 1)
    defense.on_train_epoch_end()
    (check,) = defense.history["checks"]
    assert check["accuracy"] == pytest.approx(expected)
    assert check["lam"] == pytest.approx(next_lambda(0.5, expected, defense.history["initial_accuracy"], 1.2, 0.05))


def test_lambda_schedule() -> None:
    assert [e for e in range(50) if is_check_epoch(e, 10)] == [10, 20, 30, 40]
    assert next_lambda(0.5, accuracy=0.86, initial=0.9, factor=1.2, drop=0.05) == pytest.approx(0.6)
    assert next_lambda(0.6, accuracy=0.80, initial=0.9, factor=1.2, drop=0.05) == pytest.approx(0.5)


def fit(checkpoint, cwd):
    torch.manual_seed(0)
    cwd.mkdir(parents=True, exist_ok=True)
    run_cli("fit", "--config", str(CONFIGS / "defense" / "mmbd.yaml"), "--model.backdoored", str(checkpoint),
            "--trainer.max_epochs", "3", "--model.lam_every", "1", "--model.lr", "0.05", *QUIET, cwd=cwd)
    run_dir = cwd / "runs" / "mmbd-spc10-seed0" / "version_0"
    return run_dir, json.loads((run_dir / "result.json").read_text())


@pytest.fixture(scope="module")
def short_run(backdoored_checkpoint, tmp_path_factory):
    """3 epochs (lambda checked after epochs 1 and 2), lr 0.05 so the bounds move visibly."""
    return fit(backdoored_checkpoint["path"], tmp_path_factory.mktemp("mmbd"))


def test_only_bounds_train_and_reload(backdoored_checkpoint, short_run) -> None:
    run_dir, result = short_run
    info = result["defense_info"]
    assert [c["epoch"] for c in info["checks"]] == [1, 2] and len(info["layers"]) == 5
    defended = load_defended(run_dir / "checkpoints" / "last.ckpt")
    initial = torch.tensor(info["initial_bounds"])
    finals = [b.detach().flatten() for b in defended.bounds]
    assert all(torch.isfinite(b).all() for b in finals)
    assert all(not torch.all(b == top) for b, top in zip(finals, initial))  # trained away from the maxima
    original = load_attacked(backdoored_checkpoint["path"]).net.state_dict()
    state = defended.net.state_dict()  # only the bounds trained: weights and BN statistics are untouched
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
    seen = observe(defended)
    with torch.no_grad():
        defended(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8))
    for name, bound in zip(defended.layer_names, defended.bounds):
        assert torch.all(seen[name] <= bound), name
    with pytest.raises(ValueError, match="load_defended"):
        load_attacked(run_dir / "checkpoints" / "last.ckpt")


def test_test_sets_play_no_part(backdoored_checkpoint, short_run, tmp_path, monkeypatch) -> None:
    honest = short_run[1]
    setup = MitigationDataModule.setup

    def other_test_images(self, stage=None):
        setup(self, stage)
        for key in ("clean", "backdoor"):
            images, *labels = self._sets[key].tensors
            other = torch.randint(0, 256, images.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
            self._sets[key] = TensorImages(other, *labels)  # own generator: the training draws stay the same

    monkeypatch.setattr(MitigationDataModule, "setup", other_test_images)
    _, swapped = fit(backdoored_checkpoint["path"], tmp_path)
    assert swapped["before"] != honest["before"]  # the swap took effect
    for key in ("initial_bounds", "checks", "layers", "lam_final"):
        assert swapped["defense_info"][key] == honest["defense_info"][key], key


def test_bad_arguments(backdoored_checkpoint) -> None:
    path = str(backdoored_checkpoint["path"])
    for bad in ({"lr": -1e-3}, {"accuracy_drop": 2.0}, {"lam_every": 0}, {"lam": float("nan")}):
        with pytest.raises(ValueError, match="MMBD: invalid"):
            MMBD(path, **bad)
    with pytest.raises(ValueError, match="lam_signal"):
        MMBD(path, lam_signal="test_acc")
    with pytest.raises(ValueError, match="no MM-BD layer rule configured for backbone SmallCNN"):
        MMBD(path, layers={"VGG19BN": {"types": ["ReLU"], "exclude": []}})
    with pytest.raises(ValueError, match="no module of SmallCNN matches"):
        MMBD(path, layers={"SmallCNN": {"types": ["SiLU"], "exclude": []}})


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # training_step without a Trainer
def test_training_the_bounds_brings_the_logits_closer_to_the_original(backdoored_checkpoint) -> None:
    """The MSE term is minimised: from bounds at a third of each layer's D_m maximum (far from the original's logits),
    Adam steps on the MSE alone (lambda 0) must shrink MSE(f_B(x), f(x)) well below its start; with the sign flipped
    they would grow it."""
    from datamodules import MitigationDataModule

    data = MitigationDataModule(spc=10, backdoored=str(backdoored_checkpoint["path"]))
    data.setup("fit")
    x, y = data.tensors("train")
    defense = with_data(MMBD(str(backdoored_checkpoint["path"])), x, y)
    defense.prepare()
    defense.lam = 0.0
    with torch.no_grad():
        for bound in defense.bounds:
            bound.mul_(1 / 3)
    defense.augment = nn.Identity()  # the same images at every step
    optimizer = torch.optim.Adam(defense.bounds.parameters(), lr=0.05)

    def mse() -> float:
        with torch.no_grad():
            with defense.unbounded():
                reference = defense(x)
            return float(torch.nn.functional.mse_loss(defense(x), reference))

    start = mse()
    defense.train()
    for _ in range(10):
        optimizer.zero_grad()
        defense.training_step((x, y), 0).backward()
        optimizer.step()
    after = mse()
    assert start > 0.3 and after < 0.5 * start, (start, after)
