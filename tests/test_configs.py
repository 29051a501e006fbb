"""Every YAML under configs/ instantiates and runs a tiny CPU fast_dev_run through train.py's CLI (the defense
configs themselves end to end in tests/test_defenses.py, their dataset and profile overlays here).

A config of a group that has no rule here fails the test: add its composition below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datamodules.datasets import DATASETS
from lightning_modules.defenses import DEFENSES
from tests.conftest import CONFIGS, REPO, run_cli, write_synthetic_prepared
from tests.helpers import QUIET, wandb_records

NOT_CLI = {"grids", "sweeps"}  # grid files, checked by tests/test_grid.py


def checked_elsewhere(rel: Path) -> bool:
    """Grid files, and configs/defense/<name>.yaml: tests/test_defenses.py runs each of those through train.py."""
    return rel.parts[0] in NOT_CLI or (rel.parts[0] == "defense" and len(rel.parts) == 2)


ALL = sorted(rel for rel in (p.relative_to(CONFIGS) for p in CONFIGS.rglob("*.yaml")) if not checked_elsewhere(rel))
TINY = ["--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu",
        "--data.init_args.batch_size", "8", "--data.init_args.eval_batch_size", "32"]
# digits' class 0 holds 142 of 1,438 training images: SIG's 0.1 of the whole set is infeasible there
_T = "--data.init_args.trigger.init_args"
OVERRIDES = {
    "attack/sig.yaml": ["--data.init_args.poison_ratio", "0.05"],
    # the seeded untrained encoder: the reference's encoder training is GPU work (the hook still runs)
    "attack/ssba.yaml": [f"{_T}.epochs", "0", f"{_T}.width", "4"],
    # a 1-epoch surrogate (the victim's backbone, here SmallCNN at width 8), 10 images, 1 pass: the generation
    # path, not a useful pattern
    "attack/lf.yaml": [f"{_T}.generate.surrogate_epochs", "1", f"{_T}.generate.num_images", "10",
                       f"{_T}.generate.passes", "1", f"{_T}.generate.max_iter", "20",
                       "--model.init_args.backbone.init_args.width", "8"],
}


def composition(rel: Path) -> list[str]:
    group = rel.parts[0] if len(rel.parts) > 1 else None
    if rel == Path("quickstart.yaml"):
        files = [rel]
    elif group == "data":
        files = [rel, Path("attack/badnets.yaml"), Path("model/small_cnn.yaml")]
    elif group == "attack" and len(rel.parts) == 3 and rel.parts[1] not in DATASETS:
        # a profile's overlay (attack/survey/<name>.yaml) on CIFAR-10, whose reference trigger files exist; LF's
        # reference patterns are per backbone, and SmallCNN has none
        model = "preact_resnet18" if rel.stem == "lf" else "small_cnn"
        files = [Path("data/cifar10.yaml"), Path("attack") / rel.name, rel, Path(f"model/{model}.yaml")]
    elif group == "attack" and len(rel.parts) == 3:  # attack/<dataset>/<name>.yaml overrides attack/<name>.yaml
        files = [Path("data") / f"{rel.parts[1]}.yaml", Path("attack") / rel.name, rel, Path("model/small_cnn.yaml")]
    elif group == "attack":
        files = [Path("data/digits.yaml"), rel, Path("model/small_cnn.yaml")]
    elif group == "model":
        files = [Path("data/digits.yaml"), Path("attack/badnets.yaml"), rel]
    elif group in ("logger", "trainer"):
        files = [Path("quickstart.yaml"), rel]
    elif group == "defense":  # defense/<name>.yaml, or defense/<dataset>/<name>.yaml on top of it
        files = [Path("defense") / f"{rel.stem}.yaml"] + ([rel] if len(rel.parts) == 3 else [])
    else:
        pytest.fail(f"no rule for configs/{rel}: add its composition to tests/test_configs.py")
    return [arg for f in files for arg in ("--config", str(CONFIGS / f))]


def data_dir_for(rel: Path, tmp_path: Path, request) -> list[str]:
    name = rel.stem if rel.parts[0] == "data" else rel.parts[1] if len(rel.parts) == 3 else None
    if name == "cifar10" or (name is not None and rel.parts[0] == "attack" and name not in DATASETS):
        return ["--data.init_args.data_dir", str(request.getfixturevalue("shared_data"))]
    if name in ("gtsrb", "tiny_imagenet"):
        spec = DATASETS[name].spec
        write_synthetic_prepared(tmp_path / "data", name, spec.num_classes, spec.image_size)
        return ["--data.init_args.data_dir", str(tmp_path / "data")]
    return []


SLOW = {Path("model/vgg19_bn.yaml")}  # 8 s: VGG19-BN's 20M parameters; its forward stays in test_backbones


@pytest.mark.parametrize("rel", [pytest.param(p, marks=pytest.mark.slow) if p in SLOW else p for p in ALL],
                         ids=[str(p) for p in ALL])
def test_config_runs(rel: Path, tmp_path: Path, request) -> None:
    if rel.parts[0] == "defense":
        checkpoint = request.getfixturevalue("backdoored_checkpoint")["path"]
        args = ["fit", *composition(rel), "--model.backdoored", str(checkpoint), *DEFENSES[rel.stem].smoke_args,
                *QUIET]
        assert run_cli(*args, cwd=tmp_path).trainer.state.finished
        return
    if rel == Path("trainer/gpu.yaml") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if rel == Path("trainer/cpu_ddp.yaml"):
        pytest.skip("DDP relaunches the script: covered by test_ddp_two_cpu_processes")
    tiny = TINY if rel.parts[0] != "logger" else [  # fast_dev_run would replace the loggers by a dummy
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "1", *TINY[2:]]
    args = ["fit", *composition(rel), *tiny, *OVERRIDES.get(str(rel), []), *data_dir_for(rel, tmp_path, request)]
    cli = run_cli(*args, cwd=tmp_path)
    assert cli.trainer.state.finished
    assert "test/acc" in cli.trainer.callback_metrics
    if rel.parts[0] == "logger":  # the run's files in its own folder, never in runs/ itself (where runs collide)
        log_dir = tmp_path / cli.trainer.log_dir
        assert log_dir.parent.parent == tmp_path / "runs" and (log_dir / "config.yaml").is_file()
        assert not any((tmp_path / "runs" / name).exists() for name in ("config.yaml", "gallery.png"))
        # the CLI ends the W&B run when fit returns: its records are complete on disk
        records = wandb_records(next((tmp_path / "runs" / "wandb").glob("offline-run-*")))
        run = records["run"][0].run
        config = {u.key: json.loads(u.value_json) for u in run.config.update}
        assert (run.run_group, run.job_type) == ("digits-badnets-smallcnn", "attack")
        assert config["run"] | {"dataset": "digits", "attack": "BadNets", "poison_ratio": 0.1} == config["run"]
        artifact = records["artifact"][0].artifact
        assert [e.path for e in artifact.manifest.contents] == ["last.ckpt"] and artifact.type == "attack"


@pytest.mark.slow  # ~15 s: two processes start; the metrics' DDP reduction is in the fast suite (test_metrics.py)
def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    """Two CPU processes with DDP (gloo) train and test the quickstart; metrics are reduced across them."""
    cmd = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(CONFIGS / "quickstart.yaml"),
           "--config", str(CONFIGS / "trainer/cpu_ddp.yaml"), "--trainer.max_epochs", "1",
           "--trainer.limit_train_batches", "2", "--model.init_args.backbone.init_args.width", "8",
           "--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = (tmp_path / "runs" / "quickstart" / "version_0" / "metrics.csv").read_text()
    assert "test/acc" in metrics and "val/asr" in metrics


def test_wandb_alone_still_gives_each_run_its_folder(tmp_path: Path) -> None:
    """A W&B logger given without a file logger: a CSV log is put first, so the run's files stay in
    runs/<name>/version_<n>/ and not in runs/ itself, where the next run would overwrite them."""
    wandb_only = '{"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"save_dir": "runs"}}'
    cli = run_cli("fit", "--config", str(CONFIGS / "quickstart.yaml"), "--trainer.logger", wandb_only,
                  "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
                  "--trainer.limit_test_batches", "1", cwd=tmp_path)
    log_dir = tmp_path / cli.trainer.log_dir
    assert log_dir == tmp_path / "runs" / "digits-badnets-smallcnn" / "version_0"
    assert (log_dir / "config.yaml").is_file() and (log_dir / "checkpoints" / "last.ckpt").is_file()
    assert not any((tmp_path / "runs" / name).exists() for name in ("config.yaml", "gallery.png", "checkpoints"))


@pytest.mark.parametrize(("given", "parsed"), [("1", 1), ("50", 50), ("1.0", 1.0), ("0.5", 0.5), ("0", 0)])
def test_a_batch_limit_is_a_count_when_an_int_and_a_share_when_a_float(given: str, parsed: float) -> None:
    """Lightning types the limits `float | int`: tried in that order, `1` was read as 1.0 (the whole epoch)."""
    from lightning_modules.cli import BackdoorCLI

    cli = BackdoorCLI(args=["--config", str(CONFIGS / "quickstart.yaml"), "--trainer.limit_train_batches",
                            given, "--trainer.val_check_interval", given], run=False)
    for value in (cli.trainer.limit_train_batches, cli.trainer.val_check_interval):
        assert value == parsed and type(value) is type(parsed)


def test_links_pass_values_between_model_and_data(backdoored_checkpoint) -> None:
    """What the model and the DataModule need of each other, train.py passes at construction
    (BackdoorCLI.add_arguments_to_parser); a link acts only where both classes have the parameter."""
    from lightning_modules.cli import BackdoorCLI

    quiet = ["--trainer.accelerator", "cpu", "--trainer.logger", "false"]
    attack = BackdoorCLI(args=[*composition(Path("attack/wanet.yaml")), "--data.init_args.target", "3", *quiet],
                         run=False)
    model, data = attack.model, attack.datamodule
    assert (model.dataset, model.poison_ratio, model.target, model.mode) == ("digits", 0.1, 3, "all_to_one")
    assert data.victim_backbone == model.backbone_spec and data.serve_untriggered_backdoor_set
    checkpoint = str(backdoored_checkpoint["path"])
    defense = BackdoorCLI(args=[*composition(Path("defense/ft.yaml")), "--model.backdoored", checkpoint, *quiet],
                          run=False)
    assert defense.datamodule.backdoored == checkpoint
