"""Bad input gets an error that says what was wrong and how to fix it."""

from __future__ import annotations

import pytest

from datamodules import BackdoorDataModule
from datamodules.record import load_checkpoint
from datamodules.triggers import SIG
from lightning_modules.checkpoint import load_attacked
from tests.conftest import CONFIGS, run_cli

QUICK = ["--config", str(CONFIGS / "quickstart.yaml"), "--trainer.fast_dev_run", "1"]


@pytest.mark.parametrize("kwargs, match", [
    ({"dataset": "mnist"}, r"unknown dataset 'mnist'; registered: cifar10, digits"),
    ({"poison_ratio": 1.2}, r"poison_ratio must lie in \[0, 1\]"),
    ({"poison_ratio": -0.01}, r"poison_ratio must lie in \[0, 1\]"),
    ({"target": 10}, r"target must be a class index in 0\.\.9"),
    ({"dataset": "gtsrb", "target": 43}, r"target must be a class index in 0\.\.42"),
    ({"mode": "all_to_all", "trigger": SIG()}, "clean-label attack: it supports mode all_to_one only"),
    ({"batch_size": 0}, "batch sizes must be >= 1"),
])
def test_datamodule_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        BackdoorDataModule(**kwargs)


def test_clean_label_too_large_for_target_class() -> None:
    data = BackdoorDataModule("digits", trigger=SIG(), poison_ratio=0.1, cache_dir=None)
    with pytest.raises(ValueError, match=r"class 0 has 142.*poison_ratio <= 0\.0987"):
        data.setup("fit")


def test_cli_unknown_dataset(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        run_cli("fit", *QUICK, "--data.init_args.dataset", "imagenet", cwd=tmp_path)


@pytest.mark.parametrize("key, value", [
    ("--model.init_args.backbone.class_path", "lightning_modules.backbones.ResNet1000"),
    ("--data.init_args.trigger.class_path", "datamodules.triggers.Invisible"),
])
def test_cli_unknown_class_names_it(tmp_path, capsys, key, value) -> None:
    with pytest.raises(SystemExit):
        run_cli("fit", *QUICK, key, value, cwd=tmp_path)
    assert value.rpartition(".")[2] in capsys.readouterr().err


def test_cli_ratio_out_of_range(tmp_path) -> None:
    with pytest.raises(ValueError, match="poison_ratio must lie in"):
        run_cli("fit", *QUICK, "--data.init_args.poison_ratio", "5", cwd=tmp_path)


def test_cli_endless_run_with_a_cosine_schedule(tmp_path) -> None:
    """`--trainer.max_epochs -1` (Lightning's "no limit") with no max_steps: the cosine schedule has no length."""
    args = ["--config", str(CONFIGS / "quickstart.yaml"), "--trainer.max_epochs", "-1",
            "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0"]
    with pytest.raises(ValueError, match=r"cosine schedule needs a finite run.*max_epochs -1"):
        run_cli("fit", *args, cwd=tmp_path)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line or "Error" in line]


@pytest.mark.parametrize("args, message", [
    (["--data.init_args.poison_ratio", "1.5"], "poison_ratio must lie in [0, 1] (a fraction of the training set)"),
    (["--trainer.max_epochs", "-1"], "a cosine schedule needs a finite run"),
])
def test_train_py_says_a_known_error_in_one_line(tmp_path, monkeypatch, capfd, args, message) -> None:
    """On the command line a known error is one line plus where the traceback is, not 40-105 lines (train.py's
    `main`, in this process: train.py itself runs in test_cli_help_for_a_defense_and_a_quiet_run)."""
    from lightning_modules.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BACKDOOR_BENCH_DEBUG", raising=False)
    with pytest.raises(SystemExit) as end:
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), *args])
    err = capfd.readouterr().err
    assert end.value.code == 1
    assert "Traceback" not in err and f"train.py: error: {message}" in err, err
    assert len(error_lines(err)) == 1, err


