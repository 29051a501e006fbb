"""The command line: LightningCLI in subclass mode with this project's defaults.

`python train.py fit --config configs/quickstart.yaml`. Runs log to runs/<name>/version_<n>/ (CSV by
default; add --config configs/logger/wandb.yaml for W&B) with config.yaml and checkpoints/last.ckpt.
Without an explicit logger name, the name is derived from the config: <dataset>-<attack>-<backbone>.
`test` with a fitted run's config.yaml logs to <run>/test/version_<n>/, leaving the run's files alone.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks import EpochSummary, Gallery
from core.backbones import backbone_config
from datamodules.record import attack_run_name, defense_run_name
from lightning_modules import attacks, defenses  # noqa: F401 - every method known by its short name (--model.help FT)

# Quiet runs: Lightning's advertising tip and a deprecation raised inside Lightning itself (its pytree helper on
# this torch) say nothing about the run.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip"))


class BackdoorCLI(LightningCLI):
    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        trainer_defaults = {
            "max_epochs": 100,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": "runs", "name": None}},
            "callbacks": [ModelCheckpoint(save_last=True, save_top_k=0), EpochSummary(), Gallery()],
            "log_every_n_steps": 10,
            **kwargs.pop("trainer_defaults", {}),
        }
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=kwargs.pop("seed_everything_default", 0),  # Lightning's own None means 0 too
            trainer_defaults=trainer_defaults,
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """What the model and the DataModule need of each other is passed at construction, never read through
        the Trainer: the dataset and the poisoning (data -> model), the victim's backbone and the attacked
        checkpoint (model -> data). Both are subclass-mode class_paths, and jsonargparse (4.53, _link_arguments.py)
        skips a link whose source or target class lacks the parameter, so each link acts only where both ends
        exist: `dataset` on VictimTraining and the attacks, poison_ratio/target/mode on the training-controlled
        attacks, `victim_backbone` on BackdoorDataModule, `backdoored` on a defense and MitigationDataModule.
        Linked values are left out of the saved config.yaml and derived again when it is read."""
        parser.link_arguments("data.init_args.dataset", "model.init_args.dataset")
        for name in ("poison_ratio", "target", "mode"):
            parser.link_arguments(f"data.init_args.{name}", f"model.init_args.{name}")
        parser.link_arguments("model.init_args.backbone", "data.init_args.victim_backbone", compute_fn=victim_backbone)
        parser.link_arguments("model.init_args.backdoored", "data.init_args.backdoored")
        int_first(parser)

    def after_fit(self) -> None:
        """An attack's fit ends with the test stage on the final weights (test/acc, test/asr, test/ra); a defense
        measured them itself as "after" (its result record; testing again would repeat that measurement). A W&B
        run also gets the defense's result record in its config and the checkpoint and result.json as an
        artifact."""
        if not self.trainer.interrupted and not isinstance(self.model, defenses.Defense):
            self.trainer.test(self.model, datamodule=self.datamodule)
        wandb_loggers = [lg for lg in self.trainer.loggers if type(lg).__name__ == "WandbLogger"]
        if wandb_loggers and self.trainer.is_global_zero and not self.trainer.interrupted:
            log_to_wandb(wandb_loggers, self.trainer, self.model)
        for logger in wandb_loggers:  # finished when fit returns (the W&B service writes its last records moments
            # later; at the latest when the process exits); the next run in this process starts anew
            logger.experiment.finish()

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = config.get("trainer.logger")
        loggers = [lg for lg in (logger if isinstance(logger, list) else [logger]) if hasattr(lg, "init_args")]
        if loggers and not loggers[0].class_path.endswith(("CSVLogger", "TensorBoardLogger")):
            # the run's folder is the first logger's: only a file logger gives each run its own (W&B alone would
            # put config.yaml, checkpoints and result.json of every run into its save_dir itself)
            csv = Namespace(class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(
                save_dir=loggers[0].init_args.get("save_dir") or "runs", name=None, version=None, prefix="",
                flush_logs_every_n_steps=100))
            loggers = [csv, *loggers]
            config["trainer.logger"] = loggers
        for lg in loggers:
            if "name" in lg.init_args and lg.init_args.name is None:
                lg.init_args.name = run_name(config)
            if lg.class_path.endswith("WandbLogger") and self.subcommand == "fit":
                extra = dict(lg.get("dict_kwargs") or {})
                for key, value in wandb_fields(config).items():
                    extra.setdefault(key, value)
                lg["dict_kwargs"] = extra
        if self.subcommand in ("test", "validate", "predict"):
            for lg in loggers:
                keep_fitted_run(lg)
            if config.get("weights_only") is None:  # --ckpt_path: never unpickle code, whatever the torch default
                config.weights_only = True
            defended_from_itself(config)


BATCH_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
                "val_check_interval")


def int_first(parser: LightningArgumentParser) -> None:
    """Lightning types the batch limits `float | int` (an int counts batches, a float is a share of the epoch) and
    jsonargparse tries the union's types in order, so `--trainer.limit_train_batches 1` became 1.0: the whole
    epoch instead of one batch. Trying int first reads `1` as one batch and `1.0` as all."""
    for action in parser._actions:
        if action.dest.startswith("trainer.") and action.dest.rpartition(".")[2] in BATCH_LIMITS:
            action._typehint = int | float | None


def victim_backbone(backbone: Any) -> dict[str, Any] | None:
    """{class_path, init_args} of the configured backbone, as VictimTraining.backbone_spec records it."""
    if backbone is None:
        return None
    if isinstance(backbone, Namespace):
        backbone = backbone.as_dict()
    return backbone_config(backbone)


def wandb_fields(config: Any) -> dict[str, Any]:
    """wandb.init's group, job type and config for a train.py run (the grid runner sets its own): an attacked
    model groups its defense runs, which name it through --model.backdoored."""
    backdoored = config.get("model.init_args.backdoored")

    def leaf(path: str) -> str | None:
        value = config.get(path)
        return None if value is None else (value.class_path if hasattr(value, "class_path") else str(value))

    if backdoored is not None:
        run = Path(str(backdoored)).parents[1]  # <run>/checkpoints/last.ckpt
        fields = {"defense": leaf("model").rpartition(".")[2], "backdoored": str(backdoored),
                  "spc": config.get("data.init_args.spc"), "ratio": config.get("data.init_args.ratio"),
                  "split_seed": config.get("data.init_args.split_seed")}
        return {"group": run.parent.name if run.name.startswith("version_") else run.name, "job_type": "defense",
                "config": {"run": fields}}
    fields = {"dataset": config.get("data.init_args.dataset"), "attack": (leaf("data.init_args.trigger") or
              leaf("model") or "").rpartition(".")[2], "backbone": (leaf("model.init_args.backbone") or
              "").rpartition(".")[2], "poison_ratio": config.get("data.init_args.poison_ratio"),
              "target": config.get("data.init_args.target"), "seed": config.get("seed_everything")}
    return {"group": run_name(config), "job_type": "attack", "config": {"run": fields}}


def log_to_wandb(loggers: list[Any], trainer: L.Trainer, model: L.LightningModule) -> None:
    """After fit: a defense's result record (dataset, attack, defense, spc, split seed, scores, defense_info) into
    the run's config, and the run's checkpoint and result.json as one artifact."""
    import wandb

    result = getattr(model, "result", None)
    folder = Path(trainer.log_dir or trainer.default_root_dir)
    files = [folder / "checkpoints" / "last.ckpt", Path(getattr(model, "result_path", lambda: "")() or "")]
    for logger in loggers:
        if result is not None:
            logger.experiment.config.update({"result": {k: v for k, v in result.items() if k != "config"}},
                                            allow_val_change=True)
        kind = "defense" if result is not None else "attack"
        artifact = wandb.Artifact(f"{logger.experiment.name or 'run'}-{kind}".replace("/", "-"), type=kind)
        for path in files:
            if path.is_file():
                artifact.add_file(str(path))
        if artifact.manifest.entries:
            logger.experiment.log_artifact(artifact)


def defended_from_itself(config: Any) -> None:
    """`test --ckpt_path <defended checkpoint>` builds the defense from that checkpoint, which carries its attacked
    model's record, not from the attacked checkpoint its hyperparameters name: that one may have moved or be gone
    (Lightning puts a checkpoint's hyperparameters over the command line, so `--model.backdoored` cannot)."""
    ckpt_path = config.get("ckpt_path")
    if ckpt_path is None or config.get("model.init_args.backdoored") is None or not Path(ckpt_path).is_file():
        return
    for key in ("model.init_args.backdoored", "data.init_args.backdoored"):
        if config.get(key) is not None:
            config[key] = str(ckpt_path)


def keep_fitted_run(logger: Any) -> None:
    """`test` (or validate, predict) with a fitted run's own config.yaml would log into that run's folder and
    overwrite its metrics.csv and config.yaml: point a file logger whose folder holds a run at
    `<run folder>/test/version_<n>/` instead (W&B keeps its own run; its files follow the first logger's folder)."""
    if not logger.class_path.endswith(("CSVLogger", "TensorBoardLogger")):
        return
    args = logger.init_args
    folder = Path(args.get("save_dir") or ".") / (args.get("name") or "")
    version = args.get("version")
    if version is not None:
        folder = folder / (version if isinstance(version, str) else f"version_{version}")
    if (folder / "config.yaml").exists() or (folder / "metrics.csv").exists():
        args.save_dir, args.name, args.version = str(folder / "test"), "", None


def run_name(config: Any) -> str:
    """<dataset>-<attack>-<backbone> for attack runs (parts that are absent are left out), e.g.
    digits-badnets-smallcnn; <defense>-spc<k>-seed<s> for defense runs."""
    if config.get("model.init_args.backdoored") is not None:
        return defense_run_name(config.get("model").class_path.rpartition(".")[2].lower(),
                                config.get("data.init_args.spc"), config.get("data.init_args.split_seed"),
                                config.get("data.init_args.ratio"))

    def leaf(path: str) -> str | None:
        value = config.get(path)
        if value is None:
            return None
        name = value.class_path if hasattr(value, "class_path") else str(value)
        return name.rpartition(".")[2].lower()

    model_cls = leaf("model")
    return attack_run_name(
        leaf("data.init_args.dataset"),
        leaf("data.init_args.trigger") or (model_cls if model_cls not in (None, "victimtraining") else None),
        leaf("model.init_args.backbone"),
    )


def main(args: list[str] | None = None) -> None:
    """`python train.py <fit|test|validate|predict> ...` (and `backdoor-bench fit ...`): known errors in one line."""
    from datamodules.errors import short_errors

    argv = sys.argv
    if args is not None:  # LightningCLI warns when argv and args both hold arguments
        sys.argv = sys.argv[:1]
    try:
        with short_errors("train.py"):
            BackdoorCLI(args=args)
    finally:
        sys.argv = argv
