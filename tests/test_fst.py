"""FST: the classifier is re-initialised, keeps its original norm after every step and is pushed away from the
original weights by the inner-product term; the result depends on D_m only; bad settings fail clearly; it runs on
every registered backbone."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_modules.backbones import BACKBONES
from lightning_modules.checkpoint import load_attacked
from lightning_modules.defenses import FST
from lightning_modules.defenses.fst import CLASSIFIER_LAYERS, norm64
from tests.helpers import SmallTestSets as SmallTests


class StepNorms(L.Callback):
    """The classifier weights' norms after every training batch (i.e. after every optimiser step)."""

    def __init__(self) -> None:
        self.norms: list[list[float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.norms.append([float(norm64(layer.weight.detach())) for layer in module.classifier()])


def run_fst(path, tmp_path, epochs: int = 2, spc: int = 10, batch_size: int = 16, n_test: int = 32,
            noise: bool = False, callbacks=(), **kwargs) -> FST:
    L.seed_everything(0, verbose=False)
    model = FST(str(path), result_file=str(tmp_path / "result.json"), save_defended=False, **kwargs)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=list(callbacks))
    trainer.fit(model, SmallTests(spc=spc, backdoored=str(path), n_test=n_test, noise=noise, batch_size=batch_size))
    return model


def test_norm_kept_after_every_step_and_classifier_reinitialised(backdoored_checkpoint, tmp_path) -> None:
    path = backdoored_checkpoint["path"]
    original = load_attacked(str(path)).net.linear
    norm = float(norm64(original.weight.detach()))
    steps = StepNorms()
    model = run_fst(path, tmp_path, callbacks=[steps])
    assert len(steps.norms) == 2 * 7  # 100 images in batches of 16, two epochs
    for norms in steps.norms:
        assert norms == pytest.approx([norm], rel=1e-5)
    info = model.info()
    assert info["layers"] == ["linear"] and info["original_norms"] == pytest.approx([norm])
    assert info["final_norms"] == pytest.approx([norm], rel=1e-5)
    # re-initialised, not a rescaled copy of the original: far from it in direction; the bias is free
    assert info["cosine_to_original"][0] < 0.5
    assert not torch.allclose(model.net.linear.bias, original.bias)
    assert [e["epoch"] for e in info["epochs"]] == [0, 1] and info["dm_acc_after"] is not None
    # the rest of the network was tuned too (all weights train)
    assert not torch.equal(model.net.features[0].weight, load_attacked(str(path)).net.features[0].weight)


def test_reinit_happens_after_the_before_measurement(backdoored_checkpoint, tmp_path) -> None:
    path = backdoored_checkpoint["path"]
    model = run_fst(path, tmp_path, epochs=0, n_test=10_000)
    assert model.result["before"]["acc"] == pytest.approx(backdoored_checkpoint["metrics"]["test/acc"], abs=1e-6)
    assert not torch.equal(model.net.linear.weight, load_attacked(str(path)).net.linear.weight)


def test_inner_product_term_pushes_omega_away(backdoored_checkpoint, tmp_path) -> None:
    path = backdoored_checkpoint["path"]
    cosine = {alpha: run_fst(path, tmp_path / str(alpha), alpha=alpha).info()["cosine_to_original"][0]
              for alpha in (0.0, 5.0)}
    assert cosine[5.0] < -0.3 and cosine[5.0] < cosine[0.0] - 0.3


def test_depends_on_dm_only(backdoored_checkpoint, tmp_path) -> None:
    """The defended weights are the same when the benchmark's test sets are replaced by noise."""
    path = backdoored_checkpoint["path"]
    plain = run_fst(path, tmp_path / "a", n_test=10_000)
    swapped = run_fst(path, tmp_path / "b", n_test=10_000, noise=True)
    assert plain.result["before"]["acc"] > 0.9 and swapped.result["before"]["acc"] < 0.3  # the test sets differ
    for (key, a), b in zip(plain.net.state_dict().items(), swapped.net.state_dict().values()):
        assert torch.equal(a, b), key
    assert plain.info()["epochs"] == swapped.info()["epochs"]


@pytest.mark.parametrize("bad", [{"alpha": -0.1}, {"lr": 0.0}, {"momentum": 1.0}, {"weight_decay": -1e-4},
                                 {"classifier_layers": {"VGG19BN": ["classifier.0"]}},
                                 {"classifier_layers": {"SmallCNN": ["features.0"]}},
                                 {"classifier_layers": {"SmallCNN": ["no.such"]}},
                                 {"classifier_layers": {"SmallCNN": []}}])
def test_bad_settings(backdoored_checkpoint, bad) -> None:
    with pytest.raises(ValueError, match="FST|SmallCNN"):
        FST(str(backdoored_checkpoint["path"]), **bad)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_runs_on_every_backbone(name, backbone_checkpoint, tmp_path) -> None:
    path = backbone_checkpoint(name)
    original = load_attacked(str(path)).net
    model = run_fst(path, tmp_path, epochs=1, spc=1, n_test=8, batch_size=256)
    assert model.info()["layers"] == CLASSIFIER_LAYERS[type(model.net).__name__]
    modules = dict(original.named_modules())
    for layer_name, layer, norm in zip(model.layer_names, model.classifier(), model.info()["original_norms"]):
        assert float(norm64(layer.weight.detach())) == pytest.approx(norm, rel=1e-5)
        assert norm == pytest.approx(float(norm64(modules[layer_name].weight.detach())))
        assert F.cosine_similarity(layer.weight.flatten(), modules[layer_name].weight.flatten(), dim=0) < 0.5
    assert 0 <= model.result["after"]["acc"] <= 1
