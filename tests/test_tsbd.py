"""TSBD: the unlearning ascends CE(D_m) and stops on D_m accuracy; the zeroed weights are exactly the most-changed
weights of the top-n neurons by weight change (one ranking over all layers), zero right after stage 1; the
fine-tuning step's finite difference is the gradient of CE + alpha r ||grad CE|| (per tensor or global) and one step
is that update; D_m only; bad settings."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.checkpoint import load_attacked
from lightning_modules.defenses import TSBD
from lightning_modules.defenses.tsbd import ascent_step, select_reinit
from tests.helpers import assert_ignores_test_sets


def run_tsbd(run_defense, path, epochs: int = 0, root=None, **kwargs) -> TSBD:
    """TSBD on D_m at SPC 10 (batch 16: 7 steps per epoch); epochs 0: stage 1 only."""
    return run_defense(TSBD, path, root=root, epochs=epochs, **{"save_defended": False, **kwargs})


def spy_unlearn(monkeypatch) -> dict:
    """Record the unlearned copy and D_m when TSBD.unlearn runs."""
    captured = {}
    unlearn = TSBD.unlearn

    def spy(self):
        net = unlearn(self)
        captured["unlearned"], captured["data"] = net, self.mitigation_data("train")
        return net

    monkeypatch.setattr(TSBD, "unlearn", spy)
    return captured


# -- stage 1 -------------------------------------------------------------------------------------------------------
def test_select_reinit_ranks_all_layers_together() -> None:
    changes = {"a": torch.tensor([[1.0, 1, 1], [5, 0, 0], [0, 0, 0.5], [2, 2, 2]]),  # NWC 3, 5, 0.5, 6
               "b": torch.tensor([[10.0, 0], [0, 0.1], [3, 3], [0, 0], [1, 0], [0.2, 0.2]])}  # 10, 0.1, 6, 0, 1, 0.4
    # 3 of the 10 neurons: b0 (10), a3 (6), b2 (6); their 7 weights 10 0 | 2 2 2 | 3 3, the top int(3.5) = 3: >= 3
    neurons, masks, threshold = select_reinit(changes, 0.3, 0.5)
    assert neurons["a"].tolist() == [3] and neurons["b"].tolist() == [0, 2] and threshold == 3.0
    expected_b = torch.zeros(6, 2, dtype=torch.bool)
    expected_b[0, 0] = expected_b[2, 0] = expected_b[2, 1] = True
    assert not masks["a"].any() and torch.equal(masks["b"], expected_b)
    # weight ratio 1: every weight of the chosen neurons, even an unchanged one (threshold 0, as the reference's)
    _, masks, threshold = select_reinit(changes, 0.3, 1.0)
    assert threshold == 0.0 and int(masks["a"].sum() + masks["b"].sum()) == 7 and masks["b"][0].all()
    # fewer than one neuron: nothing
    neurons, masks, _ = select_reinit(changes, 0.05, 0.7)
    assert all(len(i) == 0 for i in neurons.values()) and not any(m.any() for m in masks.values())


@pytest.mark.parametrize("neuron_ratio, weight_ratio", [(0.05, 0.7), (0.2, 0.3), (0.5, 1.0)])
def test_select_reinit_matches_a_sort_by_hand(neuron_ratio, weight_ratio) -> None:
    gen = torch.Generator().manual_seed(0)
    changes = {"conv1": torch.rand(8, 27, generator=gen), "block.conv": torch.rand(16, 72, generator=gen) * 0.5,
               "head": torch.rand(32, 144, generator=gen) * 0.1}
    rows = sorted(((float(c[i].sum()), n, i) for n, c in changes.items() for i in range(len(c))), reverse=True)
    top = rows[: int(len(rows) * neuron_ratio)]
    weights = sorted((float(v), n, i, j) for _, n, i in top for j, v in enumerate(changes[n][i]))[::-1]
    zeroed = {(n, i, j) for _, n, i, j in weights[: int(len(weights) * weight_ratio)]}
    neurons, masks, _ = select_reinit(changes, neuron_ratio, weight_ratio)
    assert {(n, int(i)) for n, idx in neurons.items() for i in idx} == {(n, i) for _, n, i in top}
    assert {(n, int(i), int(j)) for n, m in masks.items() for i, j in m.nonzero()} == zeroed


def test_unlearning_ascends_the_clean_loss_and_stops_on_dm(backdoored_checkpoint, run_defense, monkeypatch) -> None:
    path = backdoored_checkpoint["path"]
    captured = spy_unlearn(monkeypatch)
    model = run_tsbd(run_defense, path, unlearn_lr=0.01, unlearn_epochs=20)
    x, y = captured["data"]
    original = load_attacked(str(path)).net.eval()
    with torch.no_grad():
        losses = {k: float(F.cross_entropy(model.classify(x, net.eval()), y))
                  for k, net in (("original", original), ("unlearned", captured["unlearned"]))}
    assert losses["unlearned"] > losses["original"] + 2.0, losses  # a descent would lower it
    info = model.info()["unlearn"]
    assert info["reached_stop_acc"] and info["epochs"] < 20 and info["epochs"] == len(info["dm_acc"])
    assert info["dm_acc"][-1] <= 0.1 < min(info["dm_acc"][:-1], default=1.0)  # the first epoch at <= 0.1 stops it
    assert model.accuracy(x, y, net=captured["unlearned"]) == info["dm_acc"][-1]  # read on D_m


def test_zeroes_the_most_changed_weights_of_the_top_neurons(backdoored_checkpoint, run_defense, monkeypatch) -> None:
    """Stage 1 only: the defended weights are the original ones with exactly the by-hand selection set to zero (BN
    parameters and statistics, the head and every other weight untouched)."""
    path = backdoored_checkpoint["path"]
    captured = spy_unlearn(monkeypatch)
    model = run_tsbd(run_defense, path, unlearn_lr=0.01, unlearn_epochs=3, neuron_ratio=0.1, weight_ratio=0.7)
    original = load_attacked(str(path)).net.state_dict()
    unlearned = captured["unlearned"].state_dict()
    convs = [n for n, m in model.net.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs == model.layer_names and len(convs) == 5
    change = {n: (unlearned[f"{n}.weight"] - original[f"{n}.weight"]).abs().flatten(1) for n in convs}
    nwc = sorted(((float(c[i].sum()), n, i) for n, c in change.items() for i in range(len(c))), reverse=True)
    top = nwc[: int(0.1 * len(nwc))]
    assert len(nwc) == 160 and len(top) == 16
    assert {(n, i) for n, idx in model.reinit_neurons.items() for i in idx} == {(n, i) for _, n, i in top}
    pooled = torch.cat([change[n][i] for _, n, i in top])
    threshold = pooled.sort(descending=True).values[int(0.7 * len(pooled)) - 1]
    defended = model.net.state_dict()
    zeroed = 0
    for key, value in original.items():
        layer = key.removesuffix(".weight")
        if layer in change:
            mask = torch.zeros_like(change[layer], dtype=torch.bool)
            for _, n, i in top:
                if n == layer:
                    mask[i] = change[layer][i] >= threshold
            mask = mask.view(value.shape)
            assert (defended[key][mask] == 0).all() and torch.equal(defended[key][~mask], value[~mask]), key
            assert (value[mask] != 0).all(), key  # they were not zero before
            zeroed += int(mask.sum())
        else:
            assert torch.equal(defended[key], value), key
    info = model.info()
    assert zeroed == info["weights_zeroed"] == int(0.7 * len(pooled)) and info["neurons_reinit"] == 16
    assert info["weight_change_threshold"] == pytest.approx(float(threshold))
    assert 0 <= info["dm_acc_after_reinit"] <= 1 and info["epochs"] == []


def test_exclude_convs(backbone_checkpoint) -> None:
    path = str(backbone_checkpoint("preact_resnet18"))
    names = TSBD(path).layer_names  # the backbone's skip_convs: the reference leaves the shortcuts out by name
    assert names and not any("shortcut" in n for n in names) and "conv1" in names
    assert any("shortcut" in n for n in TSBD(path, exclude_convs=[]).layer_names)
    with pytest.raises(ValueError, match="TSBD re-initialises Conv2d neurons.*exclude_convs"):
        TSBD(path, exclude_convs=["conv1", "conv2", "shortcut"])


# -- stage 2 -------------------------------------------------------------------------------------------------------
def test_ascent_step_norms() -> None:
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, generator=gen), 5 * torch.randn(7, generator=gen), torch.zeros(2, 2)]
    per_tensor = ascent_step(grads, 0.05)
    assert [float(s.norm()) for s in per_tensor] == pytest.approx([0.05, 0.05, 0.0])
    assert all(torch.allclose(s / 0.05, g / g.norm()) for s, g in zip(per_tensor[:2], grads))  # along +g
    total = ascent_step(grads, 0.05, "global")
    assert float(torch.cat([s.flatten() for s in total]).norm()) == pytest.approx(0.05)
    assert torch.allclose(total[1] / total[0].norm(), grads[1] / grads[0].norm())  # one scale for all
    assert all(torch.isfinite(s).all() for s in per_tensor + total)


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_finite_difference_is_the_gradient_norm_penalty(scope) -> None:
    """(1 - alpha) g(theta) + alpha g(theta + r g / ||g||) = grad [L + alpha r ||grad L||] + O(r^2): ||.|| over all
    parameters ("global", the paper's penalty) or summed over tensors ("tensor", what the reference's per-tensor step
    penalises); checked against the double backward in float64."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    params = list(net.parameters())
    alpha, r = 0.7, 1e-5

    def grads(create_graph: bool = False):
        return torch.autograd.grad(F.cross_entropy(net(x), y), params, create_graph=create_graph)

    g = [t.detach() for t in grads(create_graph=True)]
    with torch.no_grad():
        for p, s in zip(params, ascent_step(g, r, scope)):
            p.add_(s)
    g_far = grads()
    with torch.no_grad():
        for p, s in zip(params, ascent_step(g, r, scope)):
            p.sub_(s)
    finite = [(1 - alpha) * a + alpha * b for a, b in zip(g, g_far)]

    exact_g = grads(create_graph=True)
    norms = torch.stack([t.norm() for t in exact_g])
    penalty = norms.norm() if scope == "global" else norms.sum()
    loss = F.cross_entropy(net(x), y) + alpha * r * penalty
    exact = torch.autograd.grad(loss, params)
    for a, b, plain in zip(finite, exact, g):
        assert (a - b).norm() < 1e-3 * (b - plain).norm() + 1e-12  # the penalty's share matched to 0.1%
        assert (b - plain).norm() > 0  # and it is not nothing


