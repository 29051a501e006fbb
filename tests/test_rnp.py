"""RNP: masks in [0, 1]; the threshold rule reads D_m only; the pruning lands on the original weights and
survives a reload; bad settings fail clearly."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.checkpoint import load_attacked
from lightning_modules.defenses import RNP, load_defended
from lightning_modules.defenses.rnp import scan_threshold


def run_rnp(run_defense, path, epochs: int = 2, noise: bool = False, root=None, **kwargs) -> RNP:
    return run_defense(RNP, path, root=root, epochs=epochs, data={"spc": 5, "noise": noise, "batch_size": 64},
                       **{"unlearn_epochs": 2, **kwargs})


def test_scan_stops_before_the_accuracy_drop() -> None:
    masks = torch.tensor([0.0, 0.05, 0.3, 0.5, 0.9])
    # pruning neuron 3 (mask 0.5) costs 5 points; the others cost nothing
    def accuracy(pruned: torch.Tensor) -> float:
        return 0.90 - 0.05 * float(pruned[3])

    chosen, history = scan_threshold(masks, accuracy, base=0.90, step=0.02, max_drop=0.02)
    assert chosen == pytest.approx(0.50)  # 0.50 prunes masks < 0.5; 0.52 would prune neuron 3
    assert history[-1]["threshold"] == pytest.approx(0.52) and history[-1]["pruned"] == 4
    chosen, history = scan_threshold(masks, accuracy, base=0.90, step=0.02, max_drop=0.05)
    assert chosen == pytest.approx(0.98) and len(history) == 50  # 0, 0.02, ..., 0.98: never fails


def test_masks_and_pruning_of_the_original_weights(backdoored_checkpoint, tmp_path, run_defense) -> None:
    # a strong ascent (lr 0.1) unlearns within the budget, so recovery has work to do; max_acc_drop 1: the scan
    # runs to the last threshold, so every mask below 0.98 is pruned
    model = run_rnp(run_defense, backdoored_checkpoint["path"], unlearn_lr=0.1, unlearn_epochs=5, max_acc_drop=1.0)
    info = model.info()
    masks = torch.cat([m.detach() for m in model.masks.values()])
    assert info["unlearn"]["reached_stop_acc"] and info["unlearn"]["epochs"] < 5  # stopped at D_m acc <= 0.2
    assert info["unlearn"]["dm_acc"][-1] <= 0.2 < min(info["unlearn"]["dm_acc"][:-1], default=1.0)
    assert len(masks) == info["neurons_total"]
    assert masks.min() >= 0 and masks.max() <= 1 and masks.min() < 1  # recovery moved them, within [0, 1]
    assert info["threshold"] == pytest.approx(0.98) and len(info["scan"]) == 50
    expected = {n: (m < 0.98).nonzero().flatten() for n, m in model.masks.items()}
    assert info["pruned_total"] == sum(len(i) for i in expected.values()) > 0

    # only the pruned BN weights differ from the *original* weights (the unlearned ones moved everywhere,
    # BN running statistics included)
    original = load_attacked(str(backdoored_checkpoint["path"])).net.state_dict()
    defended = model.net.state_dict()
    for key, value in original.items():
        layer, _, kind = key.rpartition(".")
        if layer in expected and kind == "weight":
            keep = torch.ones_like(value, dtype=torch.bool)
            keep[expected[layer]] = False
            assert torch.equal(defended[key][keep], value[keep]), key
            assert (defended[key][expected[layer]] == 0).all(), key
        else:
            assert torch.equal(defended[key], value), key

    # the defended checkpoint restores the pruning
    model.trainer.save_checkpoint(tmp_path / "defended.ckpt")
    reloaded = load_defended(tmp_path / "defended.ckpt")
    modules = dict(reloaded.net.named_modules())
    for layer, idx in expected.items():
        assert (modules[layer].weight[idx] == 0).all()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(reloaded(x), model.eval()(x))


def test_threshold_uses_only_mitigation_data(backdoored_checkpoint, run_defense) -> None:
    path = backdoored_checkpoint["path"]
    a = run_rnp(run_defense, path, unlearn_lr=0.1, max_acc_drop=0.05)
    b = run_rnp(run_defense, path, unlearn_lr=0.1, max_acc_drop=0.05, noise=True)
    assert 0 < a.info()["threshold"] < 0.98  # the rule stopped the scan: a real choice
    assert a.result["before"] != b.result["before"]  # the test sets did change
    for key in ("threshold", "scan", "pruned_per_layer", "unlearn", "dm_acc_unpruned"):
        assert a.info()[key] == b.info()[key], key
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name])
    for key, value in a.net.state_dict().items():
        assert torch.equal(value, b.net.state_dict()[key]), key


@pytest.mark.parametrize("unlearn_masks", [False, True])
def test_masks_during_unlearning(backdoored_checkpoint, run_defense, unlearn_masks) -> None:
    # no recovery epoch: the masks are what unlearning left (the fork trains them there; the original has none)
    model = run_rnp(run_defense, backdoored_checkpoint["path"], epochs=0, unlearn_lr=0.1, unlearn_masks=unlearn_masks,
                    selection="fixed", save_defended=False)
    masks = torch.cat([m.detach() for m in model.masks.values()])
    assert masks.min() >= 0 and masks.max() <= 1
    assert bool((masks == 1).all()) is not unlearn_masks


def test_running_train_accuracy_stop(backdoored_checkpoint, run_defense, monkeypatch) -> None:
    """stop_signal running_train_acc (the fork's): the stop reads the accuracy of the epoch's own train-mode
    forwards on augmented batches, not an eval pass after the epoch."""
    seen: list[float] = []
    unlearning = {"on": False}
    classify, prepare = RNP.classify, RNP.prepare

    def spy_classify(self, x, net=None):
        logits = classify(self, x, net)
        if unlearning["on"] and net is not None and net.training:
            seen.append(logits)
        return logits

    def spy_prepare(self):
        unlearning["on"] = True
        try:
            prepare(self)
        finally:
            unlearning["on"] = False

    monkeypatch.setattr(RNP, "classify", spy_classify)
    monkeypatch.setattr(RNP, "prepare", spy_prepare)
    monkeypatch.setattr(RNP, "accuracy", lambda *a, **k: pytest.fail("no eval pass during unlearning") if
                        unlearning["on"] else 0.5)
    y_seen: list[torch.Tensor] = []
    batches = RNP.batches

    def spy_batches(self, x, y, *args, **kwargs):
        for xb, yb in batches(self, x, y, *args, **kwargs):
            if unlearning["on"]:
                y_seen.append(yb)
            yield xb, yb

    monkeypatch.setattr(RNP, "batches", spy_batches)
    model = run_rnp(run_defense, backdoored_checkpoint["path"], epochs=0, unlearn_lr=0.1, unlearn_epochs=6,
                    stop_signal="running_train_acc", selection="fixed", save_defended=False)
    info = model.info()["unlearn"]
    # spc 5 x 10 classes at batch 64: one batch per epoch, so each epoch's running accuracy is that batch's
    expected = [float((logits.argmax(1) == yb).float().mean()) for logits, yb in zip(seen, y_seen)]
    assert info["stop_signal"] == "running_train_acc" and info["dm_acc"] == pytest.approx(expected)
    assert info["reached_stop_acc"] and info["dm_acc"][-1] <= 0.2 < min(info["dm_acc"][:-1], default=1.0)


def test_recovery_descends_the_masked_loss(backdoored_checkpoint, run_defense, monkeypatch) -> None:
    """Recovery minimises CE(D_m) of the unlearned network over the masks: the recovered masks must give a lower
    D_m loss than masks of 1 (an ascent would raise it)."""
    import copy

    import torch.nn.functional as F

    from lightning_modules.defenses.rnp import MaskedNet

    captured = {}
    finish = RNP.finish

    def spy_finish(self):
        captured["net"] = copy.deepcopy(self.references["recovery"].net)
        captured["masks"] = {k: v.detach().clone() for k, v in self.masks.items()}
        captured["data"] = self.mitigation_data("train")
        finish(self)

    monkeypatch.setattr(RNP, "finish", spy_finish)
    model = run_rnp(run_defense, backdoored_checkpoint["path"], epochs=5, unlearn_lr=0.1, unlearn_epochs=5,
                    selection="fixed", save_defended=False)
    x, y = captured["data"]
    ones = {k: torch.ones_like(v) for k, v in captured["masks"].items()}
    losses = {}
    with torch.no_grad():
        for name, masks in (("recovered", captured["masks"]), ("ones", ones)):
            net = MaskedNet(captured["net"], masks).train()  # recovery runs in train mode (batch statistics)
            losses[name] = float(F.cross_entropy(model.classify(x, net), y))
    assert losses["recovered"] < 0.8 * losses["ones"], losses


def test_fixed_threshold(backdoored_checkpoint, run_defense) -> None:
    model = run_rnp(run_defense, backdoored_checkpoint["path"], epochs=1, selection="fixed", fixed_threshold=0.9)
    flat = torch.cat([m.detach() for m in model.masks.values()])
    assert model.info()["threshold"] == 0.9 and model.info()["scan"] == []
    assert model.info()["pruned_total"] == int((flat < 0.9).sum())


@pytest.mark.parametrize("bad", [{"unlearn_lr": -1e-3}, {"recover_lr": 0.0}, {"max_acc_drop": 1.5},
                                 {"fixed_threshold": -0.1}, {"threshold_step": 0.0}, {"unlearn_stop_acc": 2.0},
                                 {"unlearn_momentum": 1.0}, {"selection": "best"}, {"stop_signal": "test_acc"}])
def test_bad_settings(backdoored_checkpoint, bad) -> None:
    with pytest.raises(ValueError, match="RNP"):
        RNP(str(backdoored_checkpoint["path"]), **bad)