def test_prepare_without_the_files_says_what_to_place_where(tmp_path, monkeypatch, capfd) -> None:
    """`python -m datamodules.prepare cifar10 --no-download` on an empty folder (what an offline machine meets):
    one line naming the archive, where it comes from and where to put it."""
    from datamodules import prepare

    monkeypatch.delenv("BACKDOOR_BENCH_DEBUG", raising=False)
    with pytest.raises(SystemExit) as end:
        prepare.main(["cifar10", "--no-download", "--data_dir", str(tmp_path)])
    err = capfd.readouterr().err
    assert end.value.code == 1 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("datamodules.prepare: error: could not get the original cifar10")
    assert "cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in lines[0]
    assert f"into {tmp_path / 'cifar10' / 'raw'}" in lines[0]


@pytest.mark.slow  # 9 s: two CLI processes
def test_cli_help_for_a_defense_and_a_quiet_run(tmp_path, monkeypatch, capsys) -> None:
    """`--model.help FT` lists the defense's arguments; train.py run as a script prints no advertising tip, no
    missing-seed warning and no deprecation from inside Lightning."""
    import os
    import subprocess
    import sys

    from lightning_modules.cli import main
    from tests.conftest import REPO

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as end:
        main(["fit", "--model.help", "FT"])
    assert end.value.code == 0 and "--model.backdoored" in capsys.readouterr().out
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, str(REPO / "train.py"), "fit", *QUICK,
                          "--trainer.enable_progress_bar", "false"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    output = run.stdout + run.stderr
    assert "test/acc" in output
    for noise in ("Tip:", "No seed found", "LeafSpec"):
        assert noise not in output, output


def test_checkpoint_of_another_architecture(tmp_path, backdoored_checkpoint) -> None:
    """The fixture is a SmallCNN of width 16 on digits (10 classes)."""
    import functools

    import lightning as L
    import torch

    from lightning_modules import VictimTraining
    from lightning_modules.backbones import PreActResNet18, SmallCNN

    data = BackdoorDataModule("digits", trigger=None, cache_dir=None)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    for factory in (functools.partial(SmallCNN, width=32), PreActResNet18):
        with pytest.raises(ValueError, match="the checkpoint holds a .*SmallCNN .*'width': 16.*use the config"):
            trainer.test(VictimTraining(factory), data, ckpt_path=backdoored_checkpoint["path"])
    # through the CLI the checkpoint's own hyperparameters rebuild the model; the data must still fit it
    from datamodules.datasets import GTSRB
    from tests.conftest import write_synthetic_prepared

    write_synthetic_prepared(tmp_path / "data", "gtsrb", 43, 32)
    with pytest.raises(ValueError, match=r"trained on digits \(10 classes\), this run uses gtsrb \(43 classes\)"):
        run_cli("test", "--config", str(CONFIGS / "quickstart.yaml"), "--data.init_args.dataset", "gtsrb",
                "--data.init_args.data_dir", str(tmp_path / "data"),
                "--ckpt_path", str(backdoored_checkpoint["path"]), cwd=tmp_path)
    # a record that names another backbone than the weights it holds
    ckpt = torch.load(backdoored_checkpoint["path"], weights_only=True)
    ckpt["backdoor"]["backbone"]["init_args"]["width"] = 32
    torch.save(ckpt, tmp_path / "edited.ckpt")
    with pytest.raises(ValueError, match="weights do not fit the recorded backbone"):
        load_attacked(tmp_path / "edited.ckpt")
    assert GTSRB.spec.num_classes == 43


def test_missing_and_corrupt_checkpoints(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint .* not found"):
        load_attacked(tmp_path / "nope.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="cannot read checkpoint .*truncated, corrupt"):
        load_attacked(bad)


def test_checkpoint_without_record(tmp_path) -> None:
    import torch

    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="has no 'backdoor' record"):
        load_attacked(path)
    assert load_checkpoint(path) == {"state_dict": {}}


def test_unsafe_checkpoint_is_refused(tmp_path) -> None:
    """A pickle that would run code is not loaded (weights_only=True)."""
    import torch

    path = tmp_path / "unsafe.ckpt"
    torch.save({"backdoor": object()}, path)
    with pytest.raises(ValueError, match="unsafe to load|cannot read checkpoint"):
        load_attacked(path)
