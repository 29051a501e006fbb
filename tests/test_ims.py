"""IMS: the gates and their inverse, the agreement / disagreement losses by hand, the perturbation step descends its
objective and stays within its bound, the mask step descends, weights stay frozen until the gates are folded into
the conv weights (exactly the gated forward, after a reload too), the early stop reads D_m only, bad settings."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from lightning_modules.checkpoint import load_attacked
from lightning_modules.defenses import IMS, load_defended
from lightning_modules.defenses.ims import EarlyStop, agreement, disagreement, gate
from tests.helpers import assert_ignores_test_sets, dm_images

PHASES = ("initial", "minimize", "minimize_l1")


def test_gates_stay_in_unit_interval_and_invert() -> None:
    gen = torch.Generator().manual_seed(0)
    m, s = torch.rand(1000, generator=gen), torch.rand(1000, generator=gen)
    for inverse in (False, True):
        g = gate(m, s, 20.0, inverse)
        assert g.min() >= 0 and g.max() <= 1
        assert (g >= s - 1e-6).all()  # the selection is a floor: s -> 1 keeps the channel in both masks
    torch.testing.assert_close(gate(m, s, 20.0, inverse=True), gate(1 - m, s, 20.0))
    ones = torch.ones(5)
    assert torch.equal(gate(m[:5], ones, 20.0), ones) and torch.equal(gate(m[:5], ones, 20.0, True), ones)
    # s = 0: the two masks split the channels; m = 1 is kept by the forward mask and cut by the inverse one
    zeros = torch.zeros(3)
    m3 = torch.tensor([1.0, 0.5, 0.0])
    a = torch.sigmoid(torch.tensor([10.0, 0.0, -10.0]))
    torch.testing.assert_close(gate(m3, zeros, 20.0), a)
    torch.testing.assert_close(gate(m3, zeros, 20.0, inverse=True), a.flip(0))
    torch.testing.assert_close(gate(m3, torch.full((3,), 0.4), 20.0), a + 0.4 * (1 - a))


def test_agreement_and_disagreement_by_hand() -> None:
    a = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 1.0, 0.0], [3.0, -2.0, 0.5]])

    def probs(row: list[float]) -> list[float]:
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]

    overlaps = [sum(p * q for p, q in zip(probs(ra), probs(rb))) for ra, rb in zip(a.tolist(), b.tolist())]
    assert agreement(a, b).item() == pytest.approx(-sum(math.log(o + 1e-8) for o in overlaps) / 2, rel=1e-6)
    assert disagreement(a, b).item() == pytest.approx(-sum(math.log(1 - o + 1e-8) for o in overlaps) / 2, rel=1e-6)
    sure = torch.tensor([[30.0, 0.0, 0.0]])
    assert agreement(sure, sure) < 1e-6 and disagreement(sure, sure) > 15  # the same confident class
    other = torch.tensor([[0.0, 30.0, 0.0]])
    assert disagreement(sure, other) < 1e-6 and agreement(sure, other) > 15  # different confident classes


def test_early_stop_rule() -> None:
    stop = EarlyStop(patience=2, improvement=0.9)
    # 1.0 improves on inf; 0.95 is not below 0.9; 0.85 is below 0.9 (resets); then three misses: stop at the third
    assert [stop.update(v) for v in (1.0, 0.95, 0.85, 0.8, 0.9, 0.77)] == [False, False, False, False, False, True]
    assert stop.best == 0.85
    stop = EarlyStop(patience=0, improvement=0.98)
    assert [stop.update(v) for v in (1.0, 0.5, 0.495)] == [False, False, True]
    assert EarlyStop(3, 1.0).update(math.nan) is False and EarlyStop(0, 1.0).update(math.nan) is True


def perturbation_objective(model: IMS, x: torch.Tensor, delta: torch.Tensor) -> float:
    """The inner objective recomputed from the logits: inverse(x + d) agrees with original(x + d), which leaves
    original(x)."""
    with torch.no_grad():
        ref_clean, ref_perturbed = model.logits(x, None), model.logits(x + delta, None)
        inverse = model.logits(x + delta, "inverse")
        return float(agreement(inverse, ref_perturbed) + disagreement(ref_perturbed, ref_clean))


def test_perturbation_descends_its_objective_within_its_bound(backdoored_checkpoint) -> None:
    path = backdoored_checkpoint["path"]
    x, _ = dm_images(path, spc=2)
    model = IMS(str(path), perturbation_lr=0.01, perturbation_steps=6, save_defended=False).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # exclusive random masks: the inverse net differs from the original
        for m, s in zip(model.gates.masks, model.gates.selections):
            m.copy_(torch.rand(m.shape, generator=gen))
            s.zero_()
    with model.gates.attached(model.net):
        ref_clean = model.logits(x, None)
        delta, last = model.fit_perturbation(x, ref_clean)
        zero = perturbation_objective(model, x, torch.zeros_like(x))
        fitted = perturbation_objective(model, x, delta)
        size = float(delta.abs().mean())
        signs = torch.randint(0, 2, x.shape, generator=gen) * 2 - 1
        random = perturbation_objective(model, x, size * signs.float())
        flipped = (model.logits(x + delta, None).argmax(1) != ref_clean.argmax(1)).float().mean()
        # a large step: the clamp binds at the bound
        model.hparams.perturbation_lr, model.hparams.perturbation_bound = 1.0, 0.05
        wide, _ = model.fit_perturbation(x, ref_clean)
    assert fitted < zero - 2.0 and fitted < random - 2.0, (zero, random, fitted)
    assert flipped > 0.5  # the original's prediction on x + delta left its prediction on x
    # s = 1: the inverse net is the original, so only the disagreement term can move delta: off ref(x)
    with torch.no_grad():
        for s in model.gates.selections:
            s.fill_(1.0)
    model.hparams.perturbation_lr, model.hparams.perturbation_bound = 0.01, 1.0
    with model.gates.attached(model.net):
        own, _ = model.fit_perturbation(x, ref_clean)
        moved = (model.logits(x + own, None).argmax(1) != ref_clean.argmax(1)).float().mean()
        own_fitted, own_zero = perturbation_objective(model, x, own), perturbation_objective(model, x, 0 * own)
    assert own_fitted < 0.5 * own_zero and moved > 0.5, (own_zero, own_fitted, moved)
    assert last.shape == (2,) and bool(torch.isfinite(last).all())
    assert delta.shape == x.shape and float(delta.abs().max()) <= 1.0
    assert float(wide.abs().max()) == pytest.approx(0.05) and float(wide.abs().min()) >= 0
    assert all(p.grad is None for p in model.gates.parameters())  # the inner step leaves the gates alone
    assert not any(m._forward_hooks for m in model.net.modules())  # detached again


def test_rounds_freeze_the_weights_and_folding_is_the_gated_forward(backdoored_checkpoint, run_defense, tmp_path,
                                                                     monkeypatch) -> None:
    path = backdoored_checkpoint["path"]
    seen = {}
    finish = IMS.finish

    def spy_finish(self):
        seen["state"] = {k: v.clone() for k, v in self.net.state_dict().items()}
        seen["grad"] = [p.requires_grad or p.grad is not None for p in self.net.parameters()]
        finish(self)

    monkeypatch.setattr(IMS, "finish", spy_finish)
    # batch 32 >= D_m (30 images): each round sees all of D_m, so the initial phase's loss is one function
    model = run_defense(IMS, path, root=tmp_path, epochs=0, data={"spc": 3, "batch_size": 32}, initial_rounds=4,
                        minimize_rounds=1, perturbation_steps=2, patience=10)
    info = model.info()
    assert [info[p]["rounds"] for p in PHASES] == [4, 1, 1] and info["dm_images"] == 30 == info["batch"]
    initial = info["initial"]["loss"]
    assert all(b < a for a, b in pairwise(initial)) and initial[-1] < initial[0] - 0.2, initial  # descent
    assert set(info["minimize"]["last_terms"]) == {"masked_clean", "masked_perturbed", "inverse_perturbed",
                                                   "inverse_clean", "inverse_perturbed_flips", "l1"}
    assert info["minimize"]["last_terms"]["l1"] == 0 and info["minimize_l1"]["last_terms"]["l1"] > 0
    flat = torch.cat([p.detach().flatten() for p in model.gates.parameters()])
    assert flat.min() >= 0 and flat.max() <= 1 and flat.min() < 1

    original = load_attacked(str(path)).net
    for key, value in original.state_dict().items():  # nothing moved during the rounds
        assert torch.equal(seen["state"][key], value), key
    assert not any(seen["grad"])

    gates = dict(zip(model.gates.names, [g.detach() for g in model.gates.values()]))
    state = model.net.state_dict()
    for key, value in original.state_dict().items():  # only conv weights and biases, scaled by their gates
        layer, _, kind = key.rpartition(".")
        if layer in gates and kind in ("weight", "bias"):
            g = gates[layer].view(-1, 1, 1, 1) if kind == "weight" else gates[layer]
            torch.testing.assert_close(state[key], value * g)
        else:
            assert torch.equal(state[key], value), key
    assert not any(m._forward_hooks for m in model.net.modules())

    # the defended checkpoint (a plain backbone) computes what the gated original computes
    reloaded = load_defended(tmp_path / "checkpoints" / "last.ckpt")
    x, _ = dm_images(path, spc=2)
    model.eval()
    original.eval()
    with torch.no_grad(), model.gates.attached(original):
        model.gates.mode = "forward"
        gated = model.classify(x, original)
    torch.testing.assert_close(reloaded(x), gated, rtol=1e-4, atol=1e-4)


def test_early_stop_reads_dm_only(backdoored_checkpoint, tmp_path) -> None:
    def make(root):
        # patience 0, improvement 0.001: a phase stops at its second round
        return IMS(str(backdoored_checkpoint["path"]), initial_rounds=5, minimize_rounds=5, perturbation_steps=1,
                   patience=0, improvement=0.001, result_file=str(root / "result.json"), save_defended=False)

    plain, swapped = assert_ignores_test_sets(make, backdoored_checkpoint["path"], tmp_path, epochs=0, spc=3)
    for phase in PHASES:
        assert plain.info()[phase]["rounds"] == 2 and plain.info()[phase]["stopped_early"]
        assert plain.info()[phase] == swapped.info()[phase]


@pytest.mark.parametrize("bad", [{"k": 0.0}, {"l1_weight": -1.0}, {"mask_lr": 0.0}, {"perturbation_lr": -1e-3},
                                 {"perturbation_steps": 0}, {"perturbation_bound": 0.0}, {"weight_decay": -0.1},
                                 {"initial_rounds": -1}, {"minimize_rounds": -1}, {"patience": -1},
                                 {"improvement": 0.0}, {"improvement": 1.5}, {"k": math.inf}])
def test_bad_settings(bad: dict) -> None:
    with pytest.raises(ValueError, match=rf"IMS: invalid {next(iter(bad))}=.*configs/defense/ims.yaml"):
        IMS("unused.ckpt", **bad)
