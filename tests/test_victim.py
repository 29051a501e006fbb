"""Victim training, its checkpoint (the backdoor record) and what defenses and notebooks rebuild from it."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch

from datamodules import BackdoorDataModule, MitigationDataModule
from datamodules.poisoning import poison_indices
from datamodules.triggers import Blended
from lightning_modules import VictimTraining
from lightning_modules.backbones import SmallCNN
from lightning_modules.checkpoint import load_attacked
from lightning_modules.metrics import AttackSuccessRate, RecoveryAccuracy


def evaluate(classifier, data: MitigationDataModule | BackdoorDataModule) -> dict[str, float]:
    x, y = data.tensors("clean")
    xb, ya, yt = data.tensors("backdoor")
    with torch.no_grad():
        pred, pred_bd = classifier(x).argmax(1), classifier(xb).argmax(1)
    return {"acc": (pred == y).float().mean().item(),
            "asr": AttackSuccessRate()(pred_bd, ya).item(), "ra": RecoveryAccuracy()(pred_bd, yt).item()}


def test_fixture_is_backdoored(backdoored_checkpoint) -> None:
    m = backdoored_checkpoint["metrics"]
    assert m["test/acc"] > 0.85 and m["test/asr"] > 0.9, m


def test_checkpoint_rebuilds_the_run(backdoored_checkpoint) -> None:
    run = load_attacked(backdoored_checkpoint["path"])
    record = run.record
    assert record["attack"]["name"] == "BadNets" and record["data"]["dataset"] == "digits"
    assert torch.equal(run.poison_indices, backdoored_checkpoint["poison_indices"])
    labels = BackdoorDataModule("digits").source.load("unused", "train")[1]
    assert torch.equal(run.poison_indices, poison_indices(labels, 0.1, seed=0))
    data = MitigationDataModule(spc=10, backdoored=str(backdoored_checkpoint["path"]),
                                data_dir=str(backdoored_checkpoint["data_dir"]))
    data.setup("fit")
    measured = evaluate(run.classifier, data)
    logged = backdoored_checkpoint["metrics"]
    for name in ("acc", "asr", "ra"):
        assert measured[name] == pytest.approx(logged[f"test/{name}"], abs=1e-6)


def test_mitigation_set_from_checkpoint(backdoored_checkpoint) -> None:
    data = MitigationDataModule(spc=10, split_seed=3, val_fraction=0.1, backdoored=str(backdoored_checkpoint["path"]))
    data.setup("fit")
    split = data.split
    assert len(split.train) == 90 and len(split.val) == 10
    poisoned = backdoored_checkpoint["poison_indices"]
    assert not torch.isin(torch.cat([split.train, split.val]), poisoned).any()
    x, y = data.tensors("train")
    assert x.dtype == torch.uint8 and torch.bincount(y).tolist() == [9] * 10
    assert data.record()["val_convention"].startswith("fork")
    with pytest.raises(ValueError, match="exactly one of spc and ratio"):
        MitigationDataModule(spc=10, ratio=0.05)
    too_many = MitigationDataModule(spc=500, backdoored=str(backdoored_checkpoint["path"]))
    with pytest.raises(ValueError, match=r"class \d has \d+ clean training images"):
        too_many.setup("fit")


def test_clean_label_dm_takes_clean_originals(tmp_path) -> None:
    """A SIG record poisoning every class-0 image (digits: 142 of 1,438, ratio 0.0987): the defender's D_m for
    class 0 are the clean originals of poisoned images, the images are the clean source's, and the record says
    where D_m came from. A dirty-label record with the same indices is refused: no clean-label fallback there."""
    from datamodules.datasets import Digits
    from datamodules.record import BACKDOOR_KEY, RECORD_VERSION
    from datamodules.triggers import SIG, BadNets
    from lightning_modules.backbones import backbone_config

    x0, labels = Digits().load("data", "train")
    every_zero = poison_indices(labels, 142 / len(labels), 0, target=0, clean_label=True)
    assert len(every_zero) == int((labels == 0).sum()) == 142
    paths = {}
    for trigger in (SIG(), BadNets()):
        record = {"version": RECORD_VERSION, "backbone": {**backbone_config(SmallCNN), "init_args": {}},
                  "data": {"dataset": "digits", "data_dir": "data", "spec": Digits.spec.to_dict()},
                  "attack": {"name": type(trigger).__name__, "trigger": trigger.record(), "target": 0,
                             "mode": "all_to_one", "poison_ratio": 0.0987, "poison_seed": 0,
                             "ratio_over_target": False, "clean_label": trigger.clean_label,
                             "training_controlled": False, "poison_indices": every_zero}}
        paths[trigger.clean_label] = tmp_path / f"{type(trigger).__name__}.ckpt"
        state = {f"net.{k}": v for k, v in SmallCNN(10).state_dict().items()}
        torch.save({"state_dict": state, BACKDOOR_KEY: record, "hyper_parameters": {}}, paths[trigger.clean_label])
    data = MitigationDataModule(spc=10, split_seed=0, backdoored=str(paths[True]))
    data.setup("fit")
    x, y = data.tensors("train")
    assert torch.bincount(y).tolist() == [10] * 10
    assert torch.equal(x, x0[data.split.train])  # the clean originals, not SIG-triggered images
    assert torch.isin(data.split.train, every_zero).sum() == 10
    assert data.record()["dm_source"] == "unpoisoned images + clean originals of poisoned images (class 0: 10)"
    with pytest.raises(ValueError, match=r"class 0 has 0 clean training images \(142 of its 142"):
        MitigationDataModule(spc=10, backdoored=str(paths[False])).setup("fit")


def test_notebook_load_from_checkpoint(backdoored_checkpoint) -> None:
    module = VictimTraining.load_from_checkpoint(backdoored_checkpoint["path"], map_location="cpu")
    run = load_attacked(backdoored_checkpoint["path"])
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    module.eval()
    with torch.no_grad():
        assert torch.allclose(module(x), run.classifier(x), atol=1e-5)


def test_python_api_checkpoint_is_safe(tmp_path) -> None:
    """A backbone given as functools.partial is recorded as a config: the file loads with weights_only."""
    data = BackdoorDataModule("digits", trigger=Blended(), cache_dir=str(tmp_path / "cache"))
    model = VictimTraining(functools.partial(SmallCNN, width=4))
    trainer = L.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, data)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["backbone"] == {
        "class_path": "core.backbones.small_cnn.SmallCNN", "init_args": {"width": 4}}
    assert load_attacked(tmp_path / "m.ckpt").trigger.alpha == 0.2
    assert list((tmp_path / "cache").glob("*.pt")), "the poisoned copy was cached"


def test_cache_is_reused_and_survives_corruption(tmp_path) -> None:
    def poisoned_train() -> torch.Tensor:
        data = BackdoorDataModule("digits", trigger=Blended(), cache_dir=str(tmp_path))
        data.setup("fit")
        return data.tensors("train")[0]

    first = poisoned_train()
    (entry,) = tmp_path.glob("*.pt")
    entry.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable cache entry"):
        assert torch.equal(poisoned_train(), first)
    assert torch.equal(poisoned_train(), first)


def test_bf16_mixed_precision_on_cpu() -> None:
    data = BackdoorDataModule("digits", trigger=Blended(), batch_size=32, cache_dir=None)
    model = VictimTraining(functools.partial(SmallCNN, width=8))
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", precision="bf16-mixed", logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    assert trainer.state.finished and torch.isfinite(trainer.callback_metrics["train/loss"])


def test_clean_training_has_no_backdoor_metrics() -> None:
    data = BackdoorDataModule("digits", trigger=None, batch_size=64, cache_dir=None)
    model = VictimTraining(functools.partial(SmallCNN, width=4))
    trainer = L.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, data)
    assert "val/acc" in trainer.callback_metrics and "val/asr" not in trainer.callback_metrics


def test_compile_mode_is_checked() -> None:
    with pytest.raises(ValueError, match="compile_mode must be None or one of"):
        VictimTraining(functools.partial(SmallCNN, width=4), compile_mode="fastest")


class _FirstWeights(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.state = {k: v.clone() for k, v in pl_module.net.state_dict().items()}


def _train_steps(compile_mode: str | None, accelerator: str = "cpu") -> tuple[VictimTraining, dict]:
    L.seed_everything(0)
    data = BackdoorDataModule("digits", trigger=Blended(), batch_size=32, cache_dir=None)
    model, first = VictimTraining(functools.partial(SmallCNN, width=4), compile_mode=compile_mode), _FirstWeights()
    trainer = L.Trainer(max_steps=3, accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[first])
    trainer.fit(model, data)
    return model, first.state


def _assert_same_steps(eager: tuple[VictimTraining, dict], other: tuple[VictimTraining, dict], atol: float) -> None:
    (a, a_first), (b, b_first) = eager, other
    for name, value in a.net.state_dict().items():
        assert torch.equal(a_first[name], b_first[name]), f"{name}: the runs did not start from the same weights"
        assert torch.allclose(b.net.state_dict()[name].float(), value.float(), atol=atol), name
    assert not torch.equal(a.net.state_dict()["features.0.weight"], a_first["features.0.weight"]), "no step taken"


@pytest.mark.slow
def test_compiled_training_matches_eager() -> None:
    """`compile_mode` compiles the backbone (so the compiled call ran) and changes neither the updates (the same
    three SGD steps as eager, up to kernel rounding) nor the state-dict keys checkpoints hold."""
    eager, compiled = _train_steps(None), _train_steps("default")
    assert eager[0].net._compiled_call_impl is None and compiled[0].net._compiled_call_impl is not None
    assert list(compiled[0].state_dict()) == list(eager[0].state_dict())
    _assert_same_steps(eager, compiled, atol=1e-4)


@pytest.mark.gpu
def test_cuda_graph_training_runs() -> None:
    """CUDA graphs (`compile_mode` "reduce-overhead") on a GPU: three steps train and match eager closely."""
    eager, graphed = _train_steps(None, "cuda"), _train_steps("reduce-overhead", "cuda")
    assert graphed[0].net._compiled_call_impl is not None
    _assert_same_steps(eager, graphed, atol=1e-3)
