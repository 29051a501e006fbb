"""LF, the low-frequency trigger (Zeng et al., "Rethinking the Backdoor Attacks' Triggers: A Frequency
Perspective", ICCV 2021): x' = clip(round(x + P), 0, 255) with P a smooth, non-negative universal pattern.

P (float32 (C, H, W), 0..255 scale) comes from exactly one source: `pattern` (a BackdoorBench .npy path, a
resource name `lf_<dataset>_<model>`, or `reference`: the file for the run's dataset and backbone, fetched and
sha256-checked by datamodules/resources.py) or `generate` (datamodules/lf_pattern.py against a clean surrogate of
the victim's backbone, bound by `bind_run`). P travels in checkpoints as extra state; other image sizes get it
resized bilinearly.
Pitfall: the reference's float files (VGG-19-BN) were a null trigger there; `scale: auto` reads them on the 0..1
scale, so `reference` on VGG-19-BN is a real trigger here (docs/fidelity.md, "LF"). Ambiguous files raise.
Differs from the reference: the sum is rounded (the reference truncates).
Defaults: configs/attack/lf.yaml; the survey's files: configs/attack/survey/lf.yaml.
Cost: one add per batch; generating a pattern: datamodules/lf_pattern.py; measured: benchmarks/README.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules import resources
from datamodules.lf_pattern import PatternGeneration, generate_pattern
from datamodules.triggers.base import Trigger, check_images, to_uint8

Scale = Literal["auto", "0-255", "0-1"]
REFERENCE = "reference"  # `pattern`: BackdoorBench's file for the run's dataset and victim backbone
# BackdoorBench's names of our datasets and backbone classes in resource/lowFrequency/<dataset>_<model>_0_255.npy
REFERENCE_DATASETS = {"cifar10": "cifar10", "gtsrb": "gtsrb", "tiny_imagenet": "tiny"}
REFERENCE_BACKBONES = {"PreActResNet18": "preactresnet18", "VGG19BN": "vgg19_bn", "EfficientNetB3": "efficientnet_b3",
                       "MobileNetV3Large": "mobilenet_v3_large"}


def reference_resource(dataset: str, backbone: dict[str, Any] | None) -> str:
    """The resource name of BackdoorBench's LF file for a dataset and a victim backbone {class_path, init_args}."""
    model = str(backbone["class_path"]).rpartition(".")[2] if backbone is not None else None
    if dataset not in REFERENCE_DATASETS or model not in REFERENCE_BACKBONES:
        what = (f"dataset {dataset!r}" if dataset not in REFERENCE_DATASETS else
                "an unknown victim backbone (none given)" if model is None else f"backbone {model}")
        raise ValueError(
            f"LF pattern: {REFERENCE} has no BackdoorBench file for {what}: reference files exist for datasets "
            f"{', '.join(REFERENCE_DATASETS)} x backbones {', '.join(REFERENCE_BACKBONES)}. Use `generate` (a "
            f"pattern generated against a surrogate of the victim; configs/attack/lf.yaml) or `pattern: <file.npy>`.")
    return f"lf_{REFERENCE_DATASETS[dataset]}_{REFERENCE_BACKBONES[model]}"


def plain_report(info: dict[str, Any]) -> dict[str, Any]:
    """Tensors and numpy values as floats / lists, so the report is safe in a weights_only checkpoint."""
    def plain(v: Any) -> Any:
        if isinstance(v, (Tensor, np.ndarray)):
            return v.tolist()
        if isinstance(v, (list, tuple)):
            return [plain(i) for i in v]
        return float(v) if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) else v
    return {k: plain(v) for k, v in info.items()}
SCALES = ("auto", "0-255", "0-1")


def apply_lf(x: Tensor, pattern: Tensor) -> Tensor:
    """uint8 images (B, C, H, W) plus a float pattern (C, H, W) on the 0..255 scale, rounded and clipped."""
    return to_uint8(x.float() + pattern.to(device=x.device, dtype=torch.float32))


