"""BTI-DBF(U): the generator's outputs are valid pixels; the feature layer is the classifier head's input on every
backbone; the mask step keeps the label on the masked features and takes it from the complement; the generator step's
two branches and its direction (the complement features move, the image stays within its bound); the target
detection; the unlearning batch and its effect (CE on G(x) with true labels falls); D_m only; bad settings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datamodules.checkpoint import load_attacked
from lightning_modules.defenses import BTIDBFU
from lightning_modules.defenses.btidbfu import (
    UNet,
    at_features,
    bounded_mask,
    detect_target,
    feature_input,
    generator_loss,
    image_mse,
    mask_loss,
    replaced_count,
)
from tests.helpers import TEST_WIDTH, assert_ignores_test_sets, dm_images

# one round of one epoch per stage, a 4-filter 2-stage generator
TINY = {"preround": 1, "nround": 1, "mround": 1, "uround": 1, "ul_round": 1, "generator_filters": 4,
        "generator_blocks": 2}


def frozen_fixture(path):
    """The fixture's network (eval, no gradients), a pixels -> logits function, its input std, D_m in 0..1."""
    run = load_attacked(str(path))
    net = run.net.eval().requires_grad_(False)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (run.spec.mean, run.spec.std))
    x, y = dm_images(path)
    return net, (lambda z: net((z - mean) / std)), std, x, y


class Shift(nn.Module):
    """A stand-in generator: x + delta, clamped to valid pixels."""

    def __init__(self, delta: torch.Tensor) -> None:
        super().__init__()
        self.delta = nn.Parameter(delta.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.delta).clamp(0, 1)


def test_generator_outputs_valid_pixels() -> None:
    g = UNet(3, 4, 2)
    with torch.no_grad():
        for p in g.parameters():
            p.mul_(50)  # saturating weights
    x = torch.cat([torch.rand(2, 3, 32, 32), torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32)])
    for inputs in (x, 10 * x - 5):  # the target detection feeds x + noise, outside [0, 1]
        out = g(inputs)
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert UNet(3, 32, 4)(torch.rand(1, 3, 32, 32)).shape == (1, 3, 32, 32)  # the default G on 32 px


@pytest.mark.parametrize("backbone, expected", [("small_cnn", "linear"), ("preact_resnet18", "linear"),
                                                ("vgg19_bn", "classifier"), ("efficientnet_b3", "classifier"),
                                                ("mobilenet_v3_large", "classifier")])
def test_feature_layer_is_the_heads_input(backbone: str, expected: str) -> None:
    net = TEST_WIDTH[backbone](10).eval()
    layer = feature_input(net, net.layer_roles.head[0])
    assert layer == expected  # EfficientNet: the classifier's input, before its dropout
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        with at_features(net, layer) as store:
            logits = net(x)
        with at_features(net, layer, lambda f: torch.cat([f, torch.zeros_like(f)])):
            doubled = net(x)  # the head is per-sample: edited features of twice the batch, twice the logits
    head = net.get_submodule(net.layer_roles.head[0])
    assert store["features"].shape == (2, head.in_features) and doubled.shape == (4, 10)
    torch.testing.assert_close(doubled[:2], logits)


