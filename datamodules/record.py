"""The run records, written and read here only, and the names of runs.

Three records, each a TypedDict with a `schema_version` (dicts on disk and in memory, so JSON and
`torch.load(..., weights_only=True)` read them):

- `BackdoorRecord`: `checkpoint["backdoor"]` of every attack checkpoint (and of every defended one, which carries
  its attacked model's), enough to rebuild the run: the backbone config, the data (dataset, folder, `DataSpec`),
  and the attack (trigger config and state, target, ratio, poisoned indices; None for a clean model).
- `DefenseResult`: a defense run's `result.json`: the run's identity, ACC/ASR/RA before and after (and whether
  "before" was measured or read from the attacked model's cache), the scores, seconds per stage, the training seed
  and the whole config.
- `AttackResult`: the grid runner's `attack.json` for a finished attacked model: its identity and trigger config
  (from its checkpoint's BackdoorRecord), epochs, training seed and test metrics.

A record without `schema_version` was written before the field existed and is read as version 1 (the backdoor
record then had `version: 1`; result.json had no `seed`; attack.json held the grid's planned fields instead of the
run's identity; up to version 2, result.json's seconds were `defense` and `total` only, and it had no
`before_source`). `read_*` bring every older record up to SCHEMA_VERSION, so readers see one shape.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypedDict

import lightning as L
import torch
from torch import Tensor

from core.backbones import current_class_path

BACKDOOR_KEY = "backdoor"
SCHEMA_VERSION = 3
RECORD_VERSION = SCHEMA_VERSION  # the old name, kept for code that writes records by hand (tests)


class ClassConfig(TypedDict):
    class_path: str
    init_args: dict[str, Any]


class TriggerRecord(ClassConfig):
    state: dict[str, Tensor]


class DataRecord(TypedDict):
    dataset: str  # the dataset's registry name
    data_dir: str
    spec: dict[str, Any]  # DataSpec.to_dict(): normalisation, augmentation, classes


class AttackRecord(TypedDict, total=False):
    name: str  # the trigger's class (BadNets) or the training-controlled attack's (WaNet)
    trigger: TriggerRecord
    target: int
    mode: str
    poison_ratio: float
    poison_seed: int | None  # None, like poison_indices, for training-controlled attacks (they poison per batch)
    ratio_over_target: bool
    clean_label: bool
    training_controlled: bool
    trigger_report: dict[str, Any]
    poison_indices: Tensor | None
    settings: dict[str, Any]  # training-controlled attacks: their own hyperparameters


class BackdoorRecord(TypedDict):
    schema_version: int
    backbone: ClassConfig  # rebuilt with num_classes = data.spec.num_classes
    data: DataRecord
    attack: AttackRecord | None  # None: a clean model


class Scores(TypedDict):
    acc: float
    asr: float  # NaN for a clean model
    ra: float


class DefenseResult(TypedDict):
    schema_version: int
    attack: str  # the attack's class name, "clean" for none
    defense: str  # the Defense class name (FT); lightning_modules.defenses.DEFENSES maps file names to classes
    dataset: str
    backbone: str  # the backbone's class name
    poison_ratio: float | None
    num_poisoned: int | None  # training images the ratio poisoned (GTSRB / Tiny-ImageNet SIG: over the target class)
    target: int | None
    spc: int | None
    ratio: float | None
    split_seed: int
    seed: int | None  # the training seed (seed_everything); None in version 1 records
    val_convention: str | None
    dm_source: str | None
    before: Scores
    after: Scores
    arr: float
    rdr: float
    der: float
    rir: float
    # load (checkpoint, D_m, test sets), before, method (the defense's own work), after, total; version <= 2 records:
    # method and total only (the others None)
    seconds: dict[str, float | None]
    before_source: str | None  # "measured" or "cache" (lightning_modules/defenses/evaluation.py); None: version <= 2
    defense_info: dict[str, Any]
    config: dict[str, Any]
    attacked_checkpoint: str
    attack_record: dict[str, Any]
    created: str
    versions: dict[str, str]
    # the retuning attack after "after" (lightning_modules/defenses/retuning.py): rta_acc, rta_asr, rta_ra, its
    # settings, its set (clean_source, size, poisons, poison_fraction) and the reference rows; None when off (and in
    # records written before it existed)
    retuned: dict[str, Any] | None


class AttackResult(TypedDict):
    schema_version: int
    key: str  # the grid's run key
    dataset: str
    attack: str  # as in DefenseResult
    backbone: str
    poison_ratio: float | None
    trigger: ClassConfig | None  # the trigger's config, JSON-safe (its state stays in the checkpoint)
    epochs: int | None  # epochs trained (the checkpoint's)
    seed: int | None  # the training seed; None when an older attack.json is read
    metrics: dict[str, float]  # test/acc, test/asr, test/ra
    seconds: float | None


# -- identity and names ---------------------------------------------------------------------------------------
def run_identity(record: BackdoorRecord) -> dict[str, Any]:
    """What an attacked model is, in the words every record and results table uses: class names."""
    attack = record["attack"] or {}
    return {"attack": attack.get("name", "clean"), "dataset": record["data"]["spec"]["name"],
            "backbone": record["backbone"]["class_path"].rpartition(".")[2], "poison_ratio": attack.get("poison_ratio")}


def defense_run_name(defense: str, spc: int | None, split_seed: int, ratio: float | None = None) -> str:
    """<defense>-spc<k>-seed<s> (or -ratio<r>- for a D_m given as a fraction): the folder of a `train.py` defense run
    and the readable part of a grid's defense run key."""
    budget = f"spc{spc}" if spc is not None else f"ratio{ratio}"
    return f"{defense}-{budget}-seed{split_seed}"