def pattern_scale(array: np.ndarray, scale: Scale, where: str = "pattern") -> str:
    """The scale a pattern array is on: `scale`, or for "auto" the one its dtype and values imply."""
    if scale not in SCALES:
        raise ValueError(f"LF scale must be one of {SCALES}, got {scale!r}")
    if scale != "auto":
        return scale
    peak = float(np.abs(array).max()) if array.size else 0.0
    if peak == 0.0:
        raise ValueError(f"{where} is all zeros: no trigger on any scale")
    if np.issubdtype(array.dtype, np.integer) or peak > 1.0:
        return "0-255"
    if np.all(np.isin(array, (-1.0, 0.0, 1.0))):
        raise ValueError(f"{where} holds only -1, 0 and 1: it could be 0..255 or 0..1; set scale explicitly")
    return "0-1"


def read_pattern(path: str, scale: Scale = "auto") -> Tensor:
    """A pattern file as float32 (C, H, W) on the 0..255 scale. Accepts (H, W, C) and BackdoorBench's (1, H, W, C)."""
    if not Path(path).is_file():
        raise ValueError(f"LF pattern file {path} not found; give a .npy from BackdoorBench's resource/lowFrequency "
                         f"(e.g. cifar10_preactresnet18_0_255.npy) or use `generate` instead")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ValueError(f"LF pattern {path} is not a numpy .npy array ({err})") from err
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise ValueError(f"LF pattern {path} must be (H, W, C) or (1, H, W, C) with C 1 or 3, got {array.shape}")
    factor = 255.0 if pattern_scale(array, scale, f"LF pattern {path}") == "0-1" else 1.0
    values = torch.from_numpy(array.astype(np.float32) * factor).permute(2, 0, 1).contiguous()
    if values.abs().max() > 255:
        raise ValueError(f"LF pattern {path} exceeds 255 on the 0..255 scale (max {values.abs().max():.1f}): "
                         f"check `scale` ({scale!r})")
    return values


