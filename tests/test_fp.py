"""FP: the stop rule on D_v (and only D_v: the choice is the same when the test sets are replaced), pruned
columns that stay exactly zero through fine-tuning and reloading, bad settings."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.checkpoint import load_attacked
from lightning_modules.defenses import FP, load_defended
from lightning_modules.defenses.hooks import capture
from tests.helpers import SmallTestSets

LAYERS = {"PreActResNet18": "linear", "VGG19BN": "classifier.0", "EfficientNetB3": "classifier.1",
          "MobileNetV3Large": "classifier.0", "SmallCNN": "linear"}


def data(split_seed: int = 2, val_fraction: float = 0.1, **kwargs) -> dict:
    """SmallTestSets arguments: D_m of 10 per class, 10% of it D_v, the test sets cut to 32 images."""
    return {"split_seed": split_seed, "val_fraction": val_fraction, "batch_size": 256, **kwargs}


def test_stop_rule_on_dv_and_independent_of_test_sets(backdoored_checkpoint, run_defense) -> None:
    path = str(backdoored_checkpoint["path"])
    original = load_attacked(path).net.linear.weight
    infos = []
    for noise in (False, True):  # max_epochs 0: pruning only
        dm = SmallTestSets(backdoored=path, **data(noise=noise))
        defense = run_defense(FP, path, epochs=0, data=dm, layers=LAYERS, save_defended=False)
        infos.append(defense.info())
    assert infos[0] == infos[1]  # the test sets (noise in the second run) play no part in the choice

    info, limit = infos[1], 0.9 * infos[1]["val_acc_unpruned"]
    steps = dict(zip(info["pruned_per_step"], info["val_acc_steps"]))
    assert info["pruned"] > 0 and info["tail_evaluation"] and info["per_step"] == 1  # ceil(1% of 64)
    assert all(acc > limit for count, acc in steps.items() if count <= info["pruned"])  # kept: within the limit
    if info["first_failing_step_pruned"] is not None:  # the next step fails (the fork would keep that one)
        assert info["first_failing_step_pruned"] == info["pruned"] + info["per_step"]
        assert steps[info["first_failing_step_pruned"]] <= limit + 1e-9
    # the pruned model: exactly the chosen columns zeroed, its D_v accuracy the recorded one
    pruned = torch.tensor(info["pruned_features"])
    weight = defense.net.linear.weight
    assert len(pruned) == info["pruned"] == int(defense.pruned.sum()) and defense.pruned[pruned].all()
    assert (weight[:, pruned] == 0).all() and torch.equal(weight[:, ~defense.pruned], original[:, ~defense.pruned])
    xv, yv = dm.tensors("val")
    assert defense.accuracy(xv, yv) == pytest.approx(info["val_acc_pruned"])
    # the pruned features are the dormant ones: lower mean activation on D_m than the kept ones
    x, _ = dm.tensors("train")
    with torch.no_grad(), capture(defense.net.eval(), ["linear"], "input") as store:
        defense(x)
    mean = store["linear"].mean(0)
    assert mean[pruned].mean() < mean[~defense.pruned].mean()


def test_choice_changes_with_dv(backdoored_checkpoint, run_defense) -> None:
    """The stop depends on D_v: another split seed (another D_v) moves it, so the test above can fail."""
    chosen = set()
    for seed in range(4):
        defense = run_defense(FP, backdoored_checkpoint["path"], epochs=0, data=data(seed), layers=LAYERS,
                              save_defended=False)
        chosen.add(defense.info()["pruned"])
    assert len(chosen) > 1


@pytest.mark.parametrize("symmetric, pruned", [(False, 3), (True, 1)])
def test_symmetric_stop_as_the_fork(symmetric, pruned, backdoored_checkpoint, run_defense, monkeypatch) -> None:
    """The fork also stops on an accuracy *rise* of 10% or more (|change| / acc0 >= 0.1); by default only a drop
    stops FP. D_v accuracies (stand-ins): 0.8 unpruned, 0.8, 0.9 (+12.5%), 0.85, 0.6 (-25%) for 1, 2, 3, 4 features."""
    curve = iter([0.8, 0.8, 0.9, 0.85, 0.6, 0.6])
    monkeypatch.setattr(FP, "tail_evaluator", lambda self, *a: lambda keep: next(curve))
    defense = run_defense(FP, backdoored_checkpoint["path"], epochs=0, data=data(), layers=LAYERS,
                          symmetric_drop=symmetric, save_defended=False)
    info = defense.info()
    assert info["pruned"] == pruned and info["first_failing_step_pruned"] == pruned + 1
    assert info["stop_rule"] == ("change either way" if symmetric else "drop")


def test_mask_survives_finetuning_and_reload(backdoored_checkpoint, tmp_path, run_defense) -> None:
    path = str(backdoored_checkpoint["path"])
    original = load_attacked(path).net.linear.weight
    defense = run_defense(FP, path, root=tmp_path, epochs=3, data=data(), trainer={"limit_val_batches": 0},
                          layers=LAYERS)
    trainer = defense.trainer
    mask, weight = defense.pruned.clone(), defense.net.linear.weight.detach()
    assert mask.any() and defense.info()["pruned_columns_zero"]
    assert (weight[:, mask] == 0).all()  # despite weight decay and momentum
    assert not torch.equal(weight[:, ~mask], original[:, ~mask])  # the rest was fine-tuned
    momentum = trainer.optimizers[0].state[defense.net.linear.weight]["momentum_buffer"]
    assert (momentum[:, mask] == 0).all()

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    defended = load_defended(ckpt)
    assert torch.equal(defended.pruned, mask) and torch.equal(defended.net.linear.weight, weight)
    plain = load_attacked(ckpt).net  # the defended model is the plain backbone: no extra state needed
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(defended(x), defended.classify(x, plain))


def test_bad_settings(backdoored_checkpoint, run_defense) -> None:
    path = str(backdoored_checkpoint["path"])
    for kwargs, message in (
        ({"prune_step": 0.0}, "prune_step"), ({"prune_step": 1.5}, "prune_step"),
        ({"max_acc_drop": 0.0}, "max_acc_drop"), ({"max_acc_drop": 1.0}, "max_acc_drop"),
        ({"lr": -0.01}, "lr=-0.01"), ({"momentum": 1.0}, "momentum"), ({"weight_decay": -1.0}, "weight_decay"),
        ({"layers": {"VGG19BN": "classifier.0"}}, "no FP layer .* configured for backbone SmallCNN"),
        ({"layers": {"SmallCNN": "features.0"}}, "must be an nn.Linear, found a Conv2d"),
        ({"layers": {"SmallCNN": "head"}}, "must be an nn.Linear, found no such module"),
    ):
        with pytest.raises(ValueError, match=message):
            FP(path, **({"layers": LAYERS} | kwargs))
    with pytest.raises(ValueError, match="set data.val_fraction > 0"):
        run_defense(FP, path, epochs=0, data=data(val_fraction=0.0), layers=LAYERS, save_defended=False)


def test_pruning_lowers_asr_on_the_planted_backdoor(backdoored_checkpoint, run_defense) -> None:
    """The pruning family works on the fixture: FP's pruning alone (no fine-tuning) takes ASR from 0.97 to 0.14 at a
    clean accuracy of 0.93. SPC 20 with a 20% D_v (4 images per class): with the 1-image-per-class D_v of SPC 10 one
    flipped image already stops the pruning, and the result swings with the split (ASR 0.05..0.57 over split seeds
    0..3; 0.14..0.33 here)."""
    defense = run_defense(FP, backdoored_checkpoint["path"], epochs=0, layers=LAYERS, save_defended=False,
                          data=data(0, 0.2, spc=20, n_test=None))
    result = defense.result
    assert result["before"]["asr"] > 0.9 and defense.info()["pruned"] > 0
    assert result["after"]["asr"] < 0.5 and result["after"]["acc"] > 0.85, result["after"]