def attack_run_name(*parts: str | None) -> str:
    """<dataset>-<attack>-<backbone>[-...], parts that are None or empty left out ("run" if none is left)."""
    return "-".join(p for p in parts if p) or "run"


def training_seed() -> int | None:
    """The seed `seed_everything` gave this process (LightningCLI calls it before building the run), or None."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed is not None else None


# -- writing ------------------------------------------------------------------------------------------------
def backdoor_record(backbone: ClassConfig, data: DataRecord, attack: AttackRecord | None) -> BackdoorRecord:
    return BackdoorRecord(schema_version=SCHEMA_VERSION, backbone=backbone, data=data, attack=attack)


def defense_result(
    backdoor: BackdoorRecord,
    defense: str,
    data: dict[str, Any],
    before: Scores,
    after: Scores,
    scores: dict[str, float],
    seconds: dict[str, float],
    before_source: str,
    defense_info: dict[str, Any],
    config: dict[str, Any],
    attacked_checkpoint: str,
    seed: int | None,
    retuned: dict[str, Any] | None = None,
) -> DefenseResult:
    """The result record of a defense run. `data`: MitigationDataModule.record(); `scores`: arr, rdr, der, rir."""
    identity, attack = run_identity(backdoor), backdoor["attack"] or {}
    indices = attack.get("poison_indices")
    return DefenseResult(
        schema_version=SCHEMA_VERSION,
        attack=identity["attack"], defense=defense, dataset=identity["dataset"], backbone=identity["backbone"],
        poison_ratio=identity["poison_ratio"], num_poisoned=len(indices) if indices is not None else None,
        target=attack.get("target"), spc=data["spc"], ratio=data["ratio"], split_seed=data["split_seed"], seed=seed,
        val_convention=data["val_convention"], dm_source=data["dm_source"], before=before, after=after,
        arr=scores["arr"], rdr=scores["rdr"], der=scores["der"], rir=scores["rir"], seconds=seconds,
        before_source=before_source, defense_info=defense_info, config=config,
        attacked_checkpoint=attacked_checkpoint,
        attack_record={k: v for k, v in attack.items() if k not in ("trigger", "poison_indices")},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        versions={"torch": str(torch.__version__), "lightning": str(L.__version__)},
        retuned=retuned,
    )


def attack_result(key: str, checkpoint: dict[str, Any], seed: int | None, metrics: dict[str, float],
                  seconds: float | None, path: str | Path = "<checkpoint>") -> AttackResult:
    """The attack.json record of a finished attacked model, from its checkpoint (`load_checkpoint`)."""
    backdoor = read_record(checkpoint, path)
    identity, trigger = run_identity(backdoor), (backdoor["attack"] or {}).get("trigger")
    return AttackResult(
        schema_version=SCHEMA_VERSION, key=key, dataset=identity["dataset"], attack=identity["attack"],
        backbone=identity["backbone"], poison_ratio=identity["poison_ratio"],
        trigger=plain({k: trigger[k] for k in ("class_path", "init_args")}) if trigger else None,
        epochs=checkpoint.get("epoch"), seed=seed, metrics=metrics, seconds=seconds)


def plain(obj: Any) -> Any:
    """JSON-safe copy: tensors become lists (small) or a shape note (large), unknown objects their repr."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.tolist() if obj.numel() <= 64 else f"tensor{tuple(obj.shape)}"
    if obj is None:
        return None
    for kind in (bool, int, float, str):  # exact builtins: subclasses (TorchVersion, numpy scalars) are unsafe to load
        if isinstance(obj, kind):
            return kind(obj)
    return repr(obj)


