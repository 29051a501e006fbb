"""PBE: the PGD examples stay in the per-channel pixel budget converted from normalised space; adversarial and
clean epochs alternate, each with a fresh optimiser; bad settings fail clearly."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_modules.defenses import PBE
from tests.conftest import CONFIGS
from tests.helpers import assert_ignores_test_sets, dm_images


def run_pbe(run_defense, path, epochs: int = 3, callbacks=(), **kwargs) -> PBE:
    return run_defense(PBE, path, epochs=epochs, data={"spc": 3}, callbacks=callbacks, **kwargs)


def pixels(n: int = 16, size: int = 32) -> torch.Tensor:
    """Mid-range pixels (0.25..0.75), so the [0, 1] clamp never shortens a step."""
    g = torch.Generator().manual_seed(0)
    return 0.25 + 0.5 * torch.rand(n, 3, size, size, generator=g)


DIGITS_STD, DIGITS_MEAN = 0.3241, 0.3059


@pytest.mark.parametrize("eps,space,expected", [(0.02, "normalized", 0.02 * DIGITS_STD), (6 / 255, "pixel", 6 / 255)])
def test_perturbation_stays_in_the_pixel_budget(backdoored_checkpoint, eps, space, expected) -> None:
    model = PBE(str(backdoored_checkpoint["path"]), eps=eps, eps_space=space)
    assert model.info()["pixel_eps"] == pytest.approx([expected] * 3)
    assert model.info()["pixel_step"] == pytest.approx([expected / 5] * 3)
    x = pixels()
    y = model.eval()(x).argmax(1)
    model.train()
    x_adv = model.perturb(x, y)
    assert model.net.training  # the attack runs in eval mode and restores the mode
    delta = (x_adv - x).abs()
    assert delta.max() <= expected * (1 + 1e-5)
    # signed steps drive many pixels to the boundary (a uniform start alone puts 1% there)
    assert (delta >= 0.99 * expected).float().mean() > 0.3
    with torch.no_grad():
        model.eval()
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y) + 0.01  # ascent, untargeted


def test_clamp_to_valid_pixels_and_the_forks_normalised_clamp(backdoored_checkpoint) -> None:
    path = str(backdoored_checkpoint["path"])
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 10
    x_adv = PBE(path, eps=0.5, eps_space="pixel").perturb(x, y)
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and (x_adv - x).abs().max() <= 0.5 + 1e-6
    # the fork clamps x + delta to [0, 1] in normalised space: pixels in [mean, mean + std]
    fork = PBE(path, eps=0.5, eps_space="pixel", clamp="normalized").perturb(x, y)
    assert fork.min() >= DIGITS_MEAN - 1e-4 and fork.max() <= DIGITS_MEAN + DIGITS_STD + 1e-4


class Spy(L.Callback):
    """Per epoch: the optimiser's state size at the first batch, before each step, and at the end."""

    def __init__(self) -> None:
        self.perturbed: dict[int, int] = {}
        self.state_at_start: dict[int, int] = {}
        self.state_at_end: dict[int, int] = {}
        self.state_before_step: dict[int, list[int]] = {}

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.state_before_step.setdefault(trainer.current_epoch, []).append(len(optimizer.state))

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.state_at_start[trainer.current_epoch] = len(module.optimizers().optimizer.state)

    def on_train_epoch_end(self, trainer, module) -> None:
        self.state_at_end[trainer.current_epoch] = len(module.optimizers().optimizer.state)


def test_phases_alternate_with_a_fresh_optimiser(backdoored_checkpoint, run_defense, monkeypatch) -> None:
    spy = Spy()
    calls: list[int] = []
    original = PBE.perturb

    def counting(self, x, y):
        calls.append(self.current_epoch)
        return original(self, x, y)

    monkeypatch.setattr(PBE, "perturb", counting)
    model = run_pbe(run_defense, backdoored_checkpoint["path"], epochs=4, callbacks=[spy])
    epochs = model.info()["epochs"]
    assert [e["phase"] for e in epochs] == ["adversarial", "clean", "adversarial", "clean"]
    assert sorted(set(calls)) == [0, 2] and calls.count(0) == 2  # 30 images, batch 16: 2 batches per epoch
    assert all("adv_top_class_share" in e for e in epochs[::2]) and not any("adv_top_class" in e for e in epochs[1::2])
    assert spy.state_at_start == {0: 0, 1: 0, 2: 0, 3: 0}  # momentum is not carried across phases
    assert all(n > 0 for n in spy.state_at_end.values())
    # the fork's fresh optimiser per adversarial batch: no adversarial step carries momentum; a clean epoch's
    # second step does
    assert spy.state_before_step[0] == spy.state_before_step[2] == [0, 0]
    assert spy.state_before_step[1][0] == 0 and spy.state_before_step[1][1] > 0
    assert model.info()["adversarial_epochs"] == model.info()["clean_epochs"] == 2
    assert 0 <= model.info()["dm_acc_after"] <= 1


def test_default_is_twenty_rounds() -> None:
    """The survey's loop: 20 rounds of (adversarial epoch, clean epoch), i.e. 40 epochs of alternating phases."""
    import yaml

    epochs = yaml.safe_load((CONFIGS / "defense" / "pbe.yaml").read_text())["trainer"]["max_epochs"]
    phases = [PBE.phase(e) for e in range(epochs)]
    assert phases.count("adversarial") == phases.count("clean") == 20


def test_training_augmentation_is_used(backdoored_checkpoint, run_defense, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr("datamodules.transforms.BatchAugment.forward", lambda self, x: calls.append(1) or x)
    run_pbe(run_defense, backdoored_checkpoint["path"], epochs=2, save_defended=False)
    assert len(calls) == 4  # every training batch of both phases


@pytest.mark.parametrize("bad", [{"eps": -0.02}, {"eps": float("nan")}, {"attack_steps": 0}, {"step_divisor": 0.0},
                                 {"lr": 0.0}, {"momentum": 1.0}, {"weight_decay": -1.0}, {"eps_space": "logit"},
                                 {"clamp": "none"}])
def test_bad_settings(backdoored_checkpoint, bad) -> None:
    with pytest.raises(ValueError, match="PBE"):
        PBE(str(backdoored_checkpoint["path"]), **bad)


def test_pgd_ascends_beyond_random_noise_of_the_same_budget(backdoored_checkpoint) -> None:
    """The untargeted PGD examples of D_m (default budget, 0.0065 of a pixel on digits) raise CE(x~, y) well above
    the clean images and a random sign perturbation at the same L_inf budget; descent steps would not."""
    path = str(backdoored_checkpoint["path"])
    x, y = dm_images(path)
    model = PBE(path).eval()
    x_adv = model.perturb(x, y)
    sign = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(1)).mul(2).sub(1)
    x_random = (x + model.pixel_eps * sign).clamp(0, 1)
    with torch.no_grad():
        ce = {k: float(F.cross_entropy(model(v), y)) for k, v in (("clean", x), ("random", x_random), ("pgd", x_adv))}
    assert ce["pgd"] > ce["clean"] + 0.15 and ce["pgd"] > 2 * ce["random"], ce


def test_defended_weights_ignore_the_test_sets(backdoored_checkpoint, tmp_path) -> None:
    path = backdoored_checkpoint["path"]

    def make(root):
        return PBE(str(path), result_file=str(root / "result.json"), save_defended=False)

    plain, swapped = assert_ignores_test_sets(make, path, tmp_path, epochs=2, spc=3)
    assert plain.info()["epochs"] == swapped.info()["epochs"]
    assert [e["phase"] for e in plain.info()["epochs"]] == ["adversarial", "clean"]
