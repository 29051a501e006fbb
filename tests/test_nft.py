"""NFT: each BN layer's mask floor, the MixUp objective recomputed by hand, the L1 pull toward 1 and the CE descent,
only the masks train (folded into the BN weights: a plain backbone), D_m only, bad settings fail clearly."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_modules.checkpoint import load_attacked
from lightning_modules.defenses import NFT, load_defended
from lightning_modules.defenses.nft import mask_floors, mixup
from lightning_modules.defenses.pruning import masked_forward
from tests.helpers import assert_ignores_test_sets, dm_images

DATA = {"spc": 5, "batch_size": 64}  # D_m of 50 images: one step per epoch


def run_nft(run_defense, checkpoint, epochs: int = 2, callbacks=(), data: dict | None = None, **kwargs) -> NFT:
    return run_defense(NFT, checkpoint, epochs=epochs, data={**DATA, **(data or {})}, callbacks=callbacks, **kwargs)


def built(checkpoint, tmp_path, start: float, **kwargs) -> NFT:
    """An NFT whose masks all start at `start` (1 in the method: the L1 pull has nothing to do there)."""
    defense = NFT(str(checkpoint), result_file=str(tmp_path / "result.json"), save_defended=False, **kwargs)
    with torch.no_grad():
        for m in defense.neuron_masks:
            m.fill_(start)
    return defense


class LayerRanges(L.Callback):
    """Each BN layer's (min, max) mask after every training step."""

    def __init__(self) -> None:
        self.steps: list[list[tuple[float, float]]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.steps.append([(float(m.min()), float(m.max())) for m in module.neuron_masks])


def test_floor_of_each_layer(backdoored_checkpoint) -> None:
    """The k-th BN layer (module order) floors at alpha e^(-beta k), k from 1 as in the fork and the authors' code:
    0.8 e^-0.5 = 0.485 for the first BN, near 0 by the tenth."""
    assert mask_floors(3, 0.8, 0.5) == pytest.approx([0.8 * math.exp(-0.5), 0.8 * math.exp(-1.0), 0.8 * math.exp(-1.5)])
    assert mask_floors(1, 0.8, 0.5)[0] == pytest.approx(0.4852, abs=1e-4)
    assert mask_floors(10, 0.8, 0.5)[-1] == pytest.approx(0.0054, abs=1e-4)
    assert mask_floors(4, 1.0, 0.0) == [1.0] * 4  # beta 0: one floor, alpha
    defense = NFT(str(backdoored_checkpoint["path"]), alpha=0.6, beta=0.3)
    assert len(defense.floors) == len(defense.neuron_masks) == 5  # SmallCNN's five BN layers
    with torch.no_grad():
        for m in defense.neuron_masks:
            m.copy_(torch.linspace(-2, 2, len(m)))
    defense.clamp_masks()
    for k, m in enumerate(defense.neuron_masks, start=1):
        floor = 0.6 * math.exp(-0.3 * k)
        inside = (torch.linspace(-2, 2, len(m)) >= floor) & (torch.linspace(-2, 2, len(m)) <= 1)
        assert float(m.detach().min()) == pytest.approx(floor) and float(m.detach().max()) == 1.0
        assert torch.equal(m.detach()[inside], torch.linspace(-2, 2, len(m))[inside])  # in-bounds values untouched


def test_masks_stay_within_their_layer_bounds_after_every_step(backdoored_checkpoint, run_defense) -> None:
    watch = LayerRanges()  # lr 200 with no pull toward 1: large steps, every floor binds
    defense = run_nft(run_defense, backdoored_checkpoint["path"], epochs=3, callbacks=[watch], lr=200.0, lr_min=0.0,
                      l1_weight=0.0)
    floors = [0.8 * math.exp(-0.5 * k) for k in range(1, 6)]  # SmallCNN's five BN layers, k = 1..5
    assert len(watch.steps) == 3
    for step in watch.steps:
        for (lo, hi), floor in zip(step, floors):
            assert lo >= floor - 1e-7 and hi <= 1.0, (step, floors)
    assert [lo for lo, _ in watch.steps[-1]] == pytest.approx(floors)  # the clamp bound in every layer
    info = defense.info()
    assert info["at_floor"] > 0 and info["floors"] == dict(zip(info["mask"]["layer_mean"], floors))


def test_mixup_objective_by_hand(backdoored_checkpoint) -> None:
    """loss = lam CE(f_m(x_mix), y) + (1 - lam) CE(f_m(x_mix), y[perm]) + l1_weight sum |1 - m| / SPC, x_mix = lam x
    + (1 - lam) x[perm], f_m: the network with each BN weight times its mask, in train mode (batch statistics)."""
    path = backdoored_checkpoint["path"]
    defense = NFT(str(path), l1_weight=0.05)
    x, y = dm_images(path, spc=3)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in defense.neuron_masks:
            m.copy_(0.5 + 0.5 * torch.rand(m.shape, generator=gen))
    defense.samples_per_class = 3.0
    by_hand = copy.deepcopy(defense.net).train()  # the masks multiplied into the weights, not masked_forward
    masks = {n: m.detach() for n, m in defense.masks().items()}
    with torch.no_grad():
        for name, m in masks.items():
            by_hand.get_submodule(name).weight.mul_(m)
    torch.manual_seed(0)
    terms = defense.objective(x, y)
    lam, perm = terms["lam"], terms["perm"]
    assert 0 < float(lam) < 1 and torch.equal(perm.sort().values, torch.arange(len(y)))
    assert (y[perm] != y).any()  # two label sets, so swapping lam and 1 - lam would show
    spec = defense.spec
    mean, std = torch.tensor(spec.mean).view(1, -1, 1, 1), torch.tensor(spec.std).view(1, -1, 1, 1)
    with torch.no_grad():
        logits = by_hand(((lam * x + (1 - lam) * x[perm]) - mean) / std)
        ce = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
        l1 = sum(float((1 - m).abs().sum()) for m in masks.values())
    torch.testing.assert_close(terms["mixup_ce"], ce, rtol=1e-4, atol=1e-5)
    assert float(terms["l1"].detach()) == pytest.approx(l1, rel=1e-5)
    assert float(terms["loss"].detach()) == pytest.approx(float(ce) + 0.05 * l1 / 3.0, rel=1e-4)


def test_mixup_draws() -> None:
    x = torch.rand(8, 3, 4, 4)
    torch.manual_seed(0)
    lams = torch.stack([mixup(x, 1.0)[2] for _ in range(600)])
    assert 0 <= float(lams.min()) and float(lams.max()) <= 1  # Beta(1, 1) = U(0, 1): mean 1/2, variance 1/12
    assert float(lams.mean()) == pytest.approx(0.5, abs=0.04) and float(lams.var()) == pytest.approx(1 / 12, abs=0.015)
    mixed, _, lam = mixup(x, 0.0)
    assert float(lam) == 1.0 and torch.equal(mixed, x)


def test_l1_gradient_pulls_each_mask_toward_one(backdoored_checkpoint, tmp_path) -> None:
    """d(loss - MixUp CE)/dm = -l1_weight / SPC for every mask below 1: descending it raises the masks."""
    path = backdoored_checkpoint["path"]
    defense = built(path, tmp_path, 0.6, l1_weight=0.5)
    defense.samples_per_class = 4.0
    x, y = dm_images(path, spc=2)
    terms = defense.objective(x, y)
    grads = torch.autograd.grad(terms["loss"] - terms["mixup_ce"], list(defense.neuron_masks))
    for g in grads:
        torch.testing.assert_close(g, torch.full_like(g, -0.5 / 4.0))


def test_l1_pull_raises_the_masks_in_training(backdoored_checkpoint, tmp_path, run_defense) -> None:
    """From masks of 0.6, a strong pull (l1_weight 50 at SPC 5: 10 per mask against a CE gradient of ~0.1) takes every
    mask to 1 in one step; without it they stay near 0.6 (a pull away from 1 would drive them to their floors)."""
    path = backdoored_checkpoint["path"]
    pulled = run_defense(built(path, tmp_path / "pulled", 0.6, l1_weight=50.0), epochs=2, data=DATA)
    free = run_defense(built(path, tmp_path / "free", 0.6, l1_weight=0.0), epochs=2, data=DATA)
    assert all(bool((m == 1).all()) for m in pulled.neuron_masks)
    flat = torch.cat([m.detach() for m in free.neuron_masks])
    assert float(flat.max()) < 0.9 and float((flat - 0.6).abs().mean()) < 0.1
    assert pulled.info()["samples_per_class"] == 5.0
    assert [e["lr"] for e in pulled.info()["epochs"]] == pytest.approx([0.1, 0.06])  # cosine to lr_min 0.02 over 2


def test_masks_descend_the_clean_loss(backdoored_checkpoint, tmp_path, run_defense) -> None:
    """With no pull and no mixing, the masks minimise CE on D_m: from random masks in [0.5, 1] (a uniform scale would
    be undone by the next BN), 4 steps lower D_m's CE (train-mode batch statistics, as in training; 0.44 -> 0.26);
    an ascent would raise it."""
    path = backdoored_checkpoint["path"]
    defense = built(path, tmp_path, 1.0, l1_weight=0.0, lr=1.0, mixup_alpha=0.0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in defense.neuron_masks:
            m.copy_(0.5 + 0.5 * torch.rand(m.shape, generator=gen))
    start = {n: m.detach().clone() for n, m in defense.masks().items()}
    run_defense(defense, epochs=4, data=DATA)
    x, y = dm_images(path, spc=5)
    net = load_attacked(str(path)).net.train()
    z = (x - torch.tensor(defense.spec.mean).view(1, -1, 1, 1)) / torch.tensor(defense.spec.std).view(1, -1, 1, 1)
    with torch.no_grad():
        before = float(F.cross_entropy(masked_forward(net, z, start), y))
        trained = float(F.cross_entropy(masked_forward(net, z, {n: m.detach() for n, m in defense.masks().items()}), y))
    assert trained < 0.8 * before, (before, trained)


@pytest.mark.parametrize("restore", [False, True])
def test_only_the_masks_train_and_fold_into_the_bn_weights(backdoored_checkpoint, tmp_path, run_defense,
                                                           restore) -> None:
    path = backdoored_checkpoint["path"]
    defense = run_nft(run_defense, path, root=tmp_path, lr=1.0, restore_bn_statistics=restore)
    masks = {n: m.detach() for n, m in defense.masks().items()}
    assert any(bool((m < 1).any()) for m in masks.values())  # the masks moved
    original, state = load_attacked(str(path)).net.state_dict(), defense.net.state_dict()
    assert state.keys() == original.keys() and all(state[k].shape == v.shape for k, v in original.items())
    for key, value in original.items():
        layer, _, kind = key.rpartition(".")
        if layer in masks and kind == "weight":
            assert torch.equal(state[key], value * masks[layer]), key  # folded: gamma * m, the bias untouched
        elif kind in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(state[key], value) is restore, key  # re-estimated in train mode (the fork) or kept
        else:
            assert torch.equal(state[key], value), key
    # the defended checkpoint is the plain backbone: read as an attacked model, it is the defended network
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    plain = load_attacked(str(ckpt)).net
    assert all(torch.equal(v, state[k]) for k, v in plain.state_dict().items())
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(load_defended(ckpt)(x), defense.eval()(x))
    assert defense.info()["bn_statistics"].startswith("restored" if restore else "re-estimated")


class Recorder(torch.nn.Module):
    """Wraps a module and keeps its outputs."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.outputs = inner, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.outputs.append(self.inner(x))
        return self.outputs[-1]


def test_mixup_reads_augmented_images(backdoored_checkpoint, tmp_path, run_defense, monkeypatch) -> None:
    defense = built(backdoored_checkpoint["path"], tmp_path, 1.0)
    recorder = Recorder(defense.augment)
    monkeypatch.setattr(defense, "augment", recorder)
    seen = []
    objective = NFT.objective

    def spy_objective(self, x, y):
        seen.append(x)
        return objective(self, x, y)

    monkeypatch.setattr(NFT, "objective", spy_objective)
    run_defense(defense, epochs=2, data=DATA)
    assert len(seen) == len(recorder.outputs) == 2 and all(a is b for a, b in zip(seen, recorder.outputs))


def test_depends_on_mitigation_data_only(backdoored_checkpoint, tmp_path) -> None:
    path = backdoored_checkpoint["path"]
    plain, _ = assert_ignores_test_sets(
        lambda root: NFT(str(path), result_file=str(root / "result.json"), save_defended=False, lr=1.0),
        path, tmp_path, epochs=2, **DATA)
    assert any(bool((m < 1).any()) for m in plain.neuron_masks)  # it did something


def test_spc_of_the_l1_term_excludes_the_validation_split(backdoored_checkpoint, run_defense) -> None:
    defense = run_nft(run_defense, backdoored_checkpoint["path"], epochs=1, data={"val_fraction": 0.2})
    _, y = defense.trainer.datamodule.tensors("train")
    assert defense.info()["samples_per_class"] == len(y) / 10 < 5
    assert len(defense.info()["epochs"]) == 1 and set(defense.info()["epochs"][0]) >= {"lr", "loss", "mixup_ce", "l1"}


@pytest.mark.parametrize("bad", [{"alpha": 0.0}, {"alpha": 1.5}, {"beta": -0.1}, {"l1_weight": -1e-3}, {"lr": 0.0},
                                 {"lr_min": -0.01}, {"lr_min": 0.5}, {"momentum": 1.0}, {"mixup_alpha": -1.0},
                                 {"l1_weight": float("nan")}])
def test_bad_settings(bad: dict) -> None:
    name = next(iter(bad))
    with pytest.raises(ValueError, match=rf"NFT: invalid {name}=.*model\.init_args\.{name}"):
        NFT("unused.ckpt", **bad)