def test_step_is_the_penalised_gradient(backdoored_checkpoint, tmp_path, run_defense, monkeypatch) -> None:
    """One step on all of D_m (no augmentation, momentum or weight decay): theta_1 = theta_0 - lr [(1 - alpha)
    g(theta_0) + alpha g(theta_0 + r g / ||g||)] with theta_0 the weights after stage 1, and BN running statistics
    from the pass at theta_0 only."""
    path = backdoored_checkpoint["path"]
    start = {}
    prepare = TSBD.prepare

    def spy_prepare(self):
        prepare(self)
        start["net"], start["data"] = copy.deepcopy(self.net), self.mitigation_data("train")

    monkeypatch.setattr(TSBD, "prepare", spy_prepare)
    lr, r, alpha = 0.05, 1.0, 0.7  # r 1: the perturbed gradient differs clearly from the plain one
    model = TSBD(str(path), unlearn_lr=0.01, unlearn_epochs=1, r=r, alpha=alpha, lr=lr, momentum=0.0,
                 save_defended=False, result_file=str(tmp_path / "result.json"))
    model.augment = nn.Identity()
    run_defense(model, path, epochs=None, trainer={"max_steps": 1}, data={"batch_size": 256})
    x, y = start["data"]
    net = start["net"].train()
    inputs = model.normalize(x).contiguous(memory_format=torch.channels_last)
    params = list(net.parameters())
    theta0 = [p.detach().clone() for p in params]
    g1 = torch.autograd.grad(F.cross_entropy(net(inputs), y), params)  # also the one BN update the model may keep
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    with torch.no_grad():
        for p, s in zip(params, ascent_step(list(g1), r)):
            p.add_(s)
    g2 = torch.autograd.grad(F.cross_entropy(net(inputs), y), params)
    assert sum(float((a - b).norm()) for a, b in zip(g1, g2)) > 0.1 * sum(float(a.norm()) for a in g1)
    for (name, p), t0, a, b in zip(model.net.named_parameters(), theta0, g1, g2):
        step = p.detach() - t0
        expected = -lr * ((1 - alpha) * a + alpha * b)
        size = expected.abs().max()
        # ~1% apart at most (CPU conv gradients differ slightly between runs); plain FT's step is off by 75-230%
        assert (step - expected).abs().max() <= 3e-2 * size, name
        assert (step + lr * a).abs().max() > 0.5 * size, name
    for name, b in model.net.named_buffers():
        torch.testing.assert_close(b, buffers[name], rtol=1e-4, atol=1e-6, msg=name)
    (epoch,) = model.info()["epochs"]
    assert epoch["perturbed_loss"] > epoch["loss"]  # the step goes uphill