def write_json(path: str | Path, obj: dict[str, Any]) -> None:
    """Atomic: a reader sees the old file or the whole new one (NaN written as NaN, as Python's json reads it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=True))
    os.replace(tmp, path)


# -- reading ------------------------------------------------------------------------------------------------
def schema_version(record: dict[str, Any], what: str) -> int:
    """The record's version: 1 for one written before `schema_version` existed; a newer one than this code
    knows is an error."""
    version = record.get("schema_version", 1)
    if not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
        raise ValueError(f"{what}: schema_version {version!r} is not one this code reads (1..{SCHEMA_VERSION}; "
                         f"a newer one was written by a newer version of this project: update the checkout)")
    return version


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """torch.load with weights_only=True and errors that say what is wrong with the file. `mmap`: tensors stay on
    disk until touched (reading a record alone costs little)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found; attack runs write <run>/checkpoints/last.ckpt "
            f"(e.g. runs/<name>/version_0/checkpoints/last.ckpt)"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as err:
        raise ValueError(
            f"cannot read checkpoint {path}: it is truncated, corrupt, or holds objects that are unsafe to "
            f"load ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Re-run the "
            f"attack that wrote it."
        ) from err
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} does not hold a Lightning checkpoint (found {type(ckpt).__name__})")
    return ckpt


def read_record(ckpt: dict[str, Any], path: str | Path = "<checkpoint>") -> BackdoorRecord:
    """The checkpoint's BackdoorRecord, at SCHEMA_VERSION (version 1 named its version `version`)."""
    record = ckpt.get(BACKDOOR_KEY)
    if not isinstance(record, dict):
        raise ValueError(
            f"{path} has no '{BACKDOOR_KEY}' record: it was not written by this project's attack training "
            f"(train.py fit with a victim or attack model), so its data and trigger cannot be rebuilt"
        )
    legacy = {k: v for k, v in record.items() if k != "version"}
    if "schema_version" not in record and "version" in record:
        legacy["schema_version"] = record["version"]
    schema_version(legacy, f"{path}: backdoor record")
    missing = {"backbone", "data", "attack"} - set(legacy)
    if missing:
        raise ValueError(f"{path}: the backdoor record lacks {sorted(missing)}; the file is inconsistent or was edited")
    backbone = legacy["backbone"]
    if isinstance(backbone, dict) and isinstance(backbone.get("class_path"), str):
        legacy["backbone"] = {**backbone, "class_path": current_class_path(backbone["class_path"])}
    return BackdoorRecord(**{**legacy, "schema_version": SCHEMA_VERSION})


def load_record(path: str | Path, mmap: bool = False) -> BackdoorRecord:
    return read_record(load_checkpoint(path, mmap=mmap), path)


def read_result(result: dict[str, Any], path: str | Path = "<result>") -> DefenseResult:
    """A result.json record at SCHEMA_VERSION (version 1 did not state the training seed: None; versions 1-2 timed
    the method as `defense` and did not time loading and the measurements: None)."""
    if schema_version(result, f"{path}") <= 2:
        old = result.get("seconds") or {}
        seconds = {"load": None, "before": None, "method": old.get("defense"), "after": None, "total": old.get("total")}
        result = {**result, "seconds": seconds, "before_source": None}
    return DefenseResult(**{"seed": None, "retuned": None, **result, "schema_version": SCHEMA_VERSION})


def load_result(path: str | Path) -> DefenseResult:
    return read_result(json.loads(Path(path).read_text()), path)


def read_attack_result(marker: dict[str, Any], checkpoint: Callable[[], dict[str, Any]],
                       path: str | Path = "<attack.json>") -> AttackResult:
    """An attack.json record at SCHEMA_VERSION. Version 1 held the grid's planned fields, not what the run was:
    that is read from the attacked model's checkpoint, `checkpoint()` (`load_checkpoint`), the seed from the plan."""
    if schema_version(marker, f"{path}") >= 2:
        return AttackResult(**{**marker, "schema_version": SCHEMA_VERSION})
    return attack_result(marker["key"], checkpoint(), marker.get("fields", {}).get("seed"), marker["metrics"],
                         marker.get("seconds"), path)
