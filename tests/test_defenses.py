"""Every registered defense, end to end on the tiny backdoored model (tests/conftest.py), through train.py:
a complete result record whose before-numbers match a direct evaluation, after-numbers that the Lightning
test loop and `train.py test` on the defended checkpoint reproduce."""

from __future__ import annotations

import json
import math

import pytest

from lightning_modules.defenses import DEFENSES
from tests.conftest import CONFIGS, run_cli

# The fewest epochs / iterations that still run every phase of each method (its YAML holds the defaults).
FAST: dict[str, list[str]] = {
    "ft": ["--trainer.max_epochs", "2"],
    "fp": ["--trainer.max_epochs", "1"],  # pruning, then one fine-tuning epoch with the mask kept
    "bnp": [],
    "clp": [],
    "anp": ["--trainer.max_steps", "2", "--data.samples_per_epoch", "256"],
    "awm": ["--trainer.max_epochs", "2"],
    "rnp": ["--trainer.max_epochs", "2", "--model.unlearn_epochs", "2"],
    "mmbd": ["--trainer.max_epochs", "2", "--model.lam_every", "1"],
    "npd": ["--trainer.max_epochs", "2", "--model.warmup_epochs", "1"],
    "fst": ["--trainer.max_epochs", "2"],
    "bcu": ["--trainer.max_epochs", "2"],  # re-initialisation, then two epochs (two temperatures)
    "ftsam": ["--trainer.max_epochs", "2"],
    "nad": ["--trainer.max_epochs", "1", "--model.teacher_epochs", "1"],  # a teacher epoch, a student epoch
    # NC: a 1-epoch search of 2 steps and a tiny anomaly threshold flag classes, so that the unlearning epoch runs
    "nc": ["--trainer.max_epochs", "1", "--model.search_epochs", "1", "--model.search_batch_size", "50",
           "--model.anomaly_threshold", "1e-6"],
    "pbe": ["--trainer.max_epochs", "2"],
    "sau": ["--trainer.max_epochs", "2"],
    "ibau": ["--trainer.max_epochs", "1"],  # one round: delta search, one step with 1 of 100 images patched
}
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
RESULT_KEYS = {"attack", "defense", "dataset", "backbone", "poison_ratio", "spc", "split_seed", "before",
               "after", "arr", "rdr", "der", "rir", "seconds", "defense_info", "config", "dm_source"}


def defense_args(name: str, checkpoint) -> list[str]:
    return ["--config", str(CONFIGS / "defense" / f"{name}.yaml"), "--model.backdoored", str(checkpoint),
            "--data.spc", "10", "--data.split_seed", "1", *FAST.get(name, []), *QUIET]


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_defense_end_to_end(name: str, backdoored_checkpoint, tmp_path) -> None:
    assert name in FAST, f"add the test-time shortening of {name} to FAST"
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
        # the Lightning test loop right after fit measures the same defended model
        assert float(cli.trainer.callback_metrics[f"test/{k}"]) == pytest.approx(result["after"][k], abs=1e-6)
    assert result["arr"] == pytest.approx((result["before"]["acc"] - result["after"]["acc"]) / result["before"]["acc"])
    assert result["rdr"] == pytest.approx((result["before"]["acc"] - result["after"]["ra"]) / result["before"]["acc"])
    assert result["seconds"]["defense"] >= 0 and not math.isnan(result["seconds"]["total"])
    # `train.py test` on the defended checkpoint reproduces the after-numbers
    tested = run_cli("test", "--config", str(run_dir / "config.yaml"),
                     "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"), cwd=tmp_path)
    for k in ("acc", "asr", "ra"):
        assert float(tested.trainer.callback_metrics[f"test/{k}"]) == pytest.approx(result["after"][k], abs=1e-6)


def test_random_backbone_checkpoint_loads(backbone_checkpoint) -> None:
    from lightning_modules.defenses import FT

    for name in ("preact_resnet18", "small_cnn"):
        defense = FT(str(backbone_checkpoint(name)))
        assert defense.spec.name == "digits" and defense.backdoor_record["attack"]["name"] == "BadNets"


def test_resuming_a_defense_run_is_refused(backdoored_checkpoint, tmp_path) -> None:
    """`fit --ckpt_path` would measure "before" and re-run prepare() on already defended weights."""
    run_cli("fit", *defense_args("ft", backdoored_checkpoint["path"]), cwd=tmp_path)
    defended = tmp_path / "runs" / "ft-spc10-seed1" / "version_0" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="resuming a defense run .* is not supported"):
        run_cli("fit", *defense_args("ft", backdoored_checkpoint["path"]), "--ckpt_path", str(defended), cwd=tmp_path)
