"""ANP: masks stay in [0, 1], the threshold is chosen on D_v only, pruning lives in the weights, the record, bad
settings; and the datamodule's sampling with replacement that ANP's schedule uses."""

from __future__ import annotations

import pytest
import torch

from datamodules import MitigationDataModule
from lightning_modules.checkpoint import load_attacked
from lightning_modules.defenses import ANP, load_defended
from lightning_modules.defenses.anp import choose_threshold
from lightning_modules.defenses.pruning import bn_layers
from tests.helpers import MaskRange


def run_anp(run_defense, checkpoint, steps: int, root=None, callbacks=(), data: dict | None = None,
            **kwargs) -> ANP:
    """`steps` mask updates on D_m (10 per class, 10% of it held out as D_v), 128 draws per epoch in batches of 64."""
    data = {"val_fraction": 0.1, "batch_size": 64, "samples_per_epoch": 128, **(data or {})}
    return run_defense(ANP, checkpoint, root=root, epochs=None, trainer={"max_steps": steps}, data=data,
                       callbacks=callbacks, **kwargs)


def test_masks_stay_in_unit_interval_after_every_step(backdoored_checkpoint, run_defense) -> None:
    watch = MaskRange()  # lr 1: large steps, the clip binds
    run_anp(run_defense, backdoored_checkpoint["path"], 6, callbacks=[watch], lr=1.0, threshold=0.5)
    assert len(watch.ranges) == 6
    assert all(0.0 <= lo and hi <= 1.0 for lo, hi in watch.ranges), watch.ranges
    assert min(lo for lo, _ in watch.ranges) == 0.0  # some mask was pushed below 0 and clipped back


def test_threshold_choice_ignores_the_test_sets(backdoored_checkpoint, run_defense) -> None:
    runs = []
    for noise in (False, True):
        defense = run_anp(run_defense, backdoored_checkpoint["path"], 8, data={"n_test": None, "noise": noise}, lr=0.5)
        runs.append((defense.result, defense.info(), torch.cat([m.detach() for m in defense.neuron_masks])))
    (plain, info, masks), (replaced, info_r, masks_r) = runs
    assert plain["before"]["acc"] > 0.9 and replaced["before"]["acc"] < 0.3  # the test sets really differ
    assert torch.equal(masks, masks_r)
    assert info["threshold"] == info_r["threshold"] and info["val_acc_curve"] == info_r["val_acc_curve"]
    assert info["pruned"] == info_r["pruned"]


def test_pruned_neurons_are_exactly_zero_after_reload(backdoored_checkpoint, tmp_path, run_defense) -> None:
    ckpt = backdoored_checkpoint["path"]
    defense = run_anp(run_defense, ckpt, 8, root=tmp_path, lr=0.5, threshold=0.6)
    info = defense.info()
    assert info["threshold"] == 0.6 and info["pruned"] > 0
    reloaded = load_defended(tmp_path / "checkpoints" / "last.ckpt")
    original = load_attacked(ckpt).net.state_dict()
    masks = dict(zip(defense.bn_names, defense.neuron_masks))
    pruned = 0
    for name, bn in bn_layers(reloaded.net):
        cut = masks[name].detach() <= 0.6
        pruned += int(cut.sum())
        assert torch.equal(bn.weight[cut], torch.zeros(int(cut.sum())))
        assert torch.equal(bn.weight[~cut], original[f"{name}.weight"][~cut])
        assert torch.equal(bn.bias, original[f"{name}.bias"])  # ANP zeroes the weight only
    assert pruned == info["pruned"]
    # everything else, the BN running statistics included (train-mode forwards updated them), is the original
    state, bn_weights = reloaded.net.state_dict(), {f"{name}.weight" for name in masks}
    for key, value in original.items():
        assert key in bn_weights or torch.equal(state[key], value), key


def test_info_records_masks_threshold_and_curve(backdoored_checkpoint, run_defense) -> None:
    defense = run_anp(run_defense, backdoored_checkpoint["path"], 2, data={"samples_per_epoch": 64})
    info = defense.result["defense_info"]
    curve = info["val_acc_curve"]
    assert [p["threshold"] for p in curve] == [round(0.05 * i, 6) for i in range(19)]
    assert info["val_size"] == 10 and 0.0 <= info["val_acc_unpruned"] <= 1.0
    assert info["threshold"] == choose_threshold(info["val_acc_unpruned"], curve, 0.1)
    assert info["mask"]["neurons"] == sum(m.numel() for m in defense.neuron_masks)
    assert sum(info["mask"]["histogram"]["counts"]) == info["mask"]["neurons"]
    assert set(info["mask"]) >= {"min", "mean", "max", "quantiles", "layer_mean"}
    pruned_at = {p["threshold"]: p["pruned"] for p in curve}
    assert info["pruned"] == (pruned_at[info["threshold"]] if info["threshold"] is not None else 0)


