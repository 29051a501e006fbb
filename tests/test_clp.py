"""CLP: the channel Lipschitz bound against a direct SVD, the conv/BN pairing per backbone (PreAct's
downsampling blocks included), exact zeros after reload, and no data read at all."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.utils.data import DataLoader, Dataset

from datamodules.mitigation import MitigationDataModule
from lightning_modules.backbones import BACKBONES, layer_roles
from lightning_modules.checkpoint import load_attacked
from lightning_modules.defenses import CLP, load_defended
from lightning_modules.defenses.clp import conv_bn_pairs, lipschitz_outliers, uclc
from tests.conftest import CONFIGS, run_cli
from tests.helpers import QUIET

PREACT_PAIRS = [  # (conv, bn): bn2 <- conv1 of its block; bn1 <- the previous block's conv2 (stem conv1 first)
    ("conv1", "layer1.0.bn1"), ("layer1.0.conv1", "layer1.0.bn2"),
    ("layer1.0.conv2", "layer1.1.bn1"), ("layer1.1.conv1", "layer1.1.bn2"),
    ("layer1.1.conv2", "layer2.0.bn1"), ("layer2.0.conv1", "layer2.0.bn2"),
    ("layer2.0.conv2", "layer2.1.bn1"), ("layer2.1.conv1", "layer2.1.bn2"),
    ("layer2.1.conv2", "layer3.0.bn1"), ("layer3.0.conv1", "layer3.0.bn2"),
    ("layer3.0.conv2", "layer3.1.bn1"), ("layer3.1.conv1", "layer3.1.bn2"),
    ("layer3.1.conv2", "layer4.0.bn1"), ("layer4.0.conv1", "layer4.0.bn2"),
    ("layer4.0.conv2", "layer4.1.bn1"), ("layer4.1.conv1", "layer4.1.bn2"),
]


def random_bn(channels: int, gen: torch.Generator) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(channels, generator=gen))  # negative gammas too
        bn.running_var.copy_(torch.rand(channels, generator=gen) * 2 + 0.01)
    return bn


@pytest.mark.parametrize("groups", [1, 4])  # a full conv and a depthwise one
def test_uclc_matches_numpy_svd(groups: int) -> None:
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, groups=groups, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
    bn = random_bn(8, gen)
    w, g = conv.weight.detach().numpy(), bn.weight.detach().numpy()
    sigma = np.sqrt(bn.running_var.numpy() + bn.eps)
    expected = [np.linalg.svd(w[k].reshape(w.shape[1], -1), compute_uv=False).max() * abs(g[k] / sigma[k])
                for k in range(8)]
    np.testing.assert_allclose(uclc(conv, bn).numpy(), expected, rtol=1e-5)


def test_outliers_are_above_mean_plus_u_unbiased_std() -> None:
    values = torch.tensor([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 6.0])
    assert lipschitz_outliers(values, 2.0).tolist() == [7]
    x = torch.randn(200, generator=torch.Generator().manual_seed(1))
    threshold = x.numpy().mean() + 1.5 * x.numpy().std(ddof=1)
    assert lipschitz_outliers(x, 1.5).tolist() == np.flatnonzero(x.numpy() > threshold).tolist()
    assert lipschitz_outliers(torch.tensor([5.0]), 3.0).numel() == 0  # one channel: no spread, nothing pruned


def test_preact_pairing_skips_shortcut_convs() -> None:
    net = BACKBONES["preact_resnet18"](10)
    pairs, unpaired = conv_bn_pairs(net, layer_roles(net).skip_convs)
    assert pairs == PREACT_PAIRS and unpaired == []
    assert dict((bn, conv) for conv, bn in pairs)["layer2.1.bn1"] == "layer2.0.conv2"
    # the reference's rule (last conv in module order) takes the 1x1 shortcut after each downsampling block
    reference = dict((bn, conv) for conv, bn in conv_bn_pairs(net)[0])
    assert [reference[f"layer{k}.1.bn1"] for k in (2, 3, 4)] == [f"layer{k}.0.shortcut.0" for k in (2, 3, 4)]


@pytest.mark.parametrize("name", ["vgg19_bn", "efficientnet_b3", "mobilenet_v3_large", "small_cnn",
                                  "preact_resnet18"])
def test_pairs_follow_the_graph(name: str) -> None:
    """Traced with torch.fx: every BN's input is its paired conv, or (PreAct bn1) the residual sum whose
    main-path addend is that conv."""
    with torch.device("meta"):
        net = BACKBONES[name](10)
    modules = dict(net.named_modules())
    pairs, _ = conv_bn_pairs(net, layer_roles(net).skip_convs)
    conv_of = {bn: conv for conv, bn in pairs}
    seen = 0
    for node in fx.symbolic_trace(net).graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.BatchNorm2d):
            source = node.args[0]
            if source.op == "call_function" and name == "preact_resnet18":  # out + skip: conv2's output first
                source = source.args[0]
            assert source.op == "call_module" and source.target == conv_of[node.target], node.target
            seen += 1
    assert seen == len(pairs) == sum(isinstance(m, nn.BatchNorm2d) for m in modules.values())


def test_unpaired_and_mismatched_bns() -> None:
    net = nn.Sequential(nn.MaxPool2d(2), nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    assert conv_bn_pairs(net) == ([("2", "3")], ["1"])
    with pytest.raises(ValueError, match="cannot normalise its output.*skip_convs"):
        conv_bn_pairs(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(8)))


def with_outlier(source, path, bn: str = "features.4", channel: int = 5, scale: float = 50.0):
    """A copy of a checkpoint whose BN `bn` has one channel with a far larger |gamma|: a planted outlier."""
    ckpt = torch.load(source, weights_only=True)
    ckpt["state_dict"][f"net.{bn}.weight"][channel] *= scale
    torch.save(ckpt, path)
    return path


def test_prunes_planted_outlier_without_any_data(backdoored_checkpoint, tmp_path) -> None:
    path = with_outlier(backdoored_checkpoint["path"], tmp_path / "planted.ckpt")
    defense = CLP(str(path))
    defense.prepare()  # no Trainer, no datamodule: any data access would raise
    assert 5 in defense.pruned["features.4"]
    bn = dict(defense.net.named_modules())["features.4"]
    assert bn.weight[5] == 0 and bn.bias[5] == 0
    json.dumps(defense.info())
    again = CLP(str(path))
    again.prepare()
    assert again.pruned == defense.pruned  # deterministic


def test_end_to_end_reload_outputs_exact_zeros(backdoored_checkpoint, tmp_path, monkeypatch) -> None:
    path = with_outlier(backdoored_checkpoint["path"], tmp_path / "planted.ckpt")

    class Forbidden(Dataset):  # Lightning builds the train loader even for 0 epochs; reading it fails
        def __len__(self) -> int:
            return 1

        def __getitem__(self, index):
            raise AssertionError("CLP read the mitigation data")

    tensors = MitigationDataModule.tensors

    def test_sets_only(self, part="train"):
        if part in ("train", "val"):
            raise AssertionError("CLP read the mitigation data")
        return tensors(self, part)

    monkeypatch.setattr(MitigationDataModule, "tensors", test_sets_only)
    monkeypatch.setattr(MitigationDataModule, "train_dataloader", lambda self: DataLoader(Forbidden()))
    run_cli("fit", "--config", str(CONFIGS / "defense" / "clp.yaml"), "--model.backdoored", str(path), *QUIET,
            cwd=tmp_path)
    run_dir = tmp_path / "runs" / "clp-spc10-seed0" / "version_0"
    pruned = json.loads((run_dir / "result.json").read_text())["defense_info"]["pruned"]
    assert 5 in pruned["features.4"]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    for net in (load_defended(ckpt).net, load_attacked(ckpt).net):
        outputs = {}
        modules = dict(net.named_modules())
        for name in pruned:
            modules[name].register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
        net.eval()(torch.rand(16, 3, 32, 32) * 4 - 2)
        for name, idx in pruned.items():
            assert torch.all(outputs[name][:, idx] == 0), name
            others = [c for c in range(outputs[name].shape[1]) if c not in idx]
            assert outputs[name][:, others].abs().sum() > 0


def test_bad_arguments(backdoored_checkpoint) -> None:
    path = str(backdoored_checkpoint["path"])
    with pytest.raises(ValueError, match="u=-1.0 .*expected a finite number >= 0"):
        CLP(path, u=-1.0)
    with pytest.raises(ValueError, match="no skip_convs entry configured for backbone SmallCNN"):
        CLP(path, skip_convs={"VGG19BN": []})
