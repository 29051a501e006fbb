"""FT-SAM: the smoothed target, the ASAM perturbation on its bound ||T^-1 xi||_2 = rho (and the best ascent
direction there), one training step = SGD with the gradient at theta + xi and BN statistics from the first pass
only, the schedule stepped per epoch, D_m only, bad settings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.checkpoint import load_attacked
from lightning_modules.defenses import FTSAM, ftsam
from lightning_modules.defenses.ftsam import asam_perturbation, smooth_cross_entropy, smoothed_targets
from tests.helpers import SmallTestSets


def run_ftsam(run_defense, path, epochs: int | None = 2, batch_size: int = 16, n_test: int | None = 32,
              noise: bool = False, model: FTSAM | None = None, **trainer_args) -> FTSAM:
    """FT-SAM (or `model`, built by the test) on D_m at SPC 10."""
    kwargs = {} if model is not None else {"save_defended": False}
    return run_defense(model or FTSAM, path, epochs=epochs, trainer=trainer_args,
                       data={"batch_size": batch_size, "n_test": n_test, "noise": noise}, **kwargs)


def test_smoothed_targets_spread_over_the_wrong_classes() -> None:
    y = torch.tensor([0, 3, 9])
    target = smoothed_targets(y, 10, 0.1)
    expected = torch.full((3, 10), 0.1 / 9)
    expected[0, 0], expected[1, 3], expected[2, 9] = 0.9, 0.9, 0.9
    torch.testing.assert_close(target, expected)
    torch.testing.assert_close(target.sum(1), torch.ones(3))
    assert torch.equal(smoothed_targets(y, 10, 0.0), F.one_hot(y, 10).float())

    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    by_hand = -(expected * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(smooth_cross_entropy(logits, y, 0.1), by_hand)
    # torch's label_smoothing spreads the mass over all K classes: a different target
    assert not torch.allclose(F.cross_entropy(logits, y, label_smoothing=0.1), by_hand)


def test_asam_perturbation_meets_its_bound() -> None:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(16, 8, generator=gen), torch.randn(8, generator=gen), torch.randn(3, 3, 3, generator=gen)]
    params[0][0, :4] = 0.0  # zero weights: T^-1 is undefined there, and xi is 0 there
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    for rho in (0.05, 2.0, 8.0):
        xi = asam_perturbation(params, grads, rho)
        assert all(e.shape == p.shape for e, p in zip(xi, params))
        assert (xi[0][0, :4] == 0).all()
        scaled = torch.cat([torch.where(p != 0, e / p.abs(), 0.0).flatten() for p, e in zip(params, xi)])
        assert float(scaled.norm()) == pytest.approx(rho, rel=1e-5)  # the ascent step lies on the bound
        # and it is the best first-order ascent in the ellipsoid: no random feasible xi' rises faster
        gain = sum((g * e).sum() for g, e in zip(grads, xi))
        for _ in range(20):
            d = [torch.randn(p.shape, generator=gen) * p.abs() for p in params]
            t_inv = torch.cat([torch.where(p != 0, v / p.abs(), 0.0).flatten() for p, v in zip(params, d)]).norm()
            d = [v * rho / t_inv for v in d]
            assert sum((g * v).sum() for g, v in zip(grads, d)) <= gain
    zero = asam_perturbation(params, [torch.zeros_like(p) for p in params], 2.0)
    assert all(torch.equal(e, torch.zeros_like(e)) for e in zero)  # a zero gradient: no perturbation, no NaN


def test_step_uses_the_perturbed_gradient_and_first_pass_bn_statistics(backdoored_checkpoint, tmp_path, run_defense,
                                                                       monkeypatch):
    """One step on the whole of D_m (no augmentation, no momentum or weight decay): theta_new = theta - lr * g(theta
    + xi) with xi on its bound, and the BN running statistics those of the first (unperturbed) pass only."""
    path = backdoored_checkpoint["path"]
    seen = []

    def recording(params, grads, rho, eps=1e-12):
        xi = asam_perturbation(params, grads, rho, eps)
        seen.append(([p.detach().clone() for p in params], xi))
        return xi

    monkeypatch.setattr(ftsam, "asam_perturbation", recording)
    lr, rho = 0.05, 2.0
    model = FTSAM(str(path), rho=rho, lr=lr, momentum=0.0, weight_decay=0.0, save_defended=False,
                  result_file=str(tmp_path / "result.json"))
    model.augment = torch.nn.Identity()
    data = SmallTestSets(spc=10, backdoored=str(path))
    data.setup()
    x, y = data.tensors("train")
    run_ftsam(run_defense, path, epochs=None, max_steps=1, batch_size=256, model=model)

    (params, xi), = seen
    scaled = torch.cat([torch.where(p != 0, e / p.abs(), 0.0).flatten() for p, e in zip(params, xi)])
    assert float(scaled.norm()) == pytest.approx(rho, rel=1e-5)

    # the same step by hand on the original network (channels_last as the model: CPU conv gradients differ by
    # ~1% between memory formats); the unperturbed gradient would be off by a factor of several
    def gradients(perturb: bool) -> list[torch.Tensor]:
        net = load_attacked(str(path)).net.train().to(memory_format=torch.channels_last)
        if perturb:
            with torch.no_grad():
                for p, e in zip(net.parameters(), xi):
                    p.add_(e)
        inputs = model.normalize(x).contiguous(memory_format=torch.channels_last)
        return torch.autograd.grad(smooth_cross_entropy(net(inputs), y, 0.1), list(net.parameters()))

    perturbed, clean = gradients(True), gradients(False)
    for (name, p), theta, g, g0 in zip(model.net.named_parameters(), params, perturbed, clean):
        step, size = p.detach() - theta, (lr * g).abs().max()
        assert (step + lr * g).abs().max() < 1e-2 * size, name
        assert (step + lr * g0).abs().max() > 0.5 * size, name
    reference = load_attacked(str(path)).net.train().to(memory_format=torch.channels_last)
    inputs = model.normalize(x).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        reference(inputs)  # the first pass's BN update: the only one the model may keep
    buffers = dict(model.net.named_buffers())
    for name, ref in reference.named_buffers():
        torch.testing.assert_close(buffers[name], ref, rtol=1e-3, atol=1e-5, msg=name)
    with torch.no_grad():  # what a second, unfrozen pass at theta + xi would have left: clearly different
        for p, e in zip(reference.parameters(), xi):
            p.add_(e)
        reference(inputs)
    leaked = dict(reference.named_buffers())
    assert max(float((buffers[n] - leaked[n]).abs().max()) for n in buffers if n.endswith("running_mean")) > 1e-2


def test_cosine_is_stepped_per_epoch(backdoored_checkpoint, tmp_path, run_defense) -> None:
    path = backdoored_checkpoint["path"]
    model = run_ftsam(run_defense, path, epochs=2, batch_size=16)  # 7 batches per epoch
    lr = model.trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.01 * (1 + math.cos(math.pi * 2 / 2)) / 2, abs=1e-12)  # 0 after 2 of 2 epochs
    model = FTSAM(str(path), cosine_t_max=4, save_defended=False, result_file=str(tmp_path / "r.json"))
    model = run_ftsam(run_defense, path, epochs=2, batch_size=16, model=model)
    lr = model.trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.01 * (1 + math.cos(math.pi * 2 / 4)) / 2)
    assert [e["epoch"] for e in model.info()["epochs"]] == [0, 1]
    assert all(e["perturbed_loss"] > e["loss"] for e in model.info()["epochs"])  # the ascent does ascend


def test_depends_on_dm_only(backdoored_checkpoint, run_defense) -> None:
    path = backdoored_checkpoint["path"]
    plain = run_ftsam(run_defense, path, n_test=None)
    swapped = run_ftsam(run_defense, path, n_test=None, noise=True)
    assert plain.result["before"]["acc"] > 0.9 and swapped.result["before"]["acc"] < 0.3  # the test sets differ
    for (key, a), b in zip(plain.net.state_dict().items(), swapped.net.state_dict().values()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("bad", [{"rho": 0.0}, {"rho": -2.0}, {"label_smoothing": 1.0}, {"label_smoothing": -0.1},
                                 {"lr": -0.01}, {"momentum": 1.0}, {"weight_decay": -5e-4}, {"cosine_t_max": 0}])
def test_bad_settings(backdoored_checkpoint, bad) -> None:
    with pytest.raises(ValueError, match="FTSAM"):
        FTSAM(str(backdoored_checkpoint["path"]), **bad)


def test_perturbed_weights_have_a_higher_loss(backdoored_checkpoint, tmp_path, run_defense, monkeypatch) -> None:
    """In a training step the loss at theta + xi (the ASAM ascent step) lies far above the loss at theta and above the
    loss at theta + a random perturbation on the same bound ||T^-1 xi||_2 = rho (same step, same batch: all of D_m)."""
    path = backdoored_checkpoint["path"]
    gen = torch.Generator().manual_seed(1)

    def random_direction(params, grads, rho, eps=1e-12):
        return asam_perturbation(params, [torch.randn(p.shape, generator=gen) for p in params], rho, eps)

    losses = {}
    for kind in ("ascent", "random"):
        if kind == "random":
            monkeypatch.setattr(ftsam, "asam_perturbation", random_direction)
        model = FTSAM(str(path), save_defended=False, result_file=str(tmp_path / f"{kind}.json"))
        model.augment = torch.nn.Identity()
        model = run_ftsam(run_defense, path, epochs=None, max_steps=1, batch_size=256, model=model)
        (epoch,) = model.info()["epochs"]
        losses[kind] = epoch["perturbed_loss"]
        losses["clean"] = epoch["loss"]
    assert losses["ascent"] > losses["clean"] + 0.5 and losses["ascent"] > losses["random"] + 0.5, losses


def test_lowers_asr_on_the_planted_backdoor(backdoored_checkpoint, run_defense) -> None:
    """The fine-tuning family works on the fixture: 5 epochs of FT-SAM (35 steps) take ASR from 0.97 to 0.03 (plain FT
    or FT-SAM without the ascent: about 0.12) at a clean accuracy above 0.8."""
    result = run_ftsam(run_defense, backdoored_checkpoint["path"], epochs=5, batch_size=16, n_test=None).result
    assert result["before"]["asr"] > 0.9
    assert result["after"]["asr"] < 0.08 and result["after"]["acc"] > 0.75, result["after"]
