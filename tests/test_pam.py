"""PAM: the perturbation points from theta to theta_bd with norm rho (zero at theta_bd and at rho 0); a training step
takes the gradient at theta + e and steps from theta, e zero at the first step and on its bound later; rho 0 is
BTI-DBF(U)'s SGD unlearning, step for step; D_m only; the demo's defaults; bad settings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from datamodules.checkpoint import load_attacked
from lightning_modules.defenses import BTIDBFU, PAM, pam
from lightning_modules.defenses.pam import toward_anchor
from tests.helpers import assert_ignores_test_sets

# one round of one epoch per stage, a 4-filter 2-stage generator
TINY = {"preround": 1, "nround": 1, "mround": 1, "uround": 1, "ul_round": 1, "generator_filters": 4,
        "generator_blocks": 2}


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


def test_perturbation_points_to_the_backdoored_weights() -> None:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(16, 8, generator=gen), torch.randn(8, generator=gen), torch.randn(3, 3, 3, generator=gen)]
    anchor = [p + torch.randn(p.shape, generator=gen) for p in params]
    d = flat(anchor) - flat(params)
    for rho in (0.05, 0.5, 4.0):
        e = toward_anchor(params, anchor, rho)
        assert [v.shape for v in e] == [p.shape for p in params]
        assert float(flat(e).norm()) == pytest.approx(rho, rel=1e-5)
        assert float(F.cosine_similarity(flat(e), d, dim=0)) == pytest.approx(1.0, abs=1e-6)
        # theta + e is rho closer to theta_bd
        assert float(d.norm() - (flat(anchor) - flat(params) - flat(e)).norm()) == pytest.approx(rho, rel=1e-4)
    for e in (toward_anchor(params, [p.clone() for p in params], 0.5), toward_anchor(params, anchor, 0.0)):
        assert all(torch.equal(v, torch.zeros_like(v)) for v in e)  # at theta_bd (no NaN) and at rho 0


def test_steps_take_the_gradient_at_the_perturbed_weights(backdoored_checkpoint, run_defense, monkeypatch) -> None:
    """Two unlearning steps (plain SGD): the first at theta_bd with e = 0; the second with e of norm rho toward
    theta_bd, and theta_new = theta - lr * g(theta + e) on its batch, not theta - lr * g(theta)."""
    path = backdoored_checkpoint["path"]
    seen, batches = [], []

    def recording(params, anchor, rho):
        e = toward_anchor(params, anchor, rho)
        seen.append(([p.detach().clone() for p in params], [a.clone() for a in anchor], e))
        return e

    loss = PAM.unlearning_loss

    def recording_loss(self, clean, mixed, y):
        batches.append((mixed.clone(), y.clone()))
        return loss(self, clean, mixed, y)

    monkeypatch.setattr(pam, "toward_anchor", recording)
    monkeypatch.setattr(PAM, "unlearning_loss", recording_loss)
    lr, rho = 0.05, 0.5
    d = run_defense(PAM, path, epochs=1, trainer={"max_steps": 2}, save_defended=False, data={"batch_size": 16},
                    **TINY, rho=rho, lr=lr, momentum=0.0)
    assert len(seen) == len(batches) == 2
    original = list(load_attacked(str(path)).net.parameters())
    (theta1, anchor, e1), (theta2, _, e2) = seen
    assert all(torch.equal(a, o) and torch.equal(t, o) for a, o, t in zip(anchor, original, theta1))
    assert all(torch.equal(v, torch.zeros_like(v)) for v in e1)  # the first step starts at theta_bd
    assert float(flat(e2).norm()) == pytest.approx(rho, rel=1e-5)
    assert float(F.cosine_similarity(flat(e2), flat(anchor) - flat(theta2), dim=0)) == pytest.approx(1.0, abs=1e-5)

    # the second step by hand (channels_last as the model: CPU conv gradients differ between memory formats)
    mixed, y = batches[1]

    def gradients(perturb: bool) -> list[torch.Tensor]:
        net = load_attacked(str(path)).net.train().to(memory_format=torch.channels_last)
        with torch.no_grad():
            for p, t, v in zip(net.parameters(), theta2, e2):
                p.copy_(t + v if perturb else t)
        inputs = d.normalize(mixed).contiguous(memory_format=torch.channels_last)
        return torch.autograd.grad(F.cross_entropy(net(inputs), y), list(net.parameters()))

    perturbed, plain = gradients(True), gradients(False)
    for (name, p), theta, g, g0 in zip(d.net.named_parameters(), theta2, perturbed, plain):
        step, size = p.detach() - theta, (lr * g).abs().max()
        assert (step + lr * g).abs().max() < 1e-2 * size, name
    assert sum(float((lr * (g - g0)).abs().sum()) for g, g0 in zip(perturbed, plain)) > 0.1 * sum(
        float((lr * g).abs().sum()) for g in perturbed)  # the unperturbed gradient is another step


def test_rho_zero_is_btidbfu_sgd_unlearning(backdoored_checkpoint, run_defense) -> None:
    """At rho 0 PAM's unlearning is BTI-DBF(U)'s with the same SGD, loss and batches, bit for bit (rho > 0 differs:
    test_steps_take_the_gradient_at_the_perturbed_weights)."""
    path = backdoored_checkpoint["path"]
    common = TINY | {"ul_round": 2, "optimizer": "sgd", "lr": 0.01, "momentum": 0.1, "poison_fraction": 0.2,
                     "feature_weight": 0.0}
    runs = [run_defense(cls, path, epochs=2, save_defended=False, data={"batch_size": 16}, **common, **extra)
            for cls, extra in ((PAM, {"rho": 0.0}), (BTIDBFU, {}))]
    bti = runs[1].net.state_dict()
    for key, value in runs[0].net.state_dict().items():
        assert torch.equal(value, bti[key]), key
    assert runs[0].info()["rounds"] == runs[1].info()["rounds"]
    distances = [e["distance_to_backdoored"] for e in runs[0].info()["unlearn"]]
    assert len(distances) == 2 and 0 < distances[0] < distances[1]


def test_depends_on_dm_only(backdoored_checkpoint, tmp_path) -> None:
    path = backdoored_checkpoint["path"]
    assert_ignores_test_sets(lambda root: PAM(str(path), **TINY, save_defended=False,
                                              result_file=str(root / "result.json")), path, tmp_path)


def test_demo_defaults(backdoored_checkpoint) -> None:
    h = PAM(str(backdoored_checkpoint["path"])).hparams
    assert (h.rho, h.nround, h.ul_round, h.mround, h.uround, h.norm_bound) == (0.5, 3, 30, 20, 30, 0.3)
    assert (h.optimizer, h.lr, h.momentum, h.poison_fraction, h.feature_weight) == ("sgd", 0.01, 0.1, 0.2, 0.0)


@pytest.mark.parametrize("bad", [{"rho": -0.1}, {"rho": float("nan")}, {"nround": 0}, {"momentum": -0.1}])
def test_bad_settings(backdoored_checkpoint, bad) -> None:
    with pytest.raises(ValueError, match=f"PAM: invalid {next(iter(bad))}=.*configs/defense/pam.yaml"):
        PAM(str(backdoored_checkpoint["path"]), **bad)