def test_mask_keeps_the_label_on_the_masked_features(backdoored_checkpoint) -> None:
    """Mask steps (Adam 0.05, batch 25) lower the masked features' CE and raise the complement's; afterwards the head
    still classifies D_m from the masked features and no longer from the complement."""
    net, classify, _, x, y = frozen_fixture(backdoored_checkpoint["path"])
    raw = torch.randn(net.linear.in_features, requires_grad=True)
    optimizer = torch.optim.Adam([raw], lr=0.05)

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            _, terms = mask_loss(classify, net, "linear", bounded_mask(raw), x, y)
            with at_features(net, "linear", lambda f: torch.cat([bounded_mask(raw) * f, (1 - bounded_mask(raw)) * f])):
                masked, complement = (classify(x).argmax(1).view(2, -1) == y).float().mean(1).tolist()
        return {k: float(v) for k, v in terms.items()} | {"masked_acc": masked, "complement_acc": complement}

    before = evaluate()
    for _ in range(9):
        for xb, yb in zip(x.split(25), y.split(25)):
            loss, _ = mask_loss(classify, net, "linear", bounded_mask(raw), xb, yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    after = evaluate()
    mask = bounded_mask(raw)
    assert mask.min() >= 0 and mask.max() <= 1
    assert after["ce_masked"] < before["ce_masked"] - 0.2 and after["ce_complement"] > before["ce_complement"] + 0.5
    assert after["masked_acc"] > 0.9 and after["complement_acc"] < min(0.65, before["complement_acc"] - 0.3), after


def test_generator_loss_branches(backdoored_checkpoint) -> None:
    """Beyond the image bound only the image MSE counts; within it -backdoor + 0.01 benign; the target adds its CE."""
    net, classify, std, x, _ = frozen_fixture(backdoored_checkpoint["path"])
    x = x[:16]
    mask = bounded_mask(torch.randn(net.linear.in_features))
    far, near = Shift(torch.full_like(x[:1], 0.8)), Shift(0.02 * torch.randn_like(x[:1]))
    args = (classify, net, "linear")
    loss, terms = generator_loss(*args, far, mask, x, std, 0.3, 3.0, 0.01)
    assert terms["image_mse"] > 0.3 and terms["bounded"] == 1 and torch.equal(loss, terms["image_mse"])
    loss, terms = generator_loss(*args, near, mask, x, std, 0.3, 3.0, 0.01)
    assert terms["image_mse"] < 0.3 and terms["bounded"] == 0
    torch.testing.assert_close(loss, 0.01 * terms["benign_mse"] - terms["backdoor_mse"])
    torch.testing.assert_close(image_mse(near(x), x, std), ((near(x) - x) / std).pow(2).mean())
    with_target, _ = generator_loss(*args, near, mask, x, std, 0.3, 3.0, 0.01, target=3)
    expected = F.cross_entropy(classify(near(x)), torch.full((16,), 3))
    torch.testing.assert_close(with_target - loss, expected, rtol=1e-4, atol=1e-5)
    loss, terms = generator_loss(*args, near, mask, x, std, 0.3, 1e-12, 0.01)  # the feature bound binds too
    assert terms["bounded"] == 1 and torch.equal(loss, terms["image_mse"])


def test_generator_step_changes_the_complement_within_the_bound(backdoored_checkpoint) -> None:
    """G trained on its loss (from near the identity) moves the complement features away from x's, within the image
    bound."""
    net, classify, std, x, _ = frozen_fixture(backdoored_checkpoint["path"])
    x = x[:16]
    mask = bounded_mask(3 * torch.randn(net.linear.in_features))  # mostly near 0 or 1
    g = Shift(0.01 * torch.randn_like(x[:1]))
    optimizer = torch.optim.Adam(g.parameters(), lr=0.01)
    _, start = generator_loss(classify, net, "linear", g, mask, x, std, 0.3, 3.0, 0.01)
    for _ in range(16):
        loss, _ = generator_loss(classify, net, "linear", g, mask, x, std, 0.3, 3.0, 0.01)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        _, end = generator_loss(classify, net, "linear", g, mask, x, std, 0.3, 3.0, 0.01)
    assert end["backdoor_mse"] > 100 * start["backdoor_mse"] and end["backdoor_mse"] > 0.1, (start, end)
    assert end["image_mse"] < 0.3, end


def test_target_detection_counts_predictions_on_noisy_generated_images() -> None:
    seen = []

    def generator(z: torch.Tensor) -> torch.Tensor:
        seen.append(z)
        return torch.ones_like(z)

    def classify(z: torch.Tensor) -> torch.Tensor:  # class 3 for bright images, else class 0
        return F.one_hot(torch.where(z.mean((1, 2, 3)) > 0.5, 3, 0), 10).float()

    x = torch.zeros(10, 3, 8, 8)
    counts = detect_target(classify, generator, x, torch.full((1, 3, 1, 1), 0.03), 10, batch_size=4)
    assert counts.tolist() == [0, 0, 0, 10, 0, 0, 0, 0, 0, 0] and [len(z) for z in seen] == [4, 4, 2]
    assert float(torch.cat(seen).std()) == pytest.approx(0.03, rel=0.1)  # G sees x + 0.03 N(0, 1)


def test_replaced_count_is_the_references() -> None:
    assert [replaced_count(b, 0.1) for b in (128, 16, 9, 1)] == [13, 2, 1, 1]
    assert [replaced_count(b, 0.2) for b in (128, 16, 5)] == [26, 4, 2]
    assert replaced_count(10, 0.95) == 10 and replaced_count(4, 0.0) == 1


def test_unlearning_lowers_the_loss_on_generated_images(backdoored_checkpoint, run_defense) -> None:
    """Three unlearning epochs (half of each batch generated, Adam 1e-3) lower CE(G(x), true label) on D_m; each
    batch has exactly replaced_count images replaced by G(x), the others untouched."""
    path = backdoored_checkpoint["path"]
    d = run_defense(BTIDBFU, path, epochs=3, save_defended=False, data={"batch_size": 16},
                    **TINY | {"ul_round": 3, "poison_fraction": 0.5, "lr": 1e-3})
    info = d.info()
    assert [e["epoch"] for e in info["unlearn"]] == [0, 1, 2] and len(info["rounds"]) == 1
    assert info["feature_layer"] == "linear" and 0 <= info["detected_target"] < 10
    assert 0 <= info["rounds"][0]["mask"]["mean"] <= 1 and len(info["pretrain"]) == 1

    # the train-mode passes alone move the BN statistics towards G(x): the control has the original weights with the
    # defended model's BN statistics, so that only the unlearning steps separate it from the defended model
    generator = d.generator
    x, y = dm_images(path)
    original, control = load_attacked(str(path)).net.eval(), load_attacked(str(path)).net.eval()
    buffers = dict(d.net.named_buffers())
    for name, buffer in control.named_buffers():
        buffer.copy_(buffers[name])
    d.net.eval()
    with torch.no_grad():
        gx = generator(x)
        original, control, defended = (F.cross_entropy(net(d.normalize(gx)), y) for net in (original, control, d.net))
    assert defended < control - 0.3 and defended < original, (original, control, defended)

    clean = x[:16]
    mixed = d.reversed_batch(clean)
    replaced = (mixed != clean).flatten(1).any(1)
    assert int(replaced.sum()) == replaced_count(16, 0.5) == 9
    torch.testing.assert_close(mixed[replaced], generator(clean[replaced]))


def test_depends_on_dm_only(backdoored_checkpoint, tmp_path) -> None:
    path = backdoored_checkpoint["path"]
    assert_ignores_test_sets(lambda root: BTIDBFU(str(path), **TINY, save_defended=False,
                                                  result_file=str(root / "result.json")), path, tmp_path)


@pytest.mark.parametrize("bad", [{"nround": 0}, {"preround": -1}, {"mround": 0}, {"uround": 0}, {"ul_round": 0},
                                 {"generator_filters": 0}, {"generator_blocks": 5}, {"generator_lr": 0.0},
                                 {"mask_lr": -1.0}, {"norm_bound": 0.0}, {"feat_bound": float("inf")},
                                 {"poison_fraction": 1.0}, {"feature_weight": -1.0}, {"optimizer": "lbfgs"},
                                 {"lr": 0.0}, {"momentum": 1.0}, {"noise": -0.03}])
def test_bad_settings(backdoored_checkpoint, bad) -> None:
    with pytest.raises(ValueError, match=f"BTIDBFU: invalid {next(iter(bad))}="):
        BTIDBFU(str(backdoored_checkpoint["path"]), **bad)


def test_bad_layer_and_epochs(backdoored_checkpoint, run_defense) -> None:
    path = backdoored_checkpoint["path"]
    with pytest.raises(ValueError, match="no module 'head'"):
        BTIDBFU(str(path), feature_layer="head")
    with pytest.raises(ValueError, match=r"max_epochs \(2\) must be nround x ul_round"):
        run_defense(BTIDBFU, path, epochs=2, save_defended=False, **TINY)
