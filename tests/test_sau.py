"""SAU: shared adversarial examples stay in the 0.2 L_inf ball and stop per sample once shared; the shared
indicator and both losses match hand computations; the model stays in eval mode against a frozen original, sees
no augmentation; bad settings fail clearly."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lightning_modules.checkpoint import load_attacked
from lightning_modules.defenses import SAU
from lightning_modules.defenses.sau import attack_loss, shared_indicators, unlearning_terms
from tests.helpers import assert_ignores_test_sets, dm_images


def digits(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    from datamodules.datasets import Digits

    x, y = Digits().build("test")
    return torch.from_numpy(x[:n]).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(y[:n])


def test_shared_indicator_hand_case() -> None:
    clean = torch.tensor([0, 1, 2, 3, 4])
    clean_ref = torch.tensor([0, 1, 2, 3, 5])
    pred = torch.tensor([7, 7, 2, 3, 4])      # flips: yes, yes, no, no, no
    pred_ref = torch.tensor([7, 8, 9, 3, 4])  # flips: yes, yes, yes, no, yes (its own clean prediction is 5)
    flipped, flipped_ref, shared = shared_indicators(pred, pred_ref, clean, clean_ref)
    assert flipped.tolist() == [True, True, False, False, False]
    assert flipped_ref.tolist() == [True, True, True, False, True]
    assert shared.tolist() == [True, False, False, False, False]  # only the first flips both to the same class


def softmax(row: list[float]) -> list[float]:
    z = sum(math.exp(v) for v in row)
    return [math.exp(v) / z for v in row]


def test_attack_loss_hand_case() -> None:
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [1.0, 1.0, 0.0]])
    logits_ref = torch.tensor([[0.0, 2.0, 0.0], [0.0, 3.0, 1.0], [0.5, 0.0, 0.0]])
    y = torch.tensor([0, 1, 2])
    clean, clean_ref = torch.tensor([0, 2, 0]), torch.tensor([0, 0, 0])
    # preds on x~: theta [0, 1, 0] -> flipped [no, yes, no]; theta_bar [1, 1, 0] -> flipped [yes, yes, no];
    # shared: image 1 only (both to class 1)
    loss, shared = attack_loss(logits, logits_ref, y, clean, clean_ref, beta1=0.01, beta2=1.0)
    assert shared.tolist() == [False, True, False]

    def ce(row, label):
        return -math.log(softmax(row)[label])

    def js(a, b):
        p, q = softmax(a), softmax(b)
        m = [(pi + qi) / 2 for pi, qi in zip(p, q)]
        return 0.5 * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m)) + 0.5 * sum(
            qi * math.log(qi / mi) for qi, mi in zip(q, m))

    L_, R = logits.tolist(), logits_ref.tolist()
    adv = ce(L_[0], 0) + ce(L_[2], 2) + ce(R[2], 2)  # not-flipped images of each model
    expected = -0.01 * adv / (2 * 3) + 1.0 * (js(L_[0], R[0]) + js(L_[2], R[2])) / 3  # not-shared images
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_unlearning_terms_hand_case() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    logits_adv = torch.tensor([[0.0, 2.0, 1.0], [1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 1, 2])
    ref, ref_adv = torch.tensor([0, 1, 1]), torch.tensor([2, 1, 1])
    # potential poison: y_bar != y and y_bar != theta_bar's clean prediction -> [yes, no (= y), no (= clean)]
    terms = unlearning_terms(logits, logits_adv, y, ref, ref_adv)
    ce_clean = sum(-math.log(softmax(r)[t]) for r, t in zip(logits.tolist(), y.tolist())) / 3
    ce_adv = sum(-math.log(softmax(r)[t]) for r, t in zip(logits_adv.tolist(), y.tolist())) / 3
    risk = -math.log(1 - softmax(logits_adv[0].tolist())[2]) / 3  # mean over the batch, one image counted
    assert float(terms["ce_clean"]) == pytest.approx(ce_clean, rel=1e-5)
    assert float(terms["ce_adv"]) == pytest.approx(ce_adv, rel=1e-5)
    assert float(terms["shared_risk"]) == pytest.approx(risk, rel=1e-5)
    assert float(terms["potential_poison"]) == pytest.approx(1 / 3)


def test_perturbation_stays_in_the_ball_and_stops_per_sample(backdoored_checkpoint) -> None:
    path = str(backdoored_checkpoint["path"])
    x, y = digits()
    runs = {}
    for steps in (1, 2, 5):
        model = SAU(path, attack_steps=steps).eval()
        model.prepare()
        runs[steps] = model.shared_adversarial(x, y)
    for x_adv, _ in runs.values():
        delta = x_adv - x
        assert delta.abs().max() <= 0.2 + 1e-6
        # signed steps of 0.2 from +0.2, clipped to the ball: every coordinate is -0.2, 0 or +0.2
        assert torch.allclose(delta, (delta / 0.2).round() * 0.2, atol=1e-6)
    assert runs[5][0].max() > 1.0  # x~ is not clamped to [0, 1] (digit strokes are near 1)
    (x1, _), (x2, shared_before_step_2) = runs[1], runs[2]
    # the images shared before step 2 do not move in it; the others do
    assert 0 < shared_before_step_2.sum() < len(y)
    moved = (x2 != x1).flatten(1).any(1)
    assert not moved[shared_before_step_2].any() and moved[~shared_before_step_2].any()


class EvalSpy(L.Callback):
    def __init__(self) -> None:
        self.training_flags: list[bool] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.training_flags += [m.training for m in module.net.modules()]


def test_eval_mode_frozen_original_no_augmentation(backdoored_checkpoint, run_defense, monkeypatch) -> None:
    path = str(backdoored_checkpoint["path"])
    calls = []
    monkeypatch.setattr("datamodules.transforms.BatchAugment.forward", lambda self, x: calls.append(1) or x)
    spy = EvalSpy()
    model = run_defense(SAU, path, epochs=2, data={"spc": 3}, callbacks=[spy])
    assert calls == [] and spy.training_flags and not any(spy.training_flags)
    original = load_attacked(path).net.state_dict()
    for key, value in model.references["original"].state_dict().items():
        assert torch.equal(value, original[key]), key
    after = model.net.state_dict()
    assert not all(torch.equal(after[k], v) for k, v in original.items())  # the weights moved
    for key in (k for k in original if "running" in k):  # eval mode: BN statistics never update
        assert torch.equal(after[key], original[key]), key
    assert not any(k.startswith("original") for k in model.state_dict())  # theta_bar stays out of the checkpoint
    epochs = model.info()["epochs"]
    assert len(epochs) == 2 and {"shared", "potential_poison", "shared_risk", "ce_clean"} <= set(epochs[0])


@pytest.mark.parametrize("bad", [{"bound": -0.2}, {"attack_steps": 0}, {"attack_step_size": 0.0}, {"lr": -1e-4},
                                 {"beta1": -0.01}, {"beta2": float("inf")}, {"lambdas": (1.0, -1.0, 1.0)},
                                 {"lambdas": (1.0, 1.0)}])
def test_bad_settings(backdoored_checkpoint, bad) -> None:
    with pytest.raises(ValueError, match="SAU"):
        SAU(str(backdoored_checkpoint["path"]), **bad)


def test_shared_search_flips_both_models_together(backdoored_checkpoint) -> None:
    """At the first step theta = theta_bar, so the search's objective is -CE (JS = 0): its signed descent steps must
    flip the models (together: shared) on nearly all of D_m, where its starting point (+bound everywhere) and a random
    sign perturbation of the same L_inf size flip few. Bound 0.05: the default 0.2 flips digits with any noise."""
    path = str(backdoored_checkpoint["path"])
    x, y = dm_images(path)
    bound = 0.05
    model = SAU(path, bound=bound, attack_step_size=bound / 2).eval()
    model.prepare()
    x_adv, _ = model.shared_adversarial(x, y)
    noise = bound * torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(1)).mul(2).sub(1)
    with torch.no_grad():
        clean = model(x).argmax(1)

        def shared(images: torch.Tensor) -> float:
            pred, pred_ref = model(images).argmax(1), model.classify(images, model.references["original"]).argmax(1)
            return float(shared_indicators(pred, pred_ref, clean, clean)[2].float().mean())

        rates = {"start": shared(x + bound), "random": shared(x + noise), "searched": shared(x_adv)}
    assert rates["searched"] > 0.9 and rates["searched"] > max(rates["start"], rates["random"]) + 0.5, rates


def test_shared_search_descends_the_divergence(backdoored_checkpoint) -> None:
    """With theta != theta_bar and only the JS term (beta1 = 0), the search must bring the two models' outputs on x~
    closer: the mean JS divergence falls well below its value at the start and at a random sign perturbation."""
    from lightning_modules.defenses.sau import js_divergence

    path = str(backdoored_checkpoint["path"])
    x, y = dm_images(path)
    bound = 0.05
    model = SAU(path, bound=bound, attack_step_size=bound / 2, beta1=0.0).eval()
    model.prepare()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # theta moves away from theta_bar, as after some unlearning steps
        for p in model.net.parameters():
            p.add_(0.05 * p.abs() * torch.randn(p.shape, generator=gen))
    x_adv, _ = model.shared_adversarial(x, y)
    noise = bound * torch.randint(0, 2, x.shape, generator=gen).mul(2).sub(1)
    with torch.no_grad():
        js = {k: float(js_divergence(model(v), model.classify(v, model.references["original"])).mean())
              for k, v in (("start", x + bound), ("random", x + noise), ("searched", x_adv))}
    assert js["searched"] < 0.3 * min(js["start"], js["random"]), js


def test_defended_weights_ignore_the_test_sets(backdoored_checkpoint, tmp_path) -> None:
    path = backdoored_checkpoint["path"]

    def make(root):
        return SAU(str(path), result_file=str(root / "result.json"), save_defended=False, attack_steps=2)

    plain, swapped = assert_ignores_test_sets(make, path, tmp_path, epochs=2, spc=3)
    assert plain.info()["epochs"] == swapped.info()["epochs"]
    original = load_attacked(str(path)).net.state_dict()
    assert any(not torch.equal(v, original[k]) for k, v in plain.net.state_dict().items())  # it did train