class LowFrequency(Trigger):
    """Args:
        pattern: a pattern .npy file (BackdoorBench's resource/lowFrequency format): a path, a registered resource
            name (`lf_cifar10_preactresnet18`, ...), or `reference` (the file for the run's dataset and victim
            backbone, set by `bind_run`). Resource names are found in the run's data folder (`data` for a trigger
            used without `bind_run`) and downloaded there once when missing.
        scale: the file's scale: "0-255", "0-1", or "auto" (decided by dtype and range; raises where ambiguous).
        generate: settings to generate the pattern instead (datamodules.lf_pattern.PatternGeneration).
    """
    display_name = "LF"

    def __init__(
        self,
        pattern: str | None = None,
        scale: Scale = "auto",
        generate: PatternGeneration | None = None,
    ) -> None:
        super().__init__()
        if scale not in SCALES:
            raise ValueError(f"LF scale must be one of {SCALES}, got {scale!r}")
        if (pattern is None) == (generate is None):
            raise ValueError("LF needs exactly one pattern source: `pattern` (a .npy file) or `generate` "
                             f"(settings to generate one); got pattern={pattern!r}, generate={generate!r}")
        # kept as a plain dict so config() and checkpoints hold plain values
        self.pattern = pattern
        self.scale = scale
        self.generate = PatternGeneration.from_value(generate).to_dict() if generate is not None else None
        self._pattern: Tensor | None = None
        self._sized: dict[tuple[int, int, str], Tensor] = {}
        self.info: dict[str, Any] = {}  # generation diagnostics (fooling rates, seconds)
        self._reference: str | None = None  # pattern `reference`: the resource chosen by bind_run

    def resolved(self) -> Tensor:
        """The pattern (C, H, W), float32 on the 0..255 scale, read or generated on first use."""
        if self._pattern is None:
            if self.pattern is not None:
                self._pattern = read_pattern(self.pattern_file(), self.scale)
            else:
                out = generate_pattern(PatternGeneration.from_value(self.generate))
                self._pattern = out["pattern"].float()
                self.info = {k: v for k, v in out.items() if k != "pattern"}
        return self._pattern

    def pattern_file(self) -> str:
        """The path of the `pattern` file (a resource name resolved in the data folder, fetched if missing)."""
        name = self._reference if self.pattern == REFERENCE else self.pattern
        if name is None:
            raise ValueError(f"LF pattern: {REFERENCE} is chosen per run (dataset and victim backbone): "
                             f"BackdoorDataModule binds it; used directly, call bind_run(dataset, target, data_dir, "
                             f"backbone) first, or give a file or a resource name such as lf_cifar10_preactresnet18")
        return str(resources.resolve(name, self._data_dir)) if resources.is_resource(name) else name

    def bind_run(self, dataset: str, target: int, data_dir: str, backbone: dict[str, Any] | None) -> None:
        """A pattern resource is found in the run's data folder; `reference` picks BackdoorBench's file for the
        run's dataset and victim backbone (an error where none exists). Generation settings left as None take
        the run's dataset, target, data folder and victim backbone (the surrogate: a clean model of the victim's
        architecture, as the survey's per-model patterns). An explicit dataset or target that differs from the
        run's is refused: a universal perturbation toward one dataset's target class would silently be another
        attack."""
        super().bind_run(dataset, target, data_dir, backbone)
        if self.pattern == REFERENCE:
            chosen = reference_resource(dataset, backbone)
            if chosen != self._reference:
                self._reference, self._pattern = chosen, None
                self._sized.clear()
        if self.generate is None or self._pattern is not None:
            return
        g = dict(self.generate)
        for what, want in (("dataset", dataset), ("target", target)):
            if g[what] is None:
                g[what] = want
            elif g[what] != want:
                raise ValueError(
                    f"LF generates its pattern for {what} {g[what]!r}, but this run's {what} is {want!r}: set "
                    f"--data.init_args.trigger.init_args.generate.{what} {want} (or null: the run's)")
        if g["data_dir"] is None:
            g["data_dir"] = data_dir
        if g["surrogate"] is None and g["surrogate_checkpoint"] is None and backbone is not None:
            g["surrogate"] = {"class_path": backbone["class_path"], "init_args": dict(backbone.get("init_args", {}))}
        self.generate = PatternGeneration.from_value(g).to_dict()

    def fit(self, x_train: Tensor, y_train: Tensor) -> None:
        """The `Trigger.fit` hook: read or generate the pattern now, before the DataModule poisons. Generation
        still loads `generate.dataset` itself: it also needs that dataset's normalisation and the target."""
        self.resolved()

    def report(self) -> dict[str, Any]:
        """Generation diagnostics (fooling rates per pass, seconds); for `reference`, the file it chose."""
        if self._reference is not None and self.pattern == REFERENCE:
            return {"reference": resources.get(self._reference).relative_path}
        return plain_report(self.info)

    def pattern_for(self, x: Tensor) -> Tensor:
        key = (x.shape[-2], x.shape[-1], str(x.device))
        if key not in self._sized:
            p = self.resolved()
            if p.shape[0] not in (1, x.shape[1]):
                raise ValueError(f"LF pattern has {p.shape[0]} channels, the images {x.shape[1]}")
            if tuple(p.shape[-2:]) != key[:2]:
                p = F.interpolate(p[None], size=key[:2], mode="bilinear", align_corners=False)[0]
            self._sized[key] = p.to(x.device)
        return self._sized[key]

    def forward(self, x: Tensor) -> Tensor:
        check_images(x)
        return apply_lf(x, self.pattern_for(x))

    def get_extra_state(self) -> Any:
        state = {"pattern": self.resolved().clone()}
        if self.pattern == REFERENCE:
            state["reference"] = self._reference  # which file `reference` chose (a rebuilt run need not bind)
        return state

    def set_extra_state(self, state: Any) -> None:
        if state and state.get("pattern") is not None:
            self._pattern = state["pattern"].float().cpu()
            self._reference = state.get("reference")
            self._sized.clear()
