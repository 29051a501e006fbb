"""NC: the batched trigger search equals searching each class alone; it flags the planted target (class 0) of
the BadNets fixture and unlearns; with nothing flagged the model comes back unchanged and the decision does not
depend on the test sets; the prune layer check holds under bf16; bad settings fail clearly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_modules.checkpoint import load_attacked
from lightning_modules.defenses import NC
from lightning_modules.defenses._nc_reverse import SearchSettings, anomaly_index, reverse_engineer
from lightning_modules.defenses.nc import image_keys
from tests.helpers import dm_images


def run_nc(run_defense, path, epochs: int = 1, spc: int = 10, noise: bool = False, precision: str = "32-true",
           **kwargs) -> NC:
    return run_defense(NC, path, epochs=epochs, data={"spc": spc, "noise": noise, "batch_size": 256},
                       trainer={"precision": precision}, **kwargs)


def tiny_search(classes, class_chunk=None):
    """A small random network and data: 5 classes, 12 images of 3 x 8 x 8 in 3 fixed batches."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(16, 5)).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = SearchSettings(epochs=14, lr=0.1, success_threshold=0.9, patience=1, early_stop_patience=2,
                              class_chunk=class_chunk)
    return reverse_engineer(net, lambda: iter(x.split(4)), classes, (3, 8, 8), settings)


@pytest.mark.parametrize("class_chunk", [None, 2])
def test_batched_search_equals_each_class_alone(class_chunk) -> None:
    batched = tiny_search(range(5), class_chunk)
    assert len(set(batched.epochs.tolist())) > 1, "the case should stop classes at different epochs"
    assert batched.reached.any() and not batched.reached.all()
    for t in range(5):
        alone = tiny_search([t])
        for field in ("mask", "pattern", "l1", "cost"):
            torch.testing.assert_close(getattr(batched, field)[t], getattr(alone, field)[0], rtol=1e-5, atol=1e-5,
                                       msg=f"class {t}: {field}")
        assert batched.epochs[t] == alone.epochs[0] and batched.reached[t] == alone.reached[0], t


def test_anomaly_index_by_hand() -> None:
    l1 = torch.tensor([10.0, 100.0, 110.0, 90.0, 120.0, 80.0])
    index, median, mad = anomaly_index(l1)
    # median 95 (mean of the middle two); |l1 - 95| = 85, 5, 15, 5, 25, 15 -> median 15
    assert median == pytest.approx(95.0) and mad == pytest.approx(1.4826 * 15.0)
    torch.testing.assert_close(index, (l1 - 95).abs() / (1.4826 * 15), rtol=1e-6, atol=1e-6)


def test_flags_the_planted_target_and_unlearns(backdoored_checkpoint, run_defense) -> None:
    # shortened search (defaults: 80 epochs at batch 256): 4 epochs at batch 2 give 200 Adam steps
    path = backdoored_checkpoint["path"]
    model = run_nc(run_defense, path, epochs=1, search_epochs=4, search_batch_size=2)
    info = model.info()
    assert 0 in info["flagged"], info
    l1 = torch.tensor(info["l1_norms"])
    assert int(l1.argmin()) == 0 and info["anomaly_index"][0] > 2
    assert info["mitigation"] == "unlearn" and info["fine_tune_epochs"] == 1
    # the reversed trigger of class 0 is the kept buffer, and tiny: a few pixels of the 32 x 32
    mask = model.trigger_mask[0, 0]
    assert float(mask.sum()) == pytest.approx(info["l1_norms"][0], rel=1e-4)
    assert info["l1_norms"][0] < 0.05 * info["median_l1"] and float(mask.sum()) < 20
    # the unlearning images are the last 20% of D_m (stored order), recognised by their exact pixels
    x, _ = model.mitigation_data("train")
    hits = torch.isin(image_keys(x), model._unlearn_keys)
    assert info["unlearn"] == {"clean": 80, "stamped_per_flagged_class": 20}
    assert hits[80:].all() and not hits[:80].any()
    before = load_attacked(path).net.state_dict()
    assert any(not torch.equal(v, model.net.state_dict()[k]) for k, v in before.items())


def test_nothing_flagged_returns_the_model_unchanged(backdoored_checkpoint, run_defense) -> None:
    path = backdoored_checkpoint["path"]
    settings = dict(epochs=2, spc=2, search_epochs=2, anomaly_threshold=1e9)
    model = run_nc(run_defense, path, **settings)
    info = model.info()
    assert info["flagged"] == [] and info["mitigation"].startswith("none")
    assert info["fine_tune_epochs"] == 0 and model.trainer.global_step == 0
    before = load_attacked(path).net.state_dict()
    for key, value in model.net.state_dict().items():  # weights and BN running statistics
        assert torch.equal(value, before[key]), key
    assert model.result["after"] == model.result["before"]
    # the search reads D_m only: other test images leave every decision unchanged
    other = run_nc(run_defense, path, noise=True, **settings)
    assert other.info()["l1_norms"] == info["l1_norms"] and other.info()["anomaly_index"] == info["anomaly_index"]
    assert other.result["before"] != model.result["before"]