def test_choose_threshold_rule() -> None:
    curve = [{"threshold": t, "val_acc": a} for t, a in [(0.0, 0.8), (0.05, 0.75), (0.1, 0.6), (0.15, 0.73)]]
    assert choose_threshold(0.8, curve, 0.1) == 0.15  # the largest within 10%, not the first failure
    assert choose_threshold(0.8, curve[:3], 0.1) == 0.05
    assert choose_threshold(0.8, [{"threshold": 0.0, "val_acc": 0.72}], 0.1) is None  # exactly 10% fails
    assert choose_threshold(None, curve, 0.1) is None
    # the fork's symmetric rule refuses a rise of 10% or more too
    rising = [{"threshold": t, "val_acc": a} for t, a in [(0.0, 0.8), (0.05, 0.85), (0.1, 0.9), (0.15, 0.75)]]
    assert choose_threshold(0.8, rising, 0.1) == 0.15
    assert choose_threshold(0.8, rising, 0.1, symmetric=True) == 0.15  # 0.75: -6% is fine, +12.5% is not
    assert choose_threshold(0.8, rising[:3], 0.1, symmetric=True) == 0.05


@pytest.mark.parametrize("kwargs", [{"eps": -0.1}, {"noise_steps": 0}, {"alpha": 1.5}, {"lr": -0.01},
                                    {"momentum": 1.0}, {"threshold": 1.2}, {"threshold_max": 1.0},
                                    {"threshold_step": 0.0}, {"max_acc_drop": 0.0}])
def test_bad_hyperparameters_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ANP("unused.ckpt", **kwargs)


def test_needs_a_validation_split(backdoored_checkpoint, run_defense) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        run_anp(run_defense, backdoored_checkpoint["path"], 1, data={"val_fraction": 0.0})


def test_samples_per_epoch_draws_with_replacement(backdoored_checkpoint) -> None:
    data = MitigationDataModule(spc=2, batch_size=16, samples_per_epoch=50, backdoored=str(backdoored_checkpoint["path"]))
    data.setup("fit")
    x_train, _ = data.tensors()
    torch.manual_seed(0)
    batches = list(data.train_dataloader())
    assert [len(b[0]) for b in batches] == [16, 16, 16, 2]
    drawn = torch.cat([b[0] for b in batches]).flatten(1)
    members = x_train.flatten(1)
    assert all((members == row).all(1).any() for row in drawn)  # every draw is a D_m image
    assert len(torch.unique(drawn, dim=0)) < 50  # 50 draws from 20 images repeat some
    torch.manual_seed(0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, data.train_dataloader()))  # seeded
    data.samples_per_epoch = None  # the default: one shuffled pass without replacement
    assert sum(len(b[0]) for b in data.train_dataloader()) == len(x_train)
    with pytest.raises(ValueError, match="samples_per_epoch"):
        MitigationDataModule(samples_per_epoch=0)


def test_adversarial_noise_ascends_the_loss(backdoored_checkpoint) -> None:
    """The noise step is an ascent: the fitted noise raises CE on D_m far above no noise and above a random noise of
    the same size (the uniform start plus a random sign step of eps); a descent step would lower it."""
    import torch.nn.functional as F

    from lightning_modules.defenses.pruning import masked_forward

    path = backdoored_checkpoint["path"]
    data = MitigationDataModule(spc=10, backdoored=str(path))
    data.setup("fit")
    x, y = data.tensors("train")
    defense = ANP(str(path))
    z = defense.inputs(x)
    eps, masks = defense.hparams.eps, {n: m.detach() for n, m in defense.masks().items()}

    @torch.no_grad()
    def loss(noise_w: dict, noise_b: dict) -> float:  # the network in train mode, as in the mask optimisation
        scale_w = {n: masks[n] + noise_w[n] for n in masks}
        return float(F.cross_entropy(masked_forward(defense.net, z, scale_w, {n: 1 + noise_b[n] for n in masks}), y))

    zero = {n: torch.zeros_like(m) for n, m in masks.items()}
    gen = torch.Generator().manual_seed(1)

    def random_noise() -> dict:
        return {n: (torch.rand(m.shape, generator=gen) * 2 - 1) * eps
                + eps * torch.randint(0, 2, m.shape, generator=gen).mul(2).sub(1) for n, m in masks.items()}

    adversarial = loss(*defense.adversarial_noise(z, y))
    clean, random = loss(zero, zero), loss(random_noise(), random_noise())
    assert adversarial > clean + 2.0 and adversarial > 2 * random, (clean, random, adversarial)
