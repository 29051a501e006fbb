"""NAD: the attention map matches a hand computation; the teacher is a fine-tuned, frozen copy, never the student;
the student starts from the backdoored weights; only D_m decides; bad settings fail. Every backbone:
tests/test_defenses.py."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.checkpoint import load_attacked
from lightning_modules.defenses import NAD
from lightning_modules.backbones import SmallCNN, layer_roles
from lightning_modules.defenses.nad import attention_loss, attention_map


class Spy(NAD):
    """Keeps what the test needs to see: the weights when student training starts, the teacher before `finish`."""

    def on_train_start(self) -> None:
        self.student_start = {k: v.clone() for k, v in self.net.state_dict().items()}
        self.teacher_start = {k: v.clone() for k, v in self.references["teacher"].state_dict().items()}

    def finish(self) -> None:
        self.kept = {"teacher": self.references["teacher"]}  # a dict: an attribute would register a submodule
        super().finish()


def run_nad(run_defense, path, epochs: int = 1, spc: int = 3, noise: bool = False, **kwargs) -> Spy:
    kwargs = {"teacher_epochs": 2, "save_defended": False, **kwargs}
    return run_defense(Spy, path, epochs=epochs, data={"spc": spc, "noise": noise}, **kwargs)


def test_attention_map_by_hand() -> None:
    f = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])  # (B=1, C=2, H=1, W=2)
    # p = 2: sum_c f^2 = [1 + 9, 4 + 0] = [10, 4], L2 norm sqrt(116)
    torch.testing.assert_close(attention_map(f, p=2, eps=0.0), torch.tensor([[10.0, 4.0]]) / math.sqrt(116))
    # p = 1: [4, 2] / sqrt(20); eps 1e-6 is added to the norm, as in the reference
    torch.testing.assert_close(attention_map(f, p=1), torch.tensor([[4.0, 2.0]]) / (math.sqrt(20) + 1e-6))
    # the loss is the mean square difference of the maps, and the maps ignore the features' scale
    g = torch.tensor([[[[0.0, 1.0]], [[0.0, 0.0]]]])  # map [0, 1]
    expected = ((10 / math.sqrt(116)) ** 2 + (4 / math.sqrt(116) - 1) ** 2) / 2
    assert float(attention_loss(f, g)) == pytest.approx(expected, rel=1e-5)
    assert float(attention_loss(5.0 * f, f)) == pytest.approx(0.0, abs=1e-10)


def test_teacher_is_fine_tuned_frozen_and_not_the_student(backdoored_checkpoint, run_defense) -> None:
    path = backdoored_checkpoint["path"]
    original = load_attacked(path).net.state_dict()
    model = run_nad(run_defense, path, epochs=1, teacher_epochs=2)
    teacher = model.kept["teacher"]
    # the student starts from the backdoored weights; the teacher from the same, fine-tuned
    for key, value in original.items():
        assert torch.equal(model.student_start[key], value), key
    assert any(not torch.equal(model.teacher_start[k], v) for k, v in original.items() if v.is_floating_point())
    # a separate, frozen network: no shared storage, no gradient, eval mode, unchanged by the student's training
    student_ptrs = {p.data_ptr() for p in model.net.parameters()}
    assert not student_ptrs & {p.data_ptr() for p in teacher.parameters()}
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, model.teacher_start[key]), key
    # the student did move, and the teacher is not part of the defended model's state
    assert any(not torch.equal(model.net.state_dict()[k], v) for k, v in original.items() if v.is_floating_point())
    assert all(not k.startswith("teacher") for k in model.state_dict())
    info = model.info()
    assert info["layers"] == dict(layer_roles(SmallCNN).attention)
    assert info["feature_shapes"]["features.12"] == [32, 16, 16]
    assert len(info["teacher"]["loss"]) == 2 and len(info["student"]) == 1
    assert info["student"][0]["at/features.16"] > 0 and 0 <= info["dm_acc_after"] <= 1


def test_student_loss_is_ce_plus_weighted_attention_terms(backdoored_checkpoint, run_defense) -> None:
    model = run_nad(run_defense, backdoored_checkpoint["path"], epochs=1, teacher_epochs=1)
    model.references["teacher"] = model.kept["teacher"]
    x, y = model.mitigation_data("train")
    loss, terms = model.nad_loss(x.float() / 255, y)
    assert set(terms) == {"ce", "at/features.12", "at/features.16"}
    assert float(loss) == pytest.approx(float(terms["ce"] + 500 * terms["at/features.12"]
                                              + 1000 * terms["at/features.16"]), rel=1e-5)


def test_only_dm_decides(backdoored_checkpoint, run_defense) -> None:
    """The defended weights do not depend on the test sets (only the before/after measurements read them)."""
    path = backdoored_checkpoint["path"]
    a = run_nad(run_defense, path, teacher_epochs=1)
    b = run_nad(run_defense, path, teacher_epochs=1, noise=True)
    for key, value in a.net.state_dict().items():
        assert torch.equal(value, b.net.state_dict()[key]), key
    assert a.result["before"]["acc"] != b.result["before"]["acc"]  # the test sets did differ


@pytest.mark.parametrize("bad", [{"lr": -0.01}, {"teacher_lr": 0.0}, {"p": 0.0}, {"teacher_epochs": -1},
                                 {"momentum": 1.0}, {"teacher_cosine_t_max": 0},
                                 {"layers": {"VGG19BN": {"avgpool": 1000.0}}},
                                 {"layers": {"SmallCNN": {"no.such": 1.0}}},
                                 {"layers": {"SmallCNN": {"linear": 1.0}}},  # (B, K) logits: no spatial map
                                 {"layers": {"SmallCNN": {"features.12": -1.0}}},
                                 {"layers": {"SmallCNN": {}}}])
def test_bad_settings(backdoored_checkpoint, bad) -> None:
    with pytest.raises(ValueError, match="NAD|SmallCNN"):
        NAD(str(backdoored_checkpoint["path"]), **bad)


def test_attention_term_reaches_the_student(backdoored_checkpoint, run_defense) -> None:
    """The same run with betas 0 (plain CE) must end with other student weights: the attention term's gradient
    reaches the student (a silent no-op would leave them equal)."""
    weights = []
    for betas in (None, {"SmallCNN": {"features.12": 0.0, "features.16": 0.0}}):
        kwargs = {} if betas is None else {"layers": betas}
        model = run_nad(run_defense, backdoored_checkpoint["path"], **kwargs)
        weights.append({k: v.clone() for k, v in model.net.state_dict().items()})
        assert all(model.info()["attention_active"].values())
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0] if k.endswith("weight"))
