"""Every registered defense, end to end on the tiny backdoored model (tests/conftest.py), through train.py:
a complete result record whose before-numbers match a direct evaluation, after-numbers that the Lightning
test loop and `train.py test` on the defended checkpoint reproduce. And every defense on every registered backbone
(untrained, at its test width): it finds its layers there and runs every phase."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
import yaml
from torch import nn

from lightning_modules.backbones import BACKBONES, layer_roles
from lightning_modules.checkpoint import load_attacked
from lightning_modules.defenses import DEFENSES
from lightning_modules.defenses.pruning import bn_layers
from tests.conftest import CONFIGS, run_cli
from tests.helpers import QUIET

RESULT_KEYS = {"attack", "defense", "dataset", "backbone", "poison_ratio", "spc", "split_seed", "before",
               "after", "arr", "rdr", "der", "rir", "seconds", "before_source", "defense_info", "config", "dm_source"}


def defense_args(name: str, checkpoint) -> list[str]:
    return ["--config", str(CONFIGS / "defense" / f"{name}.yaml"), "--model.backdoored", str(checkpoint),
            "--data.spc", "10", "--data.split_seed", "1", *DEFENSES[name].smoke_args, *QUIET]


# `train.py test` logs to a new version folder by design, so Lightning notes that the fitted run's checkpoint folder is
# not this run's: expected here
@pytest.mark.filterwarnings("ignore:The dirpath has changed")
@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_defense_end_to_end(name: str, backdoored_checkpoint, tmp_path) -> None:
    cli = run_cli("fit", *defense_args(name, backdoored_checkpoint["path"]), cwd=tmp_path)
    run_dir = tmp_path / "runs" / f"{name}-spc10-seed1" / "version_0"
    result = json.loads((run_dir / "result.json").read_text())
    assert RESULT_KEYS <= set(result), RESULT_KEYS - set(result)
    assert result["defense"] == DEFENSES[name].__name__ and result["attack"] == "BadNets"
    assert result["spc"] == 10 and result["split_seed"] == 1 and result["dataset"] == "digits"
    assert result["dm_source"] == "unpoisoned images"
    assert result["num_poisoned"] == len(backdoored_checkpoint["poison_indices"]) == 144
    for k in ("acc", "asr", "ra"):
        assert result["before"][k] == pytest.approx(backdoored_checkpoint["metrics"][f"test/{k}"], abs=1e-6)
        assert 0.0 <= result["after"][k] <= 1.0
    assert not any(k.startswith("test/") for k in cli.trainer.callback_metrics), "after is measured once, not tested"
    assert result["arr"] == pytest.approx((result["before"]["acc"] - result["after"]["acc"]) / result["before"]["acc"])
    assert result["rdr"] == pytest.approx((result["before"]["acc"] - result["after"]["ra"]) / result["before"]["acc"])
    seconds = result["seconds"]
    assert set(seconds) == {"load", "before", "method", "after", "total"} and min(seconds.values()) >= 0
    assert seconds["total"] == pytest.approx(sum(v for k, v in seconds.items() if k != "total"), abs=1e-3)
    assert result["before_source"] in ("measured", "cache")  # the session's other runs on this model may have measured
    # `train.py test` on the defended checkpoint reproduces the after-numbers
    tested = run_cli("test", "--config", str(run_dir / "config.yaml"),
                     "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"), cwd=tmp_path)
    for k in ("acc", "asr", "ra"):
        assert float(tested.trainer.callback_metrics[f"test/{k}"]) == pytest.approx(result["after"][k], abs=1e-6)


def test_resuming_a_defense_run_is_refused(backdoored_checkpoint, tmp_path) -> None:
    """`fit --ckpt_path` would measure "before" and re-run prepare() on already defended weights."""
    run_cli("fit", *defense_args("ft", backdoored_checkpoint["path"]), cwd=tmp_path)
    defended = tmp_path / "runs" / "ft-spc10-seed1" / "version_0" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="resuming a defense run .* is not supported"):
        run_cli("fit", *defense_args("ft", backdoored_checkpoint["path"]), "--ckpt_path", str(defended), cwd=tmp_path)


# -- every defense on every backbone ------------------------------------------------------------------------------
# The run: the defense's YAML with its smoke settings, on D_m of 1 image per class and 8 test images, with these
# changes where the default run would skip a backbone-specific path.
ON_BACKBONE: dict[str, dict[str, dict]] = {
    "anp": {"data": {"samples_per_epoch": 8}},  # steps of 8 draws, not 256
    "nc": {"model": {"mitigation": "prune"}},  # the prune layer is per backbone; unlearning is not
    "ibau": {"model": {"poison_fraction": 0.5, "fixed_point_steps": 2}},  # the double backward through every net
    "fp": {"model": {"prune_step": 0.25}, "data": {"spc": 2}},  # at most 4 pruning steps; D_v of 2 images
    "bnp": {"model": {"u": 1.0}},  # an untrained net's outliers at u = 3 may be none
    "rnp": {"model": {"threshold_step": 0.25}},
    "pbe": {"model": {"attack_steps": 1}},
    "sau": {"model": {"attack_steps": 1}},
}


def scalar(text: str):
    """A command-line value as the CLI types it (YAML alone reads 1e-6 as a string)."""
    value = yaml.safe_load(text)
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def backbone_run(name: str) -> tuple[dict, dict, dict]:
    """(defense, datamodule, Trainer) arguments: configs/defense/<name>.yaml, its smoke settings, ON_BACKBONE."""
    config = yaml.safe_load((CONFIGS / "defense" / f"{name}.yaml").read_text())
    parts = {"model": dict(config["model"].get("init_args") or {}), "trainer": dict(config.get("trainer") or {}),
             "data": {**(config.get("data", {}).get("init_args") or {}), "spc": 1, "n_test": 8}}
    args = DEFENSES[name].smoke_args
    for flag, value in zip(args[::2], args[1::2]):
        part, _, key = flag.removeprefix("--").partition(".")
        parts[part][key] = scalar(value)
    for part, values in ON_BACKBONE.get(name, {}).items():
        parts[part].update(values)
    return parts["model"], parts["data"], parts["trainer"]


class Gradients(L.Callback):
    """Per training batch, the names of the parameters that ended it with a nonzero gradient."""

    def __init__(self) -> None:
        self.nonzero: list[set[str]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.nonzero.append({n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0})


def changed(state: dict, original: dict) -> list[str]:
    return [k for k, v in original.items() if v.is_floating_point() and not torch.equal(state[k], v)]


# What each method must have done on any backbone: (defense, the original net's state, its Gradients, the backbone).
def check_anp(d, original, grads, backbone) -> None:
    info = d.info()
    assert len(info["val_acc_curve"]) == 19 and info["mask"]["min"] < 1.0


def check_awm(d, original, grads, backbone) -> None:
    # the masks are in the graph (an untrained net in eval mode may push them all up against the clip at 1)
    assert any(n.startswith("neuron_masks") for n in grads.nonzero[0]), grads.nonzero[0]


def check_bcu(d, original, grads, backbone) -> None:
    info = d.info()
    layers = [n for n, m in d.net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(info["reinit"]) == sorted(layers) == sorted(info["reinit_fraction"])
    assert len(info["epochs"]) == d.trainer.max_epochs and all(math.isfinite(e["kl"]) for e in info["epochs"])


def check_bnp(d, original, grads, backbone) -> None:
    info, layers = d.info(), dict(bn_layers(d.net))
    assert set(info["pruned_per_layer"]) == set(layers) and info["num_images"] == 10
    zeroed = sum(int(((bn.weight == 0) & (bn.bias == 0)).sum()) for bn in layers.values())
    assert zeroed == info["pruned_total"] > 0  # untrained: BN weights start at 1, only pruning zeroes them


def check_clp(d, original, grads, backbone) -> None:
    modules = dict(d.net.named_modules())
    assert len(d.pairs) == sum(isinstance(m, nn.BatchNorm2d) for m in modules.values())
    for bn, idx in d.pruned.items():
        assert torch.all(modules[bn].weight[idx] == 0) and torch.all(modules[bn].bias[idx] == 0)
    assert d.info()["pruned_total"] == sum(len(v) for v in d.pruned.values())


# the first Linear of each classifier head: FP prunes its input features (the pooled features; 512 x 7 x 7 on VGG)
FIRST_LINEAR = {"preact_resnet18": "linear", "vgg19_bn": "classifier.0", "efficientnet_b3": "classifier.1",
                "mobilenet_v3_large": "classifier.0", "small_cnn": "linear"}


def check_fp(d, original, grads, backbone) -> None:
    info = d.info()
    assert info["layer"] == FIRST_LINEAR.get(backbone, layer_roles(d.net).head[0])
    assert info["features"] == d.net.get_submodule(info["layer"]).in_features
    assert info["per_step"] == -(-info["features"] // 4) and info["tail_evaluation"]
    assert info["pruned_columns_zero"] and info["pruned"] == int(d.pruned.sum())


def check_fst(d, original, grads, backbone) -> None:
    norms = d.info()["original_norms"]
    assert d.info()["layers"] == d.layer_names and len(norms) == len(d.layer_names) > 0
    for layer_name, layer, norm in zip(d.layer_names, d.classifier(), norms):
        start = original[f"{layer_name}.weight"]
        assert norm == pytest.approx(float(start.double().norm()))  # re-initialised at the original norm
        assert float(layer.weight.detach().double().norm()) == pytest.approx(norm, rel=1e-5)
        assert torch.nn.functional.cosine_similarity(layer.weight.flatten(), start.flatten(), dim=0) < 0.5


def check_fine_tuning(d, original, grads, backbone) -> None:
    assert changed(d.net.state_dict(), original)


def check_ibau(d, original, grads, backbone) -> None:
    (only,) = d.info()["rounds"]
    assert only["patched_per_step"] == [5] and only["hypergradient_steps"] == 1
    assert math.isfinite(only["mean_loss"])


def check_mmbd(d, original, grads, backbone) -> None:
    assert d.layer_names and not changed(d.net.state_dict(), original)  # eval mode, only the bounds train
    assert all(n.startswith("bounds") for n in set().union(*grads.nonzero)) and grads.nonzero[0]


def check_nad(d, original, grads, backbone) -> None:
    info = d.info()
    modules = dict(d.net.named_modules())
    assert info["layers"] and all(n in modules for n in info["layers"])
    assert all(len(shape) == 3 for shape in info["feature_shapes"].values())
    assert len(info["student"]) == 1 and all(math.isfinite(v) for v in info["student"][0].values())
    # which attention terms can act at all: the survey's layers degenerate on all but PreAct-ResNet18
    expected = {"preact_resnet18": {"layer3": True, "layer4": True, "avgpool": False},
                "small_cnn": {"features.12": True, "features.16": True}}.get(backbone, {"avgpool": False})
    assert info["attention_active"] == expected
    # where they act, they are nonzero for a student that differs from its teacher
    assert all(info["student"][0][f"at/{n}"] > 0 for n, active in expected.items() if active)


def check_nc(d, original, grads, backbone) -> None:
    info = d.info()
    assert len(info["l1_norms"]) == len(info["anomaly_index"]) == 10
    # the pruning step again, for class 0's reversed trigger on D_m: only the chosen input neurons are zeroed
    weight = d.net.get_submodule(d.prune_layer).weight
    before = weight.detach().clone()
    x, y = d.mitigation_data("train")
    facts = d.prune(x, y, [0])
    pruned = torch.tensor(facts["pruned_neurons"], dtype=torch.long)
    assert facts["neurons"] == weight.shape[1] and facts["pruned"] == len(pruned) in facts["pruned_per_step"]
    kept = torch.ones(weight.shape[1], dtype=torch.bool)
    kept[pruned] = False
    assert (weight[:, pruned] == 0).all() and torch.equal(weight[:, kept], before[:, kept])


def check_npd(d, original, grads, backbone) -> None:
    target = d.net.get_submodule(d.info()["layer"])
    assert isinstance(target, nn.Conv2d) and d.polarizer[0].in_channels == target.in_channels
    assert not changed(d.net.state_dict(), original)  # only the polarizer trains
    assert d.info()["epochs"][-1]["phase"] == "npd"


def check_pbe(d, original, grads, backbone) -> None:
    assert [e["phase"] for e in d.info()["epochs"]] == ["adversarial", "clean"]


def check_rnp(d, original, grads, backbone) -> None:
    assert [n for n, _ in bn_layers(d.net)] == list(d.masks)
    masks = torch.cat([m.detach() for m in d.masks.values()])
    assert masks.min() >= 0 and masks.max() <= 1 and d.info()["unlearn"]["epochs"] >= 1


def check_sau(d, original, grads, backbone) -> None:
    assert len(d.info()["epochs"]) == d.trainer.max_epochs and changed(d.net.state_dict(), original)


def check_ims(d, original, grads, backbone) -> None:
    info = d.info()
    assert [info[p]["rounds"] for p in ("initial", "minimize", "minimize_l1")] == [1, 1, 1]
    convs = [n for n, m in d.net.named_modules() if isinstance(m, nn.Conv2d)]
    assert d.gates.names == convs and info["convs"] == len(convs) and not any(m._forward_hooks for m in d.net.modules())
    # the hooks reach every conv: the initial phase's loss on D_m has a gradient on each layer's selections (an
    # untrained net's near-uniform outputs may pin them at their clip at 1, so they need not have moved)
    x, _ = d.mitigation_data("train")
    with d.gates.attached(d.net), torch.enable_grad():
        terms = d.mask_terms(x, d.logits(x, None).detach(), None, 0.0)
        grads = torch.autograd.grad(sum(terms.values()), list(d.gates.selections))
    assert all(bool(g.abs().sum() > 0) for g in grads)
    gates = dict(zip(convs, (g.detach() for g in d.gates.values())))
    state = d.net.state_dict()  # only conv weights and biases changed: scaled by their channels' forward gates
    for key, value in original.items():
        layer, _, kind = key.rpartition(".")
        if layer in gates and kind in ("weight", "bias"):
            torch.testing.assert_close(state[key], value * (gates[layer].view(-1, 1, 1, 1) if kind == "weight"
                                                            else gates[layer]))
        else:
            assert torch.equal(state[key], value), key


def check_tsbd(d, original, grads, backbone) -> None:
    info = d.info()
    assert info["neurons_total"] == sum(d.net.get_submodule(n).out_channels for n in d.layer_names)
    assert info["neurons_reinit"] == int(0.05 * info["neurons_total"]) == sum(info["reinit_per_layer"].values())
    assert set(info["reinit_per_layer"]) <= set(d.layer_names) and info["weights_zeroed"] > 0
    assert info["unlearn"]["epochs"] >= 1 and len(info["epochs"]) == d.trainer.max_epochs
    assert changed(d.net.state_dict(), original) and all(math.isfinite(v) for v in info["epochs"][0].values())


def check_fmp(d, original, grads, backbone) -> None:
    info, every = d.info(), d.hparams.prune_every
    convs = {n: m.out_channels for n, m in d.net.named_modules() if isinstance(m, nn.Conv2d)}
    assert list(info["layers"]) == list(convs)  # every conv, in module order
    for name, layer in info["layers"].items():  # floor(C / k) pruned, the least robust of the conv
        assert layer["channels"] == convs[name] and layer["rated"] == (convs[name] >= every)
        assert len(layer.get("pruned", [])) == convs[name] // every
        assert not layer.get("pruned") or max(layer["pruned_acc"]) <= layer["kept_min_acc"]
    assert info["pruned_total"] == sum(c // every for c in convs.values()) > 0
    assert changed(d.net.state_dict(), original) and grads.nonzero[0]  # then fine-tuned


# BTI-DBF(U) and PAM mask the input of the classifier head (EfficientNet's: before its dropout)
HEAD_INPUT = {"preact_resnet18": "linear", "vgg19_bn": "classifier", "efficientnet_b3": "classifier",
              "mobilenet_v3_large": "classifier", "small_cnn": "linear"}


def check_btidbfu(d, original, grads, backbone) -> None:
    info = d.info()
    assert info["feature_layer"] == HEAD_INPUT.get(backbone, layer_roles(d.net).head[0])
    assert [r["round"] for r in info["rounds"]] == [0, 1] and 0 <= info["detected_target"] < 10  # 2nd: target push
    assert all(0 <= r["mask"]["mean"] <= 1 and math.isfinite(r["generator"]["loss"]) for r in info["rounds"])
    assert len(info["pretrain"]) == 1 and [e["round"] for e in info["unlearn"]] == [0, 1]
    assert changed(d.net.state_dict(), original) and grads.nonzero[0]  # unlearned


def check_pam(d, original, grads, backbone) -> None:
    check_btidbfu(d, original, grads, backbone)
    assert 0 < d.info()["unlearn"][0]["distance_to_backdoored"]


def check_nft(d, original, grads, backbone) -> None:
    # only the masks train (from the first step), each BN layer's within [alpha e^(-beta k), 1], folded into the weights
    assert grads.nonzero[0] and all(n.startswith("neuron_masks") for n in set().union(*grads.nonzero))
    masks, state = {n: m.detach() for n, m in d.masks().items()}, d.net.state_dict()
    assert list(masks) == [n for n, _ in bn_layers(d.net)] and len(d.floors) == len(masks)
    for k, (name, m) in enumerate(masks.items(), start=1):
        assert m.min() >= d.hparams.alpha * math.exp(-d.hparams.beta * k) - 1e-7 and m.max() <= 1
        assert torch.equal(state[f"{name}.weight"], original[f"{name}.weight"] * m)
    params = {n for n, _ in d.net.named_parameters()} - {f"{n}.weight" for n in masks}
    assert not [k for k in changed(state, original) if k in params]

CHECKS = {"anp": check_anp, "awm": check_awm, "bcu": check_bcu, "bnp": check_bnp, "btidbfu": check_btidbfu,
          "clp": check_clp, "fmp": check_fmp, "fp": check_fp, "fst": check_fst, "ft": check_fine_tuning,
          "ftsam": check_fine_tuning, "ibau": check_ibau, "ims": check_ims, "mmbd": check_mmbd, "nad": check_nad,
          "nc": check_nc, "nft": check_nft, "npd": check_npd, "pam": check_pam, "pbe": check_pbe, "rnp": check_rnp,
          "sau": check_sau, "tsbd": check_tsbd}
# pairs over the fast suite's budget, run with -m slow: FMP rates every conv channel one by one, 14,032 of them on
# the test-width EfficientNet-B3 (~20 s; MobileNetV3's depthwise and squeeze-excitation convs stay in the fast suite)
SLOW_PAIRS = {("fmp", "efficientnet_b3")}


@pytest.mark.parametrize(("name", "backbone"), [
    pytest.param(n, b, marks=[pytest.mark.slow] if (n, b) in SLOW_PAIRS else [], id=f"{n}-{b}")
    for n in sorted(DEFENSES) for b in sorted(BACKBONES)])
def test_every_defense_on_every_backbone(name: str, backbone: str, backbone_checkpoint, run_defense) -> None:
    assert name in CHECKS, f"add what {name} must have done on any backbone to CHECKS"
    path = backbone_checkpoint(backbone)
    original = load_attacked(str(path)).net.state_dict()
    model, data, trainer = backbone_run(name)
    grads = Gradients()
    defense = run_defense(name, path, epochs=trainer.pop("max_epochs", 1), data=data, trainer=trainer,
                          callbacks=[grads], save_defended=False, **model)
    assert defense.spec.name == "digits" and defense.backdoor_record["attack"]["name"] == "BadNets"
    state = defense.net.state_dict()  # the backbone keeps its modules and shapes
    assert state.keys() == original.keys() and all(state[k].shape == v.shape for k, v in original.items())
    assert all(0 <= defense.result["after"][k] <= 1 for k in ("acc", "asr", "ra"))
    json.dumps(defense.info())
    CHECKS[name](defense, original, grads, backbone)

