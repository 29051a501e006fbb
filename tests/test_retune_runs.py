"""`grid.py retune` (experiments/retune.py): the retuning attack again on finished runs' saved defended models. With
the runs' own settings it must reproduce their retuning exactly; with other settings, what a run made with those
settings records; and the reference rows must not depend on which defense measured them (NPD hooks its polarizer
onto the attacked network from construction: a copy of that network retuned the polarizer too)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from experiments.grid import Grid
from tests.helpers import write_grid

K = 2  # the grid's k; the retuning set is 20% of digits' training set


def grid_spec(tmp: Path, k: int) -> Path:
    defenses = {"defenses": ["ft", "npd"], "spc": [2], "split_seeds": [0],
                "args": ["--trainer.enable_model_summary", "false"],
                "per_defense_args": {"ft": ["--trainer.max_epochs", "3"],
                                     "npd": ["--trainer.max_epochs", "2", "--model.init_args.warmup_epochs", "1"]},
                "retune": {"k": k, "fraction": 0.2}}
    return write_grid(tmp, defenses=defenses)


def run_all(grid: Grid, order: list[str] | None = None) -> None:
    from experiments.runner import attack_job, defense_job, execute

    attacks = grid.attack_runs()
    runs = sorted(grid.defense_runs(attacks), key=lambda r: (order or []).index(r.defense) if order else 0)
    for job in [*(attack_job(grid, a) for a in attacks), *(defense_job(grid, d) for d in runs)]:
        assert execute(job)["status"] == "done"


def records(runs: Path) -> dict[str, dict]:
    """defense name -> result.json of the runs under `runs`."""
    out = {}
    for path in runs.glob("defenses/*/*/result.json"):
        record = json.loads(path.read_text())
        out[record["defense"]] = record
    return out


@pytest.fixture(scope="module")
def grid_file(tmp_path_factory) -> Path:
    """The tiny grid with FT and NPD at SPC 2, retuned with k = 2 as they ran (~15 s)."""
    path = grid_spec(tmp_path_factory.mktemp("source"), K)
    run_all(Grid.load(path))
    return path


@pytest.fixture(scope="module")
def source(grid_file) -> Path:
    return grid_file.parent / "runs"


def retune(src: Path, dst: Path, *sets: str) -> dict:
    from experiments.retune import parse_changes, retune_runs

    return retune_runs(src, dst, parse_changes(list(sets)), progress=False)


def test_the_runs_own_settings_reproduce_their_retuning(source, tmp_path) -> None:
    outcome = retune(source, tmp_path / "again", f"k={K}")
    assert outcome == {"runs": 2, "done": 2, "failures": []}
    before, again = records(source), records(tmp_path / "again")
    assert sorted(again) == ["FT", "NPD"]
    for name, record in again.items():
        assert record["retuned_from"]["after_drift"] == 0.0, name
        assert record["after"] == before[name]["after"]
        new, old = record["retuned"], before[name]["retuned"]
        assert {k: new[k] for k in ("rta_acc", "rta_asr", "rta_ra", "k", "size")} == \
            {k: old[k] for k in ("rta_acc", "rta_asr", "rta_ra", "k", "size")}, name
        assert new["references"]["backdoored"] == old["references"]["backdoored"]
        assert new["references"]["source"] == "cache"  # measured by the grid's first run, read here
    keys = [json.loads(p.read_text())["key"] for p in (tmp_path / "again").glob("defenses/*/*/run.json")]
    assert all("+rta-" in key for key in keys)
    assert retune(source, tmp_path / "again", f"k={K}")["done"] == 2, "resumable: finished runs are kept"


def test_other_settings_give_what_a_run_with_them_records(grid_file, source, tmp_path) -> None:
    """k = 1 after the fact equals the same grid run with k = 1; there NPD runs first and measures the reference
    rows, here FT does: they must agree."""
    retune(source, tmp_path / "posthoc", "k=1")
    spec = yaml.safe_load(grid_file.read_text())
    spec["runs_dir"] = str(tmp_path / "rerun")
    spec["defenses"]["retune"]["k"] = 1
    (tmp_path / "rerun.yaml").write_text(yaml.safe_dump(spec))
    shutil.copytree(source / "attacks", tmp_path / "rerun" / "attacks")  # the same model (keys), a fresh cache
    for cache in (tmp_path / "rerun" / "attacks").glob("*/checkpoints/last.retuned"):
        shutil.rmtree(cache)
    run_all(Grid.load(tmp_path / "rerun.yaml"), order=["npd", "ft"])
    posthoc, rerun = records(tmp_path / "posthoc"), records(tmp_path / "rerun")
    assert rerun["NPD"]["retuned"]["references"]["source"] == "measured"
    for name in ("FT", "NPD"):
        new, old = posthoc[name]["retuned"], rerun[name]["retuned"]
        assert new["k"] == old["k"] == 1 and new["poisons"] == 1
        assert posthoc[name]["after"] == rerun[name]["after"], "the same defended model"
        assert (new["rta_acc"], new["rta_asr"], new["rta_ra"]) == (old["rta_acc"], old["rta_asr"], old["rta_ra"])
        assert new["references"]["backdoored"] == old["references"]["backdoored"], name
    assert posthoc["FT"]["retuned_from"]["retuned"]["k"] == K


def test_bad_settings_and_runs_without_a_checkpoint(source, tmp_path) -> None:
    from experiments.retune import parse_changes

    for items, message in ((["kk=1"], "expected <setting>=<value>"), (["k=0"], "invalid k=0"),
                           ([], "nothing to change"), (["fraction=2"], "invalid fraction=2")):
        with pytest.raises(SystemExit, match=message):
            parse_changes(items)
    copy = tmp_path / "copy"
    shutil.copytree(source / "defenses", copy / "defenses")
    for checkpoint in copy.glob("defenses/*/ft-*/checkpoints/last.ckpt"):
        checkpoint.unlink()
    outcome = retune(copy, tmp_path / "out", "k=1")
    assert outcome["done"] == 1 and len(outcome["failures"]) == 1
    assert "no defended checkpoint" in outcome["failures"][0]["error"]
    with pytest.raises(FileNotFoundError, match="no finished defense runs"):
        retune(tmp_path / "empty", tmp_path / "out2", "k=1")
