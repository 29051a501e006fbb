"""FMP: the signed-gradient step ascends each channel's feature-map MSE (batched = one channel at a time), the
perturbation stays within eps of its start and 2 eps of the image in [0, 1], floor(C / k) least robust channels are
zeroed per conv (with the BN fed by it), fine-tuning trains all weights with no mask, D_m only, bad settings."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_modules.checkpoint import load_attacked
from lightning_modules.defenses import FMP, fmp
from lightning_modules.defenses.fmp import (
    conv_layers,
    conv_output,
    following_bns,
    least_robust,
    perturb_channels,
)
from tests.helpers import assert_ignores_test_sets, dm_images

EPS = 1 / 255


def run_fmp(run_defense, path, epochs: int = 0, root=None, data: dict | None = None, **kwargs) -> FMP:
    """FMP on D_m at SPC 10 with 8 rating images (32 in the fork) and 1 pruned channel per 16 (64 in the fork)."""
    args = {"adv_dataset_size": 8, "prune_every": 16, "save_defended": False, **kwargs}
    return run_defense(FMP, path, root=root, epochs=epochs, data={"batch_size": 64, **(data or {})}, **args)


def channel_mse(forward, conv, images, clean) -> torch.Tensor:
    """Per replica j of images (k, N, ...): the MSE of `conv`'s channel j between those images and `clean`."""
    with torch.no_grad():
        out = torch.stack([conv_output(forward, conv, x)[:, j] for j, x in enumerate(images)])
    return (out.float() - clean.float()[:, : len(images)].transpose(0, 1)).pow(2).mean(dim=(1, 2, 3))


def test_step_ascends_each_channel_mse_and_matches_one_channel_at_a_time(backdoored_checkpoint) -> None:
    path = backdoored_checkpoint["path"]
    model = FMP(str(path), save_defended=False)
    net = model.net.eval()

    def forward(images):
        return model.classify(images, net)

    x = dm_images(path)[0][:8]
    start = (x + EPS * torch.empty_like(x).uniform_(-EPS, EPS).sign()).clamp(0, 1)
    for name, conv in conv_layers(net)[::4]:  # features.0 (16 channels, linear in x) and features.14 (64)
        with torch.no_grad():
            clean = conv_output(forward, conv, x)
        channels = torch.arange(conv.out_channels)
        adv = perturb_channels(forward, conv, start, clean, channels, EPS)
        # the step for each channel alone, by hand, and the opposite (descent) step
        grads = []
        for c in channels:
            probe = start.clone().requires_grad_(True)
            mse = (conv_output(forward, conv, probe)[:, c].float() - clean[:, c].float()).pow(2).mean()
            grads.append(torch.autograd.grad(mse, probe)[0].sign())
        ascent = torch.stack([(start + EPS * g).clamp(0, 1) for g in grads])
        descent = torch.stack([(start - EPS * g).clamp(0, 1) for g in grads])
        before = channel_mse(forward, conv, start[None].expand(len(channels), *start.shape), clean)
        after, opposite = (channel_mse(forward, conv, z, clean) for z in (adv, descent))
        # every channel's MSE rises, by much, and above what the opposite step gives (signed steps overshoot, so
        # deep channels' MSE can rise under a descent step too)
        assert (after > before).all() and float((after / before).median()) > 2, (name, before, after)
        assert (after > 1.2 * opposite).all(), (name, after, opposite)
        # replica j is exactly channel j's own step (the replicas do not interact)
        torch.testing.assert_close(adv, ascent)


def test_perturbations_stay_within_eps_in_pixel_space(backdoored_checkpoint, run_defense, monkeypatch) -> None:
    """The random start is x +- eps, the step +- eps from it (0 where the gradient is 0), both clamped to [0, 1]
    on the pixel scale (the fork clamps the normalised inputs)."""
    seen = []
    accuracy = fmp.replica_accuracy

    def spy(forward, images, y):
        seen.append(images.detach().clone())
        return accuracy(forward, images, y)

    monkeypatch.setattr(fmp, "replica_accuracy", spy)
    run_fmp(run_defense, backdoored_checkpoint["path"], prune_every=32)  # rates features.7, .10 and .14
    *adv, (x,), (start,) = seen  # the rated replicas, then the clean and the random-start images
    assert [a.shape[:2] for a in adv] == [(32, 8), (32, 8), (64, 8)]
    assert 0 <= float(x.min()) and float(x.max()) <= 1 and ((x == 0) | (x == 1)).float().mean() > 0.3  # clamps bind
    jump = (start - x).abs()
    assert float(jump.max()) <= EPS + 1e-6 and ((jump - EPS).abs() < 1e-6).float().mean() > 0.5
    for a in adv:
        assert 0 <= float(a.min()) and float(a.max()) <= 1
        step = (a - start).abs()
        assert float(step.max()) <= EPS + 1e-6 and ((step - EPS).abs() < 1e-6).float().mean() > 0.3
        assert float((a - x).abs().max()) <= 2 * EPS + 1e-6


