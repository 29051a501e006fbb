"""Victim training: the attack stage of every data-poisoning attack (BadNets, Blended, SIG, ...).

The DataModule poisons the training set; this module trains the injected backbone on it with the
survey's recipe (protocol.md): SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 128 (data), cosine
over the run stepped per epoch, 100 epochs (trainer), random crop (pad 4) and, on CIFAR-10 only,
horizontal flip, done batched on the device. Each epoch logs train/loss and val/acc, val/asr, val/ra.
Checkpoints carry the backdoor record (datamodules/record.py) that defenses rebuild the run from.
`compile_mode` compiles the backbone (`nn.Module.compile`, state-dict keys unchanged) when a Trainer builds the
model; "reduce-overhead" adds CUDA graphs, the lever for a launch-bound GPU step (PreAct-ResNet18 at batch 128).
Off by default: compiling costs a minute or more per run. Measured: see benchmarks/README.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, get_args

from torch import Tensor, nn

from core.backbones import PreActResNet18, backbone_config, build_backbone
from core.optim import Schedule, sgd_with_schedule
from datamodules.datasets import DataSpec, get_dataset
from datamodules.record import BACKDOOR_KEY, backdoor_record, read_record
from lightning_modules.classifier import ImageClassifier

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class VictimTraining(ImageClassifier):
    """Args:
        backbone: the network class, called with `num_classes` (default PreAct-ResNet18, the survey's default).
        lr, momentum, weight_decay, nesterov: SGD.
        schedule: cosine (T_max = max_epochs), constant, or multistep (`milestones`, `gamma`).
        augment: random crop (+ flip where the dataset allows) on training batches.
        channels_last: NHWC memory format (faster convolutions on CPU and on tensor cores).
        dataset: the registered dataset it classifies (normalisation, augmentation, number of classes); train.py
            links it from data.init_args.dataset. None, for direct use with a Trainer: the DataModule's.
        compile_mode: None (eager) or a `torch.compile` mode for the backbone, applied when a Trainer builds the
            model (fit or test); "reduce-overhead" captures forward and backward as CUDA graphs on a GPU.
    """

    def __init__(
        self,
        backbone: Callable[[int], nn.Module] = PreActResNet18,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        schedule: Schedule = "cosine",
        milestones: list[int] | None = None,
        gamma: float = 0.1,
        augment: bool = True,
        channels_last: bool = True,
        dataset: str | None = None,
        compile_mode: CompileMode | None = None,
    ) -> None:
        super().__init__(channels_last=channels_last)
        self.save_hyperparameters()
        self.dataset = dataset
        # a {class_path, init_args} dict comes from hparams when a notebook calls load_from_checkpoint
        self.backbone_factory = functools.partial(build_backbone, backbone) if isinstance(backbone, dict) else backbone
        self.use_augment = augment
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if compile_mode is not None and compile_mode not in get_args(CompileMode):
            raise ValueError(f"compile_mode must be None or one of {get_args(CompileMode)}, got {compile_mode!r}")
        self.compile_mode = compile_mode

    @property
    def backbone_spec(self) -> dict[str, Any]:
        configured = self.hparams.get("backbone")
        return backbone_config(configured if isinstance(configured, dict) else self.backbone_factory)

    def build(self, spec: DataSpec) -> None:
        self.bind_data(spec)
        if self.net is None:
            self.set_net(self.backbone_factory(spec.num_classes))

    def setup(self, stage: str) -> None:
        self.bind_data(get_dataset(self.dataset).spec if self.dataset is not None else self.attack_data.spec)

    @property
    def attack_data(self) -> Any:
        """The Trainer's DataModule (a datamodules.BackdoorDataModule). Read where its facts exist only after its
        `setup`: the checkpoint's backdoor record (poison indices, a fitted trigger's report); everything known at
        construction is passed in (train.py links it; see lightning_modules/cli.py)."""
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "spec"):
            raise RuntimeError(
                f"{type(self).__name__} needs a DataModule of this project (e.g. datamodules.BackdoorDataModule) "
                f"passed to the Trainer; plain dataloaders do not say which dataset, trigger or target they hold"
            )
        return datamodule

    def configure_model(self) -> None:
        if self.spec is not None:
            self.build(self.spec)
        if self.compile_mode is not None and self.net is not None and self.net._compiled_call_impl is None:
            # static shapes: one graph for the full batches and one for an epoch's last, smaller batch
            self.net.compile(mode=None if self.compile_mode == "default" else self.compile_mode, dynamic=False)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return self.cross_entropy_step(x, y, augment=self.use_augment)

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        return sgd_with_schedule(self.net.parameters(), self.trainer, h.lr, h.momentum, h.weight_decay,
                                 h.nesterov, h.schedule, h.milestones, h.gamma)

    # -- the backdoor record ----------------------------------------------------------------------------
    def attack_record(self) -> dict[str, Any] | None:
        return self.attack_data.attack_record()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        hparams = checkpoint.get("hyper_parameters")
        if hparams is not None:
            if not isinstance(hparams.get("backbone"), dict):
                hparams["backbone"] = self.backbone_spec  # a Python callable would make the file unsafe to load
            # lets `train.py test --ckpt_path` rebuild the model from a checkpoint written outside the CLI
            hparams.setdefault("_class_path", f"{type(self).__module__}.{type(self).__qualname__}")
        checkpoint[BACKDOOR_KEY] = backdoor_record(self.backbone_spec, self.attack_data.record(),
                                                   self.attack_record())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record = read_record(checkpoint)
        spec = DataSpec.from_dict(record["data"]["spec"])
        if record["backbone"] != self.backbone_spec:
            raise ValueError(
                f"the checkpoint holds a {record['backbone']['class_path']} {record['backbone']['init_args']}, "
                f"but this run builds a {self.backbone_spec['class_path']} {self.backbone_spec['init_args']}: "
                f"use the config the checkpoint was trained with (its run's config.yaml)"
            )
        if self.spec is not None and self.spec.num_classes != spec.num_classes:
            raise ValueError(
                f"the checkpoint was trained on {spec.name} ({spec.num_classes} classes), "
                f"this run uses {self.spec.name} ({self.spec.num_classes} classes)"
            )
        self.build(self.spec or spec)
