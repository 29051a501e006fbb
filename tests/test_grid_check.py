"""`grid.py check`: infeasible cells of a grid are found before anything trains (clean-label ratios, SPC against
the poisoned training set, typos in configs and overrides, bad grid files), missing data is said and counted, the
survey grid passes, and `grid.py run` / `grid.py sweep` refuse an infeasible grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from datamodules.poisoning import poison_indices
from datamodules.triggers import TRIGGERS
from datamodules.splits import split_by_spc
from experiments.grid import Grid
from grid import main
from tests.conftest import CONFIGS, write_synthetic_prepared
from tests.helpers import write_grid


def check(path: Path, capsys) -> tuple[int, list[str]]:
    """(exit status, printed lines) of `grid.py check <path>`."""
    try:
        main(["check", str(path)])
        status = 0
    except SystemExit as end:
        status = end.code
    return status, capsys.readouterr().out.splitlines()


def grid_file(tmp_path: Path, datasets=("digits",), attacks=("badnets",), ratios=(0.1,), spc=(2,)) -> Path:
    """write_grid's tiny grid (FT at every SPC over 3 split seeds, CLP once at the first) with other datasets,
    attacks, ratios and SPCs."""
    path = write_grid(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["attacks"] |= {"datasets": list(datasets), "attacks": list(attacks), "poison_ratios": list(ratios)}
    spec["defenses"]["spc"] = list(spc)
    path.write_text(yaml.safe_dump(spec))
    return path


def cells(path: Path) -> int:
    grid = Grid.load(path)
    attacks = grid.attack_runs()
    return len(attacks) + len(grid.defense_runs(attacks))


def test_clean_label_ratio_beyond_the_target_class(tmp_path, capsys) -> None:
    """digits' class 0 holds 142 of 1,438 training images: SIG (clean-label) at 0.1 asks for 144, at 0.05 for 72.
    The attack at 0.1 and its 4 defense runs are infeasible, reported in one line naming run and fix."""
    path = grid_file(tmp_path, attacks=["sig"], ratios=[0.05, 0.1])
    status, lines = check(path, capsys)
    assert status == 1
    assert lines[-1] == f"{cells(path)} cells, 5 infeasible"
    [problem] = lines[:-1]
    assert problem.startswith("dataset digits; attack sig; poison ratio 0.1 (1 attacked model, 4 defense runs): ")
    assert "class 0 has 142" in problem and "poison_ratio <= 0.0987" in problem
    assert "exclude: [{dataset: digits, attack: sig, poison_ratio: 0.1}]" in problem


def test_spc_beyond_the_unpoisoned_images_of_a_class(tmp_path, capsys) -> None:
    """SPC 130: every digits class has >= 139 images, but BadNets at 0.1 leaves class 1 with 124 unpoisoned ones,
    so only BadNets' FT runs at SPC 130 are infeasible (CLP runs once, at the first SPC). The verdicts agree with
    datamodules/splits.py itself."""
    path = grid_file(tmp_path, attacks=["clean", "badnets"], spc=[2, 130])
    status, lines = check(path, capsys)
    assert status == 1 and lines[-1] == f"{cells(path)} cells, 3 infeasible"
    [problem] = lines[:-1]
    assert problem.startswith("dataset digits; attack badnets; poison ratio 0.1; defense ft; spc 130 (3 defense runs)")
    assert "class 1 has 124 (22 of its 146 are poisoned); use spc <= 124" in problem
    from datamodules.datasets import get_dataset

    y = torch.from_numpy(get_dataset("digits").build("train")[1])
    split_by_spc(y, 130, 0, None)  # clean: feasible
    with pytest.raises(ValueError, match="fewer than the 130 needed for spc=130"):
        split_by_spc(y, 130, 0, poison_indices(y, 0.1, 0))


def test_typos_in_overrides_and_config_files(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  init_args:\n    poison_ratoi: 0.2\n")
    path = grid_file(tmp_path, attacks=["badnets", "blended"])
    spec = yaml.safe_load(path.read_text())
    spec["attacks"]["per_attack_args"] = {"blended": ["--config", str(bad)]}
    spec["defenses"]["per_defense_args"]["ft"] += ["--model.init_args.not_an_arg", "1"]
    path.write_text(yaml.safe_dump(spec))
    status, lines = check(path, capsys)
    assert status == 1 and lines[-1] == f"{cells(path)} cells, 8 infeasible"  # blended and all its runs, BadNets' FT
    attack, defense = lines[:-1]
    assert attack.startswith("dataset digits; attack blended; backbone small_cnn (1 attacked model, 4 defense runs): ")
    assert "Option 'poison_ratoi' is not accepted" in attack and f"is set in: {bad}" in attack
    assert defense.startswith("dataset digits; attack badnets; defense ft (3 defense runs): ")
    assert "Option 'not_an_arg' is not accepted ('not_an_arg' is set in: override --model.init_args.not_an_arg)" \
        in defense


def test_overrides_replace_the_grid_values(tmp_path, capsys) -> None:
    """What a run really gets counts: SIG's own ratio 0.05 (per_attack_args) replaces the grid's infeasible 0.1,
    and FT's --data.spc 200 the grid's SPC 2."""
    path = grid_file(tmp_path, attacks=["sig"], ratios=[0.1])
    spec = yaml.safe_load(path.read_text())
    spec["attacks"]["per_attack_args"] = {"sig": ["--data.init_args.poison_ratio", "0.05"]}
    spec["defenses"]["per_defense_args"]["ft"] += ["--data.spc", "200"]
    path.write_text(yaml.safe_dump(spec))
    status, lines = check(path, capsys)
    assert status == 1 and lines[-1] == f"{cells(path)} cells, 3 infeasible"
    [problem] = lines[:-1]
    assert problem.startswith("dataset digits; attack sig; poison ratio 0.1; defense ft; spc 2 (3 defense runs): "
                              "D_m needs 200 images per class (spc 200)")


def test_bad_grid_file_is_one_line(tmp_path, capsys) -> None:
    path = grid_file(tmp_path, attacks=["badnet"])
    with pytest.raises(SystemExit) as end:
        main(["check", str(path)])
    known = ", ".join(sorted({"clean", *TRIGGERS}))
    assert end.value.code == f"{path}: grid tiny: unknown attack 'badnet'; registered: {known}"


def test_missing_data_is_said_and_partly_checked(tmp_path, capsys) -> None:
    """No prepared GTSRB: its official class sizes still rule out SPC 300 (class 0 has 210 images); SPC 10 after
    BadNets depends on where the poisoned images fall, so those runs count as partly checked."""
    path = grid_file(tmp_path, datasets=["gtsrb"], spc=[10, 300])
    status, lines = check(path, capsys)
    assert status == 1
    assert lines[0].startswith(f"note: gtsrb: no prepared {tmp_path}/data/gtsrb/train.npz; checking against its 43 "
                               "official class sizes (39,209 training images)")
    assert "defense ft; spc 300 (3 defense runs): D_m needs 300 images per class" in lines[1]
    assert lines[-1] == (f"{cells(path)} cells, 3 infeasible (4 partly checked, D_m against official class sizes "
                         f"only: gtsrb not prepared under {tmp_path}/data/)")


def test_exact_check_on_prepared_labels(tmp_path, capsys) -> None:
    """Synthetic prepared CIFAR-10, 20 training images per class. SIG at 0.1 poisons all 20 of class 0, so its D_m
    (SPC 10) exists only thanks to the clean originals; SIG at 0.5 asks for 100. BadNets at 0.1 and 0.5: whatever
    split_by_spc says for those poisoned sets."""
    write_synthetic_prepared(tmp_path / "data", "cifar10", 10, 32, per_class=20)
    path = grid_file(tmp_path, datasets=["cifar10"], attacks=["sig", "badnets"], ratios=[0.1, 0.5], spc=[10])
    y = torch.from_numpy(np.load(tmp_path / "data" / "cifar10" / "train.npz")["y"])
    sig = poison_indices(y, 0.1, 0, clean_label=True)
    assert len(sig) == 20 and (y[sig] == 0).all()
    with pytest.raises(ValueError):
        split_by_spc(y, 10, 0, sig, 0.0)
    split_by_spc(y, 10, 0, sig, 0.0, originals_allowed=True)

    def feasible(ratio: float) -> bool:
        try:
            split_by_spc(y, 10, 0, poison_indices(y, ratio, 0), 0.0)
            return True
        except ValueError:
            return False

    expected = 5 + sum(4 for r in (0.1, 0.5) if not feasible(r))  # SIG 0.5 and its 4 runs; BadNets' FT and CLP
    assert not feasible(0.5)  # the test must exercise an exact failure
    status, lines = check(path, capsys)
    assert status == 1 and lines[-1] == f"{cells(path)} cells, {expected} infeasible"
    assert not any(line.startswith("note:") for line in lines)
    assert any(line.startswith("dataset cifar10; attack sig; poison ratio 0.5 (1 attacked model") for line in lines)
    assert not any("attack sig; poison ratio 0.1" in line for line in lines)


@pytest.mark.slow  # 11 s: checks all 124,128 survey runs; the grid checks above cover each rule
def test_survey_grid_without_data(tmp_path, monkeypatch, capsys) -> None:
    """The survey grid as shipped: nothing infeasible, with no data/ at all (SIG on Tiny-ImageNet reads its ratio
    over the target class; D_m takes clean originals after SIG on CIFAR-10 at 0.1)."""
    monkeypatch.chdir(tmp_path)
    status, lines = check(CONFIGS / "grids" / "survey.yaml", capsys)
    assert status == 0, "\n".join(lines)
    assert [line.split(";")[0] for line in lines[:-1]] == [
        f"note: {name}: no prepared data/{name}/train.npz" for name in ("cifar10", "gtsrb", "tiny_imagenet")]
    assert lines[-1] == ("124416 cells, 0 infeasible (124128 partly checked, D_m against official class sizes only: "
                         "cifar10, gtsrb, tiny_imagenet not prepared under data/)")


def test_official_class_sizes() -> None:
    from datamodules.datasets import CIFAR10, GTSRB, TinyImageNet

    assert len(GTSRB.train_class_sizes) == 43 and sum(GTSRB.train_class_sizes) == 39_209
    assert GTSRB.train_class_sizes[0] == 210
    assert CIFAR10.train_class_sizes == (5000,) * 10 and TinyImageNet.train_class_sizes == (500,) * 200


def test_run_and_sweep_refuse_an_infeasible_grid(tmp_path, monkeypatch, capsys) -> None:
    import experiments.runner
    import experiments.sweeps

    def trained(*args, **kwargs):
        raise AssertionError("started on an infeasible grid")

    monkeypatch.setattr(experiments.runner, "run_grid", trained)
    monkeypatch.setattr(experiments.sweeps, "write_sweeps", trained)
    path = grid_file(tmp_path, attacks=["sig"], ratios=[0.1])
    for command in (["run", str(path)], ["sweep", str(path), "--out", str(tmp_path / "sweeps")]):
        with pytest.raises(SystemExit) as end:
            main(command)
        assert f"not starting `grid.py {command[0]}`: 5 of 5 runs cannot run" in str(end.value.code)
        assert "class 0 has 142" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sweeps").exists()
