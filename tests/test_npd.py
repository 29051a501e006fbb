"""NPD: the polarizer starts as the identity, is the only thing that trains, and comes back with the defended
checkpoint; perturbations stay in the L2 ball; bad settings fail clearly."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.checkpoint import load_attacked
from lightning_modules.defenses import NPD, load_defended
from tests.helpers import dm_images


def run_npd(run_defense, path, epochs: int = 3, root=None, **kwargs) -> NPD:
    return run_defense(NPD, path, root=root, epochs=epochs, data={"spc": 3}, **{"warmup_epochs": 1, **kwargs})


def images(n: int = 8, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_polarizer_starts_as_identity(backdoored_checkpoint) -> None:
    path = str(backdoored_checkpoint["path"])
    model = NPD(path).eval()
    original = load_attacked(path).classifier.eval()
    conv, bn = model.polarizer
    assert torch.equal(conv.weight.flatten(1), torch.eye(conv.in_channels))
    # equal up to the BN's 1 / sqrt(1 + eps) = 1 - 5e-6 (default running statistics)
    torch.testing.assert_close(model(images()), original(images()), rtol=1e-4, atol=1e-4)
    assert model.polarizer[0].in_channels == dict(model.net.named_modules())["features.14"].in_channels


def test_only_the_polarizer_trains_and_the_checkpoint_restores_it(backdoored_checkpoint, tmp_path,
                                                                  run_defense) -> None:
    path = str(backdoored_checkpoint["path"])
    model = run_npd(run_defense, path, root=tmp_path)
    assert [e["phase"] for e in model.info()["epochs"]] == ["warmup", "npd", "npd"]
    original = load_attacked(path).net.state_dict()
    defended = model.net.state_dict()
    assert defended.keys() == original.keys()  # the net's own names are unchanged
    for key, value in original.items():
        assert torch.equal(defended[key], value), key
    fresh = NPD(path).polarizer.state_dict()
    changed = [k for k, v in model.polarizer.state_dict().items() if not torch.equal(v, fresh[k])]
    assert {"0.weight", "1.weight", "1.bias", "1.running_mean"} <= set(changed)

    reloaded = load_defended(tmp_path / "checkpoints" / "last.ckpt")
    for key, value in model.polarizer.state_dict().items():
        assert torch.equal(reloaded.polarizer.state_dict()[key], value), key
    x = images()
    torch.testing.assert_close(reloaded(x), model.eval()(x))
    assert not torch.allclose(reloaded(x), load_attacked(path).classifier.eval()(x))  # the polarizer acts


@pytest.mark.parametrize("radius,signed", [(3.0, True), (0.5, True), (5.0, False)])
def test_perturbation_stays_in_the_l2_ball(backdoored_checkpoint, radius, signed) -> None:
    model = NPD(str(backdoored_checkpoint["path"]), radius=radius, signed_steps=signed,
                attack_step_size=0.1 if signed else 500.0).eval()
    x = images(16).float() / 255
    target = (model(x).argmax(1) + 1) % 10
    x_adv = model.perturb(x, target)
    norms = (x_adv - x).flatten(1).norm(dim=1)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (norms <= radius * (1 + 1e-5)).all() and (norms > 0.1 * radius).all()
    # a signed step of 0.1 (norm 5.5 at 32 px) is scaled onto the sphere; the clamp to [0, 1] only shortens it
    if signed:
        assert norms.max() > 0.5 * radius


def test_stop_once_the_batch_hits_the_target(backdoored_checkpoint) -> None:
    model = NPD(str(backdoored_checkpoint["path"]), attack_steps=2).eval()
    x = images(16).float() / 255
    one = NPD(str(backdoored_checkpoint["path"]), attack_steps=1).eval()
    one.polarizer.load_state_dict(model.polarizer.state_dict())
    target = model(x).argmax(1)  # already hit by every image: the second step must not move
    torch.testing.assert_close(model.perturb(x, target), one.perturb(x, target))


@pytest.mark.parametrize("bad", [{"radius": -1.0}, {"lr": 0.0}, {"warmup_lr": -1e-4}, {"attack_steps": 0},
                                 {"stop_fraction": 1.5}, {"loss_weights": (1.0, -0.4, 0.4, 0.4)}, {"bce_offset": -1e-4},
                                 {"layers": {"VGG19BN": "features.49"}}, {"layers": {"SmallCNN": "features.15"}},
                                 {"layers": {"SmallCNN": "no.such"}}])
def test_bad_settings(backdoored_checkpoint, bad) -> None:
    with pytest.raises(ValueError, match="NPD|SmallCNN"):
        NPD(str(backdoored_checkpoint["path"]), **bad)


def test_max_epochs_must_exceed_warmup(backdoored_checkpoint, run_defense) -> None:
    with pytest.raises(ValueError, match="warm-up"):
        run_npd(run_defense, backdoored_checkpoint["path"], epochs=2, warmup_epochs=2)


def test_perturbation_moves_toward_the_target(backdoored_checkpoint) -> None:
    """The targeted perturbation descends CE(x~, y~): on D_m it sends most images to y~ (their highest non-true class),
    which neither the clean images nor a random perturbation of the same L2 norm do; a step away from y~ would not."""
    import torch.nn.functional as F

    from lightning_modules.defenses.npd import top_other

    path = str(backdoored_checkpoint["path"])
    x, y = dm_images(path)
    model = NPD(path).eval()
    with torch.no_grad():
        target = top_other(model(x), y)
    x_adv = model.perturb(x, target)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    norms = (x_adv - x).flatten(1).norm(dim=1) / noise.flatten(1).norm(dim=1)
    x_random = (x + noise * norms.view(-1, 1, 1, 1)).clamp(0, 1)
    with torch.no_grad():
        hits = {k: float((model(v).argmax(1) == target).float().mean()) for k, v in
                (("clean", x), ("random", x_random), ("searched", x_adv))}
        ce = {k: float(F.cross_entropy(model(v), target)) for k, v in (("clean", x), ("searched", x_adv))}
    assert hits["searched"] > 0.5 and hits["searched"] > hits["random"] + 0.4 and hits["clean"] < 0.05, hits
    assert ce["searched"] < ce["clean"] - 1.5, ce


@pytest.mark.parametrize("offset", [1e-4, 0.0])
def test_loss_terms_labels_and_weights(backdoored_checkpoint, offset) -> None:
    """NPD's outer loss recomputed from its definition: CE(x, y), CE(x~, y_hat) with y_hat the prediction on x, and
    -log(offset + 1 - s) of x~ at its top non-true class and at y~ (the top non-true class on x), weighted in that
    order. Random images and labels, so that y_hat != y, and four different weights, so that a swap shows."""
    weights = (0.3, 0.7, 1.1, 1.9)
    model = NPD(str(backdoored_checkpoint["path"]), loss_weights=weights, bce_offset=offset).eval()
    x = images(16).float() / 255
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    loss, terms = model.npd_loss(x, y)
    with torch.no_grad():
        logits = model(x).double()
        y_hat = logits.argmax(1)
        assert (y_hat != y).float().mean() > 0.5
        rows = torch.arange(len(y))

        def top_non_true(z: torch.Tensor) -> torch.Tensor:
            z = z.clone()
            z[rows, y] = -torch.inf
            return z.argmax(1)

        y_tilde = top_non_true(logits)
        adv = model(model.perturb(x, y_tilde)).double()
        p = adv.softmax(1)
        expected = {
            "ce_clean": torch.nn.functional.cross_entropy(logits, y),
            "ce_adv": torch.nn.functional.cross_entropy(adv, y_hat),
            # 1 - s as the sum of the other classes' probabilities: 1 - p rounds to 0 (log: inf) when s ~ 1
            "bce_top_other": -(offset + p.scatter(1, top_non_true(adv)[:, None], 0).sum(1)).log().mean(),
            "bce_target": -(offset + p.scatter(1, y_tilde[:, None], 0).sum(1)).log().mean(),
        }
    for key, value in expected.items():
        assert float(terms[key].detach()) == pytest.approx(float(value), rel=1e-4, abs=1e-6), key
    total = sum(w * float(v) for w, v in zip(weights, expected.values()))
    assert float(loss.detach()) == pytest.approx(total, rel=1e-4)
    assert float(terms["adv_hits_target"]) == pytest.approx(float((adv.argmax(1) == y_tilde).float().mean()))


def test_the_default_bce_is_the_authors_bounded_one(backdoored_checkpoint) -> None:
    """-log(1.0001 - s), as the authors' code: at most -log(1e-4) and a vanishing gradient when the model is sure of
    the class; the exact form grows with the logit gap and keeps a gradient of ~1 (it diverged on SmallCNN at SPC
    100). Both the constructor's and configs/defense/npd.yaml's default are the bounded one."""
    import yaml

    from lightning_modules.defenses.npd import neg_log_one_minus_softmax

    assert NPD(str(backdoored_checkpoint["path"])).hparams.bce_offset == 1e-4
    with open("configs/defense/npd.yaml") as f:
        assert yaml.safe_load(f)["model"]["init_args"]["bce_offset"] == 1e-4
    logits = torch.tensor([[40.0, 0.0, 1.0], [2.0, 0.5, 0.0]], requires_grad=True)
    k = torch.tensor([0, 0])
    bounded, exact = (neg_log_one_minus_softmax(logits, k, offset) for offset in (1e-4, 0.0))
    assert bounded[0].item() <= -torch.log(torch.tensor(1e-4)) + 1e-3 and exact[0].item() > 38
    torch.testing.assert_close(bounded[1], exact[1], rtol=1e-3, atol=0)  # the same away from saturation
    (grad_bounded,) = torch.autograd.grad(bounded[0], logits)
    (grad_exact,) = torch.autograd.grad(exact[0], logits)
    assert grad_bounded.abs().max() < 1e-3 and grad_exact[0, 0] > 0.99