@pytest.mark.parametrize("backbone", ["small_cnn", "preact_resnet18"])
def test_prune_layer_check_holds_under_bf16(backbone, backbone_checkpoint, run_defense) -> None:
    """The check that the prune layer produces the logits runs in fp32: bf16 autocast logits are no reference.
    (Width 8: the bf16 logits of these narrow nets miss fp32's by more than the check's tolerance, as the full-width
    ones' do; bf16 on a CPU is slow.)"""
    model = run_nc(run_defense, backbone_checkpoint(backbone, width=8), spc=1, mitigation="prune", search_epochs=1,
                   search_batch_size=5, precision="bf16-mixed")
    x, y = model.mitigation_data("train")
    facts = model.prune(x, y, [0])
    assert facts["neurons"] == model.net.get_submodule(model.prune_layer).weight.shape[1]
    handle = model.net.register_forward_hook(lambda module, args, out: out * 2)  # a tail after the prune layer
    try:
        with pytest.raises(ValueError, match="does not produce the logits from its input"):
            model.prune(x, y, [0])
    finally:
        handle.remove()


@pytest.mark.parametrize("bad", [
    {"mitigation": "erase"}, {"search_epochs": 0}, {"search_lr": -0.1}, {"init_cost": 0.0},
    {"cost_multiplier": 1.0}, {"success_threshold": 1.5}, {"early_stop_threshold": 0.0}, {"class_chunk": 0},
    {"anomaly_threshold": 0.0}, {"unlearn_fraction": 1.0}, {"lr": -0.01}, {"momentum": 1.0},
    {"prune_step": 0.0}, {"prune_stop_asr": 2.0}, {"search_batch_size": 0}, {"cosine_t_max": 0},
])
def test_bad_settings_raise(backdoored_checkpoint, bad) -> None:
    with pytest.raises(ValueError, match="nc.yaml"):
        NC(str(backdoored_checkpoint["path"]), **bad)


@pytest.mark.parametrize("layers,message", [
    ({"PreActResNet18": "linear"}, r"no NC prune layer .* configured for backbone SmallCNN"),
    ({"SmallCNN": "features.0"}, "must be the output nn.Linear"),
    ({"SmallCNN": "head"}, "no such module"),
])
def test_bad_prune_layer_raises(backdoored_checkpoint, layers, message) -> None:
    with pytest.raises(ValueError, match=message):
        NC(str(backdoored_checkpoint["path"]), mitigation="prune", prune_layers=layers)


def test_trigger_search_makes_the_reversed_triggers_succeed(backdoored_checkpoint) -> None:
    """The search descends CE(f(stamp(x)), t): from its start (mask and pattern at 0.88, which sends no D_m image to
    these classes), 20 Adam steps make the reversed triggers of the planted target (0) and of another class (3)
    send all of D_m to their class, with CE falling by more than 5 nats; an ascent would keep them away."""
    import torch.nn.functional as F

    from lightning_modules.defenses._nc_reverse import stamp, unit_box

    path = str(backdoored_checkpoint["path"])
    x = dm_images(path)[0]
    defense = NC(path)
    net = defense.frozen_copy()

    def classify(z: torch.Tensor) -> torch.Tensor:
        return defense.classify(z, net)

    classes = [0, 3]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    triggers = reverse_engineer(classify, lambda: iter(x[order].split(10)), classes, (3, 32, 32),
                                SearchSettings(epochs=2))
    start_mask, start_pattern = unit_box(torch.ones(1, 32, 32)), unit_box(torch.ones(3, 32, 32))

    @torch.no_grad()
    def hit_and_ce(mask: torch.Tensor, pattern: torch.Tensor, t: int) -> tuple[float, float]:
        logits = classify(stamp(x, mask, pattern))
        return float((logits.argmax(1) == t).float().mean()), float(F.cross_entropy(logits, torch.full((len(x),), t)))

    for i, t in enumerate(classes):
        (start_hit, start_ce), (hit, ce) = (hit_and_ce(start_mask, start_pattern, t),
                                            hit_and_ce(triggers.mask[i], triggers.pattern[i], t))
        assert start_hit < 0.1 and hit > 0.95 and ce < start_ce - 5.0, (t, start_hit, hit, start_ce, ce)
