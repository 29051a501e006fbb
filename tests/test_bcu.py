"""BCU: each layer re-initialises the share of its weights it is configured for (BatchNorm untouched), the
temperature rises to its end value, labels are never read, only D_m decides, bad settings fail."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_modules.checkpoint import load_attacked
from lightning_modules.defenses import BCU
from lightning_modules.backbones import SmallCNN, VGG19BN, layer_roles
from lightning_modules.defenses.bcu import reinit_layers, reinit_weights, temperature

SMALL_CNN_REINIT = dict(layer_roles(SmallCNN).reinit)


class Spy(BCU):
    """Keeps the student and the teacher as they are when distillation starts (after the re-initialisation)."""

    def on_train_start(self) -> None:
        self.student_start = {k: v.clone() for k, v in self.net.state_dict().items()}
        self.teacher_start = {k: v.clone() for k, v in self.references["teacher"].state_dict().items()}


def run_bcu(run_defense, path, epochs: int = 2, data: dict | None = None, **kwargs) -> Spy:
    return run_defense(Spy, path, epochs=epochs, data={"spc": 3, **(data or {})}, save_defended=False, **kwargs)


def test_reinit_fraction_per_layer_on_big_layers() -> None:
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(64, 64, 3), nn.BatchNorm2d(64), nn.Flatten(), nn.Linear(1000, 400))
    nn.init.normal_(original[1].weight)
    fresh = copy.deepcopy(original)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(100.0)  # every fresh value differs from the original one
    before = {k: v.clone() for k, v in original.state_dict().items()}
    net, twin = copy.deepcopy(original), copy.deepcopy(original)
    probs = reinit_layers(net, {"0": 0.27, "3": 0.1})
    fractions = reinit_weights(net, fresh, probs, torch.Generator().manual_seed(0))
    for name, p in probs.items():
        changed = total = 0
        for pname in ("weight", "bias"):
            new, old = net.state_dict()[f"{name}.{pname}"], before[f"{name}.{pname}"]
            swapped = new != old
            assert torch.equal(new[swapped], fresh.state_dict()[f"{name}.{pname}"][swapped])  # from the fresh net
            changed, total = changed + int(swapped.sum()), total + swapped.numel()
        assert fractions[name] == changed / total
        assert abs(changed / total - p) < 4 * math.sqrt(p * (1 - p) / total)  # 36,928 and 400,400 elements
    for key in ("1.weight", "1.bias", "1.running_mean", "1.running_var"):  # BatchNorm untouched
        assert torch.equal(net.state_dict()[key], before[key]), key
    reinit_weights(twin, fresh, probs, torch.Generator().manual_seed(0))  # seeded: the same mask again
    for key, value in net.state_dict().items():
        assert torch.equal(twin.state_dict()[key], value), key


def test_student_is_the_reinitialised_backdoored_model(backdoored_checkpoint, run_defense) -> None:
    path = backdoored_checkpoint["path"]
    original = load_attacked(path).net.state_dict()
    reinit = {"SmallCNN": {**SMALL_CNN_REINIT, "features.0": 0.0, "linear": 1.0}}
    model = run_bcu(run_defense, path, reinit=reinit)
    start, info = model.student_start, model.info()
    norms = [n for n, m in model.net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 5
    for key, value in original.items():
        if any(key.startswith(n + ".") for n in norms):  # BatchNorm untouched, running statistics included
            assert torch.equal(start[key], value), key
        assert torch.equal(model.teacher_start[key], value), key  # the teacher is the backdoored model
    assert torch.equal(start["features.0.weight"], original["features.0.weight"])  # probability 0
    assert (start["linear.weight"] != original["linear.weight"]).float().mean() > 0.99  # probability 1
    changed = (start["features.14.weight"] != original["features.14.weight"]).float().mean()  # 18,432 weights
    assert float(changed) == pytest.approx(0.27, abs=0.02) == info["reinit_fraction"]["features.14"]
    assert info["reinit"]["features.14"] == 0.27 and 0 <= info["dm_agreement_after"] <= 1


def test_temperature_schedule() -> None:
    assert temperature(0, 100) == pytest.approx(1.03) and temperature(99, 100) == 4.0  # the authors' 1 + 3(e+1)/E
    assert temperature(0, 1) == 4.0 and temperature(4, 5, 2.0, 3.0) == 3.0
    steps = [temperature(e, 10) for e in range(10)]
    assert all(b - a == pytest.approx(0.3) for a, b in zip(steps, steps[1:]))


def test_temperature_per_epoch_in_a_run(backdoored_checkpoint, run_defense) -> None:
    model = run_bcu(run_defense, backdoored_checkpoint["path"], epochs=3)
    assert [e["temperature"] for e in model.info()["epochs"]] == pytest.approx([2.0, 3.0, 4.0])
    assert all(e["kl"] >= 0 for e in model.info()["epochs"])


def test_labels_are_never_used(backdoored_checkpoint, run_defense) -> None:
    path = backdoored_checkpoint["path"]
    a = run_bcu(run_defense, path)
    b = run_bcu(run_defense, path, data={"shuffle_labels": True})
    assert not torch.equal(a.mitigation_data("train")[1], b.mitigation_data("train")[1])
    for key, value in a.net.state_dict().items():
        assert torch.equal(value, b.net.state_dict()[key]), key


def test_only_dm_decides(backdoored_checkpoint, run_defense) -> None:
    path = backdoored_checkpoint["path"]
    a = run_bcu(run_defense, path)
    b = run_bcu(run_defense, path, data={"noise": True})
    for key, value in a.net.state_dict().items():
        assert torch.equal(value, b.net.state_dict()[key]), key
    assert a.result["before"]["acc"] != b.result["before"]["acc"]  # the test sets did differ


@pytest.mark.parametrize("bad", [{"lr": -0.01}, {"temperature_start": 0.0}, {"temperature_end": -1.0},
                                 {"momentum": 1.0}, {"reinit": {"VGG19BN": dict(layer_roles(VGG19BN).reinit)}},
                                 {"reinit": {"SmallCNN": {**SMALL_CNN_REINIT, "linear": 1.5}}},
                                 {"reinit": {"SmallCNN": {k: v for k, v in SMALL_CNN_REINIT.items()
                                                          if k != "linear"}}},
                                 {"reinit": {"SmallCNN": {**SMALL_CNN_REINIT, "no.such": 0.1}}}])
def test_bad_settings(backdoored_checkpoint, bad) -> None:
    with pytest.raises(ValueError, match="BCU|SmallCNN"):
        BCU(str(backdoored_checkpoint["path"]), **bad)
