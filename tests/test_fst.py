"""FST: the classifier is re-initialised, keeps its original norm after every step and is pushed away from the
original weights by the inner-product term; the result depends on D_m only; bad settings fail clearly."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_modules.checkpoint import load_attacked
from lightning_modules.defenses import FST
from lightning_modules.defenses.fst import norm64


class StepNorms(L.Callback):
    """The classifier weights' norms after every training batch (i.e. after every optimiser step)."""

    def __init__(self) -> None:
        self.norms: list[list[float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.norms.append([float(norm64(layer.weight.detach())) for layer in module.classifier()])


def run_fst(run_defense, path, epochs: int = 2, n_test: int | None = 32, noise: bool = False, callbacks=(),
            **kwargs) -> FST:
    return run_defense(FST, path, epochs=epochs, data={"n_test": n_test, "noise": noise}, callbacks=callbacks,
                       save_defended=False, **kwargs)


def test_norm_kept_after_every_step_and_classifier_reinitialised(backdoored_checkpoint, run_defense) -> None:
    path = backdoored_checkpoint["path"]
    original = load_attacked(str(path)).net.linear
    norm = float(norm64(original.weight.detach()))
    steps = StepNorms()
    model = run_fst(run_defense, path, callbacks=[steps])
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


def test_reinit_happens_after_the_before_measurement(backdoored_checkpoint, run_defense) -> None:
    path = backdoored_checkpoint["path"]
    model = run_fst(run_defense, path, epochs=0, n_test=None)
    assert model.result["before"]["acc"] == pytest.approx(backdoored_checkpoint["metrics"]["test/acc"], abs=1e-6)
    assert not torch.equal(model.net.linear.weight, load_attacked(str(path)).net.linear.weight)


def test_inner_product_term_pushes_omega_away(backdoored_checkpoint, run_defense) -> None:
    path = backdoored_checkpoint["path"]
    cosine = {alpha: run_fst(run_defense, path, alpha=alpha).info()["cosine_to_original"][0]
              for alpha in (0.0, 5.0)}
    assert cosine[5.0] < -0.3 and cosine[5.0] < cosine[0.0] - 0.3


def test_depends_on_dm_only(backdoored_checkpoint, run_defense) -> None:
    """The defended weights are the same when the benchmark's test sets are replaced by noise."""
    path = backdoored_checkpoint["path"]
    plain = run_fst(run_defense, path, n_test=None)
    swapped = run_fst(run_defense, path, n_test=None, noise=True)
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
