"""Rebuild an attacked (or defended) run from its checkpoint, without Lightning: for defenses and notebooks.

    run = load_attacked("runs/quickstart/version_0/checkpoints/last.ckpt")
    logits = run.classifier(images_uint8)          # normalisation included
    triggered = run.trigger(images_uint8)          # the attack's trigger, None for a clean model

Loading is `weights_only=True`; the network is rebuilt from the record's backbone config and must match the
stored weights exactly (`strict`), so a checkpoint of another architecture fails with a clear message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.backbones import build_backbone
from datamodules.datasets import DataSpec
from datamodules.record import load_checkpoint, read_record
from datamodules.transforms import Normalize
from datamodules.triggers.base import Trigger, build_trigger

NET_PREFIX = "net."


@dataclass
class AttackedRun:
    net: nn.Module  # the backbone with the checkpoint's weights, in eval mode
    spec: DataSpec
    trigger: Trigger | None
    record: dict[str, Any]

    @property
    def classifier(self) -> nn.Sequential:
        """Pixels (uint8 or 0..1 float) -> logits."""
        return nn.Sequential(Normalize(self.spec.mean, self.spec.std), self.net).eval()

    @property
    def poison_indices(self) -> Tensor | None:
        attack = self.record["attack"]
        return attack["poison_indices"] if attack else None


def network_state(state_dict: dict[str, Tensor], prefix: str = NET_PREFIX) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_attacked(
    path: str | Path, map_location: str | torch.device = "cpu", restore: str | None = None
) -> AttackedRun:
    """The attacked run of an attack checkpoint, or the defended network of a defense checkpoint whose
    defense only changed weights. `restore`: the class path of a defense restoring its own defended checkpoint
    (`load_defended`), which may have parts outside the backbone: they come from its state dict afterwards."""
    ckpt = load_checkpoint(path, map_location)
    record = read_record(ckpt, path)
    defense = ckpt.get("defense") or {}
    if defense.get("changes_architecture") and (restore is None or defense.get("class_path") != restore):
        raise ValueError(
            f"{path} was written by {defense.get('class_path')}, which adds parts outside the backbone; load it "
            f"with lightning_modules.defenses.load_defended(path) to get the defended model"
        )
    spec = DataSpec.from_dict(record["data"]["spec"])
    net = build_backbone(record["backbone"], spec.num_classes)
    state = network_state(ckpt.get("state_dict", {}))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{path}: its weights do not fit the recorded backbone {record['backbone']['class_path']} with "
            f"{spec.num_classes} classes ({str(err).splitlines()[0]}); the file is inconsistent or was edited"
        ) from err
    trigger = build_trigger(record["attack"]["trigger"]) if record["attack"] else None
    return AttackedRun(net.eval(), spec, trigger, record)