# -- data and settings ---------------------------------------------------------------------------------------------
def test_depends_on_dm_only(backdoored_checkpoint, tmp_path) -> None:
    def make(root):
        return TSBD(str(backdoored_checkpoint["path"]), unlearn_lr=0.01, unlearn_epochs=2, save_defended=False,
                    result_file=str(root / "result.json"))

    plain, swapped = assert_ignores_test_sets(make, backdoored_checkpoint["path"], tmp_path, epochs=1)
    for key in ("unlearn", "reinit_per_layer", "weights_zeroed", "dm_acc_after_reinit", "epochs", "dm_acc_after"):
        assert plain.info()[key] == swapped.info()[key], key


@pytest.mark.parametrize("bad", [{"neuron_ratio": 0.0}, {"neuron_ratio": 1.0}, {"neuron_ratio": -0.1},
                                 {"weight_ratio": 0.0}, {"weight_ratio": 1.2}, {"alpha": -0.1}, {"alpha": 1.5},
                                 {"r": 0.0}, {"unlearn_lr": -1e-4}, {"unlearn_epochs": 0}, {"unlearn_stop_acc": 1.5},
                                 {"unlearn_momentum": 1.0}, {"lr": 0.0}, {"weight_decay": -1.0},
                                 {"norm_scope": "layer"}, {"alpha": float("nan")}])
def test_bad_settings(bad) -> None:
    (name,) = bad
    with pytest.raises(ValueError, match=rf"TSBD: invalid {name}=.*model\.init_args\.{name}"):
        TSBD("never-read.ckpt", **bad)  # checked before the checkpoint is read
