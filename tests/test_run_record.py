"""The run records (datamodules/record.py): versioned, read back from older versions, the only source of a results
row's identity; one function names runs; the grid's training seed is an explicit choice; a defended checkpoint
loads without the attacked checkpoint it was made from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from datamodules.record import (
    BACKDOOR_KEY,
    SCHEMA_VERSION,
    defense_run_name,
    load_checkpoint,
    read_attack_result,
    read_record,
    read_result,
)
from tests.conftest import CONFIGS, run_cli

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
FAST = {"ft": ["--trainer.max_epochs", "2"], "npd": ["--trainer.max_epochs", "2", "--model.warmup_epochs", "1"]}


# -- versions ---------------------------------------------------------------------------------------------------
def test_older_records_are_read_as_version_1(backbone_checkpoint) -> None:
    ckpt = load_checkpoint(backbone_checkpoint("small_cnn"))
    legacy = {k: v for k, v in ckpt[BACKDOOR_KEY].items() if k != "schema_version"} | {"version": 1}
    record = read_record({BACKDOOR_KEY: legacy})
    assert record["schema_version"] == SCHEMA_VERSION and "version" not in record
    assert record["attack"]["name"] == "BadNets" and record["backbone"]["class_path"].endswith("SmallCNN")
    with pytest.raises(ValueError, match="schema_version 99 .* newer version"):
        read_record({BACKDOOR_KEY: {**record, "schema_version": 99}})

    result = read_result({"defense": "FT", "split_seed": 3})  # result.json before `seed`
    assert result["schema_version"] == SCHEMA_VERSION and result["seed"] is None

    # attack.json before the record: the grid's planned fields; what the run was comes from its checkpoint
    old = {"key": "k", "fields": {"attack": "badnets", "poison_ratio": 0.5, "seed": 4},
           "metrics": {"test/acc": 0.9}, "seconds": 1.0}
    attack = read_attack_result(old, lambda: {**ckpt, "epoch": 7})
    assert (attack["attack"], attack["poison_ratio"], attack["backbone"]) == ("BadNets", 0.1, "SmallCNN")
    assert (attack["seed"], attack["epochs"], attack["dataset"]) == (4, 7, "digits")
    assert attack["trigger"]["class_path"].endswith("BadNets") and "state" not in attack["trigger"]
    assert read_attack_result(dict(attack), lambda: pytest.fail("a current record needs no checkpoint")) == attack


# -- results rows -------------------------------------------------------------------------------------------------
def test_rows_take_what_a_run_was_from_its_record(tmp_path) -> None:
    """The grid's run.json names a run; where it disagrees with the record (a per-attack override of the ratio
    axis), the row says what the record says."""
    from experiments.results import collect, wandb_rows

    run = tmp_path / "defenses" / "a-key" / "ft-spc10-seed0-h"
    run.mkdir(parents=True)
    planned = {"dataset": "digits", "attack": "lira", "backbone": "small_cnn", "poison_ratio": 0.1, "seed": 0,
               "defense": "ft", "spc": 10, "split_seed": 0}
    (run / "run.json").write_text(json.dumps({"kind": "defense", "key": f"a-key/{run.name}", "fields": planned}))
    scores = {"acc": 0.9, "asr": 0.1, "ra": 0.8}
    record = {"schema_version": SCHEMA_VERSION, "dataset": "digits", "attack": "LIRA", "backbone": "SmallCNN",
              "poison_ratio": 1.0, "defense": "FT", "spc": 10, "split_seed": 0, "seed": 5, "before": scores,
              "after": scores, "arr": 0.0, "rdr": 0.1, "der": 0.5, "rir": 0.7, "seconds": {"load": 0.5, "before": 0.2, "method": 1, "after": 0.3, "total": 2},
              "before_source": "measured"}
    (run / "result.json").write_text(json.dumps(record))
    row = collect(tmp_path).iloc[0]
    assert (row["attack"], row["backbone"], row["poison_ratio"], row["defense"], row["seed"]) == \
        ("LIRA", "SmallCNN", 1.0, "FT", 5)
    assert "method" not in row.index, "one spelling, one column"

    summary = {f"{stage}/{m}": v for stage in ("before", "after") for m, v in scores.items()}
    summary |= {k: record[k] for k in ("arr", "rdr", "der", "rir")}
    logged = SimpleNamespace(summary=summary, config={"grid": planned, "run_key": "a-key/x", "result": record},
                             name="x", path=["me", "bench", "id"])
    assert wandb_rows([logged])[0]["poison_ratio"] == 1.0, "a W&B row is its logged record too"


# -- names and seeds ----------------------------------------------------------------------------------------------
def write_grid(tmp_path: Path, **defenses) -> Path:
    spec = {"name": "tiny", "runs_dir": str(tmp_path / "runs"),
            "attacks": {"datasets": ["digits"], "attacks": ["badnets"], "backbones": ["small_cnn"],
                        "poison_ratios": [0.1]},
            "defenses": {"defenses": ["ft"], "spc": [2], "split_seeds": [0, 3], **defenses}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def argument(args: tuple[str, ...], name: str) -> str:
    return args[args.index(name) + 1]


def test_one_name_for_grid_keys_and_train_py_runs(tmp_path) -> None:
    from experiments.grid import Grid
    from lightning_modules.cli import run_name

    run = Grid.load(write_grid(tmp_path)).defense_runs()[1]
    config = {"model.init_args.backdoored": "x.ckpt", "model": SimpleNamespace(class_path="lightning_modules.FT"),
              "data.init_args.spc": 2, "data.init_args.ratio": None, "data.init_args.split_seed": 3}
    assert run.key == f"{run_name(config)}-{run.digest}" == f"{defense_run_name('ft', 2, 3)}-{run.digest}"


def test_the_training_seed_is_a_grid_choice(tmp_path) -> None:
    from experiments.grid import Grid

    default = Grid.load(write_grid(tmp_path)).defense_runs()
    assert [argument(r.args, "--seed_everything") for r in default] == ["0", "3"], "the split seed, as before"
    assert Grid.load(write_grid(tmp_path, seed_everything="split_seed")).defense_runs() == default
    fixed = Grid.load(write_grid(tmp_path, seed_everything=7)).defense_runs()
    assert [argument(r.args, "--seed_everything") for r in fixed] == ["7", "7"]
    assert [argument(r.args, "--data.split_seed") for r in fixed] == ["0", "3"]
    assert {r.digest for r in fixed}.isdisjoint(r.digest for r in default), "another seed, other runs"
    for bad in ("random", -1, True, [0]):
        with pytest.raises(ValueError, match="defenses.seed_everything: must be 'split_seed'"):
            Grid.load(write_grid(tmp_path, seed_everything=bad))


# -- a defended checkpoint on its own -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ft", "npd"])  # NPD adds parts outside the backbone (changes_architecture)
def test_defended_checkpoint_loads_after_the_attacked_one_is_gone(name, backdoored_checkpoint, tmp_path) -> None:
    from lightning_modules.defenses import load_defended

    attacked = tmp_path / "attack run" / "last.ckpt"
    attacked.parent.mkdir()
    shutil.copy(backdoored_checkpoint["path"], attacked)
    run_cli("fit", "--config", str(CONFIGS / "defense" / f"{name}.yaml"), "--model.backdoored", str(attacked),
            "--data.spc", "10", "--data.split_seed", "1", "--seed_everything", "5", *FAST[name], *QUIET, cwd=tmp_path)
    run_dir = tmp_path / "runs" / f"{name}-spc10-seed1" / "version_0"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["schema_version"] == SCHEMA_VERSION and (result["seed"], result["split_seed"]) == (5, 1)

    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_defended(run_dir / "checkpoints" / "last.ckpt")(x)
    moved = tmp_path / "elsewhere" / "defended.ckpt"
    moved.parent.mkdir()
    shutil.copy(run_dir / "checkpoints" / "last.ckpt", moved)
    shutil.rmtree(attacked.parent)

    model = load_defended(moved)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert model.backdoor_record["attack"]["name"] == "BadNets"
    # the README's `train.py test` on the run's config.yaml, which names the attacked checkpoint that is gone
    tested = run_cli("test", "--config", str(run_dir / "config.yaml"), "--ckpt_path", str(moved), *QUIET, cwd=tmp_path)
    for k in ("acc", "asr", "ra"):
        assert float(tested.trainer.callback_metrics[f"test/{k}"]) == pytest.approx(result["after"][k], abs=1e-6)