def test_least_robust_breaks_ties_by_channel_index() -> None:
    acc = torch.tensor([0.5, 0.25, 1.0, 0.25, 0.5, 0.0, 0.75, 0.25])
    assert least_robust(acc, 4).tolist() == [5, 1]
    assert least_robust(acc, 2).tolist() == [5, 1, 3, 7]
    assert least_robust(acc, 9).tolist() == []  # fewer channels than prune_every: none


def test_prunes_the_least_robust_channels_of_each_conv(backdoored_checkpoint, run_defense, monkeypatch) -> None:
    """Accuracies chosen here (with ties) in place of the measured ones: each conv loses exactly floor(C / k) channels,
    those with the lowest accuracy, in its weights and its BN's; nothing else changes before fine-tuning."""
    gen = torch.Generator().manual_seed(3)
    fake: dict[str, torch.Tensor] = {}
    names: dict[int, str] = {}
    pending = []
    prepare, perturb, accuracy = FMP.prepare, fmp.perturb_channels, fmp.replica_accuracy

    def spy_prepare(self):
        names.update({id(m): n for n, m in self.net.named_modules()})
        prepare(self)

    def spy_perturb(forward, conv, start, clean, channels, eps):
        pending.append((names[id(conv)], conv.out_channels, channels))
        return perturb(forward, conv, start, clean, channels, eps)

    def spy_accuracy(forward, images, y):
        if not pending:  # the clean and random-start accuracies
            return accuracy(forward, images, y)
        name, count, channels = pending.pop()
        values = fake.setdefault(name, torch.randint(0, 5, (count,), generator=gen) / 4)
        return values[channels]

    monkeypatch.setattr(FMP, "prepare", spy_prepare)
    monkeypatch.setattr(fmp, "perturb_channels", spy_perturb)
    monkeypatch.setattr(fmp, "replica_accuracy", spy_accuracy)
    model = run_fmp(run_defense, backdoored_checkpoint["path"], prune_every=8, adv_batch_size=24)  # 3 channels/pass
    info = model.info()
    original = load_attacked(str(backdoored_checkpoint["path"])).net.state_dict()
    state = model.net.state_dict()
    convs = [n for n, _ in conv_layers(model.net)]
    assert list(info["layers"]) == convs == list(fake)  # every conv (16 to 64 channels) rated, in module order
    expected = {}
    for name in convs:
        layer, values = info["layers"][name], fake[name]
        assert layer["channels"] == len(values) and layer["rated"]
        expected[name] = torch.argsort(values, stable=True)[: len(values) // 8]
        assert layer["pruned"] == expected[name].tolist() and len(layer["pruned"]) == len(values) // 8
        assert layer["pruned_acc"] == values[expected[name]].tolist()
        assert max(layer["pruned_acc"]) <= layer["kept_min_acc"]
    bns = {name: info["layers"][name]["bn"] for name in convs}
    assert all(bns[name] for name in convs) and sorted(bns.values()) == info["bn_zeroed"]  # conv -> BN everywhere
    assert info["pruned_total"] == sum(len(v) for v in expected.values()) == 2 + 2 + 4 + 4 + 8
    zeroed = {f"{n}.weight": idx for n, idx in expected.items()}
    zeroed |= {f"{bns[n]}.{p}": idx for n, idx in expected.items() for p in ("weight", "bias")}
    for key, value in original.items():
        if key in zeroed:
            keep = torch.ones(len(value), dtype=torch.bool)
            keep[zeroed[key]] = False
            assert (state[key][zeroed[key]] == 0).all() and (value[zeroed[key]] != 0).all(), key
            assert torch.equal(state[key][keep], value[keep]), key
        else:
            assert torch.equal(state[key], value), key  # eval-mode rating: BN running statistics untouched


def test_following_bn_is_the_next_module_that_normalises_the_conv(backbone_checkpoint) -> None:
    model = FMP(str(backbone_checkpoint("preact_resnet18")), save_defended=False)
    net = model.net.eval()
    bns = following_bns(net, lambda z: model.classify(z, net), torch.rand(1, 3, 32, 32))
    assert bns["layer1.0.conv1"] == "layer1.0.bn2" and bns["layer2.0.conv1"] == "layer2.0.bn2"
    # the stem, each block's conv2 and 1x1 shortcut feed a sum or a block, not a BN right after them: conv only
    assert bns["conv1"] is None and bns["layer1.0.conv2"] is None and bns["layer2.0.shortcut.0"] is None
    assert sum(v is not None for v in bns.values()) == 8

    class Odd(nn.Module):  # a BN after conv `a` in module order that normalises conv `b`'s output
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bn, self.b = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

        def forward(self, z):
            return self.bn(self.b(self.a(z)))

    odd = Odd().eval()
    assert following_bns(odd, odd, torch.rand(1, 3, 4, 4)) == {"a": None, "b": None}


def test_fine_tuning_trains_all_weights_without_a_mask(backdoored_checkpoint, backbone_checkpoint,
                                                       run_defense) -> None:
    model = run_fmp(run_defense, backdoored_checkpoint["path"], epochs=2, prune_every=64, adv_dataset_size=4)
    info = model.info()
    (name,) = [n for n, layer in info["layers"].items() if layer["rated"]]  # features.14, 64 channels: 1 pruned
    (channel,) = info["layers"][name]["pruned"]
    modules = dict(model.net.named_modules())
    conv, bn = modules[name], modules[info["layers"][name]["bn"]]
    # no mask, yet a pruned conv -> BN -> ReLU channel stays 0: the BN sees a constant 0 channel (no gradient to its
    # weight), its weight 0 blocks the gradient to the conv, and ReLU'(0) = 0 that to its bias
    assert bn.bias[channel] == 0 and bn.weight[channel] == 0 and (conv.weight[channel] == 0).all()
    original = load_attacked(str(backdoored_checkpoint["path"])).net.state_dict()
    assert all(not torch.equal(p.detach(), original[n]) for n, p in model.net.named_parameters())
    optimizer = model.trainer.optimizers[0]
    assert optimizer.defaults["weight_decay"] == 0 and optimizer.defaults["momentum"] == 0.9
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # cosine from 0.01 to eta_min over the 2 epochs
    assert 0 <= info["dm_acc_pruned"] <= 1 and info["images"] == 4 and math.isfinite(info["clean_acc"])

    # a conv not followed by a BN (PreAct's conv2, summed with the skip): its zeroed weights regrow
    model = run_fmp(run_defense, backbone_checkpoint("preact_resnet18"), epochs=1, prune_every=64,
                    adv_dataset_size=1)
    layer = model.info()["layers"]["layer4.1.conv2"]
    assert layer["bn"] is None and len(layer["pruned"]) == 1
    assert model.net.get_submodule("layer4.1.conv2").weight[layer["pruned"][0]].abs().sum() > 0


def test_depends_on_dm_only(backdoored_checkpoint, tmp_path) -> None:
    path = backdoored_checkpoint["path"]

    def make(root):
        return FMP(str(path), adv_dataset_size=4, prune_every=32, save_defended=False,
                   result_file=str(root / "result.json"))

    plain, swapped = assert_ignores_test_sets(make, path, tmp_path, epochs=1, batch_size=64)
    assert plain.info()["layers"] == swapped.info()["layers"] and plain.info()["pruned_total"] == 4  # 1 + 1 + 2


@pytest.mark.parametrize("bad", [{"adv_dataset_size": 0}, {"eps": 0.0}, {"eps": 2.0}, {"eps": math.nan},
                                 {"prune_every": 0}, {"adv_batch_size": 0}, {"lr": 0.0}, {"momentum": 1.0},
                                 {"weight_decay": -1e-4}, {"eta_min": 0.1}, {"eta_min": -1e-4}])
def test_bad_settings(backdoored_checkpoint, bad) -> None:
    with pytest.raises(ValueError, match=f"FMP: invalid {next(iter(bad))}="):
        FMP(str(backdoored_checkpoint["path"]), **bad)
