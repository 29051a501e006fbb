"""BNP: the KL of hand-built BN statistics against the closed form, the per-layer outlier rule, pruned
channels that output exactly 0 after reloading, and a choice made from D_m alone."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from torch import nn
from torch.distributions import Normal, kl_divergence

from datamodules.mitigation import MitigationDataModule
from lightning_modules.defenses import BNP, Defense, load_defended
from lightning_modules.defenses.bnp import bn_divergences, bn_input_statistics, outlier_channels
from lightning_modules.defenses.pruning import bn_layers
from tests.conftest import CONFIGS
from tests.helpers import SmallTestSets


def hand_built_bn(mean: torch.Tensor, var: torch.Tensor) -> nn.Sequential:
    bn = nn.BatchNorm2d(len(mean)).eval()
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    return nn.Sequential(bn)


def images_with(mean: torch.Tensor, std: torch.Tensor, n: int = 64, size: int = 6) -> torch.Tensor:
    """Random (n, C, size, size) data whose per-channel mean and population std are exactly `mean`, `std`."""
    z = torch.randn(n, len(mean), size, size, dtype=torch.float64)
    z = (z - z.mean((0, 2, 3), keepdim=True)) / z.std((0, 2, 3), correction=0, keepdim=True)
    return (z * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)).float()


def test_kl_matches_closed_form() -> None:
    run_mean, run_var = torch.tensor([0.0, 1.0, -2.0, 0.5]), torch.tensor([1.0, 4.0, 0.25, 2.0])
    clean_mean, clean_std = torch.tensor([0.3, 1.0, -1.0, 3.0]), torch.tensor([1.0, 0.5, 1.5, 2.0])
    net = hand_built_bn(run_mean, run_var)
    x = images_with(clean_mean, clean_std)
    stats = bn_input_statistics(net, [x[:23], x[23:40], x[40:]])  # uneven batches merge exactly
    mu, var = stats["0"]
    torch.testing.assert_close(mu, clean_mean.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(var, clean_std.double() ** 2, atol=1e-5, rtol=1e-5)

    eps = net[0].eps
    vp, vq = clean_std.double() ** 2 + eps, run_var.double() + eps
    closed = torch.log(vq.sqrt() / vp.sqrt()) + (vp + (clean_mean.double() - run_mean.double()) ** 2) / (2 * vq) - 0.5
    kl = bn_divergences(net, stats, "kl")["0"]
    torch.testing.assert_close(kl, closed, atol=1e-6, rtol=1e-6)
    reference = kl_divergence(Normal(clean_mean.double(), vp.sqrt()), Normal(run_mean.double(), vq.sqrt()))
    torch.testing.assert_close(kl, reference, atol=1e-6, rtol=1e-6)
    # BackdoorBench's variant writes log(var ratio): the exact KL plus another 0.5 * log(var_q / var_p)
    doubled = bn_divergences(net, stats, "backdoorbench")["0"]
    torch.testing.assert_close(doubled, closed + 0.5 * torch.log(vq / vp), atol=1e-6, rtol=1e-6)
    assert kl[1] != doubled[1]


def test_dead_channel_is_finite_and_outlier_rule() -> None:
    net = hand_built_bn(torch.zeros(3), torch.ones(3))
    x = images_with(torch.zeros(3), torch.ones(3))
    x[:, 2] = 0.0  # a channel with zero variance on clean data: KL finite thanks to the BN's eps
    kl = bn_divergences(net, bn_input_statistics(net, [x]))["0"]
    assert torch.isfinite(kl).all() and kl[2] > 1.0 > kl[0]

    values = torch.tensor([0.1] * 19 + [5.0], dtype=torch.float64)
    idx, threshold = outlier_channels(values, 3.0)
    assert idx.tolist() == [19] and threshold == pytest.approx(float(values.mean() + 3 * values.std()))
    assert outlier_channels(values, 5.0)[0].tolist() == []  # max z-score of 20 values is 19 / sqrt(20) = 4.25
    assert outlier_channels(torch.tensor([3.0]), 0.0)[0].tolist() == []
    # equal up to rounding noise (a dead layer whose KLs all come from the eps): no outliers, not noise-picking
    noisy = 5.2565 + torch.tensor([0.0] * 19 + [1e-11], dtype=torch.float64)
    idx, threshold = outlier_channels(noisy, 1.0)
    assert idx.tolist() == [] and threshold is None


def spy_parts(data: MitigationDataModule) -> list[str]:
    parts: list[str] = []
    original = data.tensors

    def tensors(part: str = "train"):
        parts.append(part)
        return original(part)

    data.tensors = tensors
    return parts


def test_prunes_from_dm_only_and_pruned_channels_output_zero_after_reload(backdoored_checkpoint, tmp_path,
                                                                          run_defense) -> None:
    path = str(backdoored_checkpoint["path"])
    infos, weights = [], []
    for noise in (False, True):  # the test sets, then noise in their place
        data = SmallTestSets(spc=10, split_seed=3, n_test=None, noise=noise, backdoored=path)
        parts = spy_parts(data)
        defense = run_defense(BNP, path, root=tmp_path / str(noise), epochs=0, data=data, u=1.0)
        assert parts == ["train"]  # D_m only: neither D_v nor any test set
        infos.append(defense.info())
        weights.append({k: v.clone() for k, v in defense.net.state_dict().items()})
    # the test sets (replaced by noise in the second run) play no part in the choice
    assert infos[0]["pruned_channels"] == infos[1]["pruned_channels"] and infos[0]["num_images"] == 100
    assert infos[0]["thresholds"] == infos[1]["thresholds"]
    assert infos[0]["pruned_total"] > 0

    defended = load_defended(tmp_path / "True" / "checkpoints" / "last.ckpt")
    assert not BNP.changes_architecture
    for k, v in defended.net.state_dict().items():
        assert torch.equal(v, weights[1][k]), k
    outputs: dict[str, torch.Tensor] = {}
    handles = [bn.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
               for name, bn in bn_layers(defended.net)]
    defended(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8))
    for h in handles:
        h.remove()
    for name, channels in infos[1]["pruned_channels"].items():
        assert (outputs[name][:, channels] == 0).all(), name
        others = [c for c in range(outputs[name].shape[1]) if c not in channels]
        assert (outputs[name][:, others] != 0).any(), name


def test_bad_hyperparameters(backdoored_checkpoint) -> None:
    path = str(backdoored_checkpoint["path"])
    for u in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="u=.*expected a finite number >= 0"):
            BNP(path, u=u)
    with pytest.raises(ValueError, match="log_term=.*expected one of"):
        BNP(path, log_term="textbook")
    with pytest.raises(ValueError, match="statistics=.*expected 'all' or 'last_batch'"):
        BNP(path, statistics="first_batch")


def test_last_batch_statistics_as_the_fork(backdoored_checkpoint, run_defense, monkeypatch) -> None:
    """statistics: last_batch keeps only the last batch of a shuffled pass (100 images at batch 64: 36 of them),
    as the fork; the statistics then equal those of that batch alone."""
    import lightning_modules.defenses.bnp as bnp

    seen = []
    original = bnp.bn_input_statistics

    def spy(net, batches, forward=None):
        batches = list(batches)
        seen.append([len(b) for b in batches])
        return original(net, batches, forward)

    monkeypatch.setattr(bnp, "bn_input_statistics", spy)
    monkeypatch.setattr(Defense, "measure", lambda self: {"acc": 1.0, "asr": 1.0, "ra": 0.0})  # not under test
    for statistics in ("all", "last_batch"):
        defense = run_defense(BNP, backdoored_checkpoint["path"], epochs=0, data={"split_seed": 0, "batch_size": 64},
                              statistics=statistics, save_defended=False)
        assert defense.info()["statistics"] == statistics
    assert seen == [[64, 36], [36]]
    assert defense.info()["num_images"] == 36


def test_tiny_imagenet_uses_u4() -> None:
    assert yaml.safe_load((CONFIGS / "defense" / "bnp.yaml").read_text())["model"]["init_args"]["u"] == 3
    assert yaml.safe_load((CONFIGS / "defense" / "tiny_imagenet" / "bnp.yaml").read_text()) == {
        "model": {"init_args": {"u": 4.0}}}
