"""AWM: masks stay in [0, 1], the universal perturbation respects its L1 bound and clips to valid pixels, the
defended model differs from the attacked one only by mask-scaled BN weights, bad settings."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.checkpoint import load_attacked
from lightning_modules.defenses import AWM, load_defended
from lightning_modules.defenses.awm import scale_l1
from tests.helpers import MaskRange


def run_awm(run_defense, checkpoint, epochs: int | None = 2, batch_size: int = 50, defense: AWM | type = AWM,
            root=None, callbacks=(), trainer: dict | None = None, **kwargs) -> AWM:
    """AWM (or a subclass, or a built one) on D_m (10 per class) in batches of `batch_size`, 8 test images."""
    return run_defense(defense, checkpoint, root=root, epochs=epochs, data={"batch_size": batch_size, "n_test": 8},
                       callbacks=callbacks, trainer=trainer, **kwargs)


def test_masks_stay_in_unit_interval_after_every_step(backdoored_checkpoint, run_defense) -> None:
    watch = MaskRange()  # lr 50: large steps, the clip binds
    run_awm(run_defense, backdoored_checkpoint["path"], batch_size=25, callbacks=[watch], lr=50.0)
    assert len(watch.ranges) == 8  # 100 images in batches of 25, 2 epochs
    assert all(0.0 <= lo and hi <= 1.0 for lo, hi in watch.ranges), watch.ranges
    assert min(lo for lo, _ in watch.ranges) == 0.0  # some mask was pushed below 0 and clipped back


def test_delta_respects_its_l1_bound(backdoored_checkpoint, run_defense) -> None:
    defense = run_awm(run_defense, backdoored_checkpoint["path"], delta_norm=5.0)
    epochs = defense.info()["epochs"]
    assert len(epochs) == 2
    for e in epochs:  # network-input units: the fitted delta exceeds 5, the scaled one sits on the bound
        assert e["delta_l1_fitted"] > 5.0 and e["delta_l1"] == pytest.approx(5.0, rel=1e-5)
    assert float(defense.delta.abs().sum()) <= 5.0 * (1 + 1e-6) and defense.delta.shape == (1, 3, 32, 32)


def test_scale_l1() -> None:
    delta = torch.tensor([[3.0, -4.0]])
    assert torch.equal(scale_l1(delta, 10.0), delta)  # within the bound: unchanged, never scaled up
    assert torch.allclose(scale_l1(delta, 3.5), torch.tensor([[1.5, -2.0]]))
    assert torch.equal(scale_l1(torch.zeros(1, 2), 1.0), torch.zeros(1, 2))


def test_perturbed_inputs_are_valid_pixels(backdoored_checkpoint) -> None:
    defense = AWM(str(backdoored_checkpoint["path"]))
    pixels = torch.rand(4, 3, 32, 32)
    pixels[0] = 0.0  # black: the fork's clamp of the *normalised* input to [0, 1] would brighten it
    delta = torch.randn(1, 3, 32, 32)
    z = defense.perturb(defense.normalize(pixels), delta)
    std, mean = defense.normalize.std, defense.normalize.mean
    back = z * std + mean
    assert torch.allclose(back, (pixels + delta * std).clamp(0, 1), atol=1e-5)
    assert torch.allclose(defense.perturb(defense.normalize(pixels[:1]), torch.zeros_like(delta)),
                          defense.normalize(pixels[:1]))


def test_only_mask_scaled_bn_weights_change(backdoored_checkpoint, tmp_path, run_defense) -> None:
    ckpt = backdoored_checkpoint["path"]
    defense = run_awm(run_defense, ckpt, root=tmp_path, lr=5.0)
    masks = {name: m.detach() for name, m in zip(defense.bn_names, defense.neuron_masks)}
    assert min(float(m.min()) for m in masks.values()) < 0.99  # the masks did move
    original = load_attacked(ckpt).net.state_dict()
    for net in (defense.net, load_defended(tmp_path / "checkpoints" / "last.ckpt").net):
        state = net.state_dict()
        assert state.keys() == original.keys()
        for key, value in original.items():
            layer, _, kind = key.rpartition(".")
            expected = value * masks[layer] if layer in masks and kind == "weight" else value
            assert torch.equal(state[key], expected), key


@pytest.mark.parametrize("kwargs", [{"lr": 0.0}, {"lr_decay": 1.5}, {"alpha": -0.1}, {"l1_weight": -1.0},
                                    {"delta_lr": 0.0}, {"delta_norm": -5.0}])
def test_bad_hyperparameters_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        AWM("unused.ckpt", **kwargs)


def test_delta_search_ascends_ce_against_own_predictions(backdoored_checkpoint, run_defense) -> None:
    """The universal perturbation is fitted by ascent: at its L1 bound it raises CE(f(x + delta), f(x)) on D_m far
    above no perturbation and a random perturbation of the same L1 norm (a descent step would lower it)."""
    import torch.nn.functional as F

    from datamodules import MitigationDataModule

    path = backdoored_checkpoint["path"]
    fitted = []

    class Recording(AWM):
        def fit_delta(self) -> torch.Tensor:
            fitted.append(super().fit_delta())
            return fitted[-1]

    defense = run_awm(run_defense, path, None, batch_size=10, defense=Recording, trainer={"max_steps": 1},
                      save_defended=False)  # 10 ascent steps, one mask step
    data = MitigationDataModule(spc=10, backdoored=str(path))
    data.setup("fit")
    z = defense.inputs(data.tensors("train")[0])
    net = load_attacked(str(path)).net.eval()
    delta = scale_l1(fitted[0], 1000.0)  # the default bound, as the mask step uses it
    random = torch.randn(delta.shape, generator=torch.Generator().manual_seed(1))
    random *= delta.abs().sum() / random.abs().sum()
    with torch.no_grad():
        own = net(z).argmax(1)
        clean, searched, noise = (float(F.cross_entropy(net(z + d), own)) for d in (0.0, delta, random))
    assert searched > clean + 5.0 and searched > 3 * noise, (clean, noise, searched)


def test_mask_step_uses_true_labels_on_the_perturbed_images(backbone_checkpoint, tmp_path, run_defense) -> None:
    """One mask step on all of D_m, no augmentation: m <- clip(m - lr * grad) of alpha CE(x; y) + (1 - alpha)
    CE(clip(x + delta); y) with the true labels y, recomputed by hand. An untrained network predicts other classes
    than y, so labels taken from its predictions would give a different step."""
    import torch.nn.functional as F

    from datamodules import MitigationDataModule
    from lightning_modules.defenses.pruning import masked_forward

    path = backbone_checkpoint("small_cnn")
    lr, alpha = 100.0, 0.3  # an untrained network's mask gradients are small (~1e-4)
    defense = AWM(str(path), lr=lr, alpha=alpha, l1_weight=0.0, save_defended=False,
                  result_file=str(tmp_path / "result.json"))
    defense.augment = torch.nn.Identity()
    run_awm(run_defense, path, None, batch_size=100, defense=defense, trainer={"max_steps": 1})
    data = MitigationDataModule(spc=10, backdoored=str(path))
    data.setup("fit")
    x, y = data.tensors("train")
    fresh = AWM(str(path)).eval()
    z = fresh.inputs(x)
    with torch.no_grad():
        assert (fresh(x).argmax(1) != y).float().mean() > 0.5  # own predictions are not the labels

    def expected(labels_perturbed: torch.Tensor) -> torch.Tensor:
        masks = {n: torch.ones_like(m, requires_grad=True) for n, m in fresh.masks().items()}
        clean = F.cross_entropy(masked_forward(fresh.net, z, masks), y)
        perturbed = F.cross_entropy(masked_forward(fresh.net, fresh.perturb(z, defense.delta), masks), labels_perturbed)
        grads = torch.autograd.grad(alpha * clean + (1 - alpha) * perturbed, list(masks.values()))
        return torch.cat([(1 - lr * g).clamp(0, 1).flatten() for g in grads])

    actual = torch.cat([m.detach().flatten() for m in defense.neuron_masks])
    with torch.no_grad():
        own = masked_forward(fresh.net, fresh.perturb(z, defense.delta), fresh.masks()).argmax(1)
    true_labels, own_labels = expected(y), expected(own)
    step = (1 - true_labels).abs().max()
    assert step > 1e-3  # the masks did move
    assert (actual - true_labels).abs().max() < 1e-3 * step
    assert (actual - own_labels).abs().max() > 0.1 * step
