"""The results store: every finished run under a runs folder (and W&B runs when online) as one table.

One row per defense run, from its record (result.json, datamodules/record.py): what it was (dataset, attack,
backbone, poison_ratio, defense, spc, split_seed, training seed; attacks, backbones and defenses by class name),
ACC / ASR / RA before and after, ARR, RDR, DER, RIR, seconds; the grid's run.json only gives its run key. One row
per attacked model in the attack table, from its attack.json record (test ACC / ASR / RA and seconds of its
training). Records are found at any depth in the grid layout (<grid runs dir>/defenses/<attack key>/<run
key>/result.json and <grid runs dir>/attacks/<attack key>/attack.json), so `runs/` collects every grid under it.
Written as CSV, and Parquet when pyarrow is installed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from datamodules.record import (
    AttackResult,
    DefenseResult,
    load_checkpoint,
    load_result,
    read_attack_result,
    read_result,
)

KEY = "run_key"  # "<attack key>/<defense run key>": the same configuration wherever it ran
METRICS = ["acc", "asr", "ra"]
NAMES = ["dataset", "attack", "backbone", "poison_ratio", "defense", "spc", "split_seed", "seed"]
# the retuning attack (lightning_modules/defenses/retuning.py): the defended model's rta_* and the reference rows'
# ASR after the same retuning; NaN when a run had it off
RETUNED = ["rta_acc", "rta_asr", "rta_ra", "rta_k", "rta_poison_fraction", "rta_asr_backdoored", "rta_asr_clean",
           "qra_asr", "qra_clean_flip", "qra_asr_clean_model", "qra_clean_flip_clean_model"]
COLUMNS = [*NAMES, "attack_key", KEY, *(f"{m}_{s}" for s in ("before", "after") for m in METRICS),
           "arr", "rdr", "der", "rir", *RETUNED, "seconds", "seconds_total", "before_source", "grid", "source"]
ATTACK_COLUMNS = ["dataset", "attack", "backbone", "poison_ratio", "seed", "epochs", "acc", "asr", "ra", "seconds",
                  "attack_key", "grid", "source"]


def record_row(result: DefenseResult, run_key: str, grid: str, source: str) -> dict[str, Any]:
    row = {k: result[k] for k in NAMES} | {"attack_key": run_key.partition("/")[0], KEY: run_key}
    for stage in ("before", "after"):
        for m in METRICS:
            row[f"{m}_{stage}"] = result[stage][m]
    row |= {k: result[k] for k in ("arr", "rdr", "der", "rir")}
    retuned = result.get("retuned") or {}
    refs = retuned.get("references") or {}
    row |= {k: retuned.get(k, math.nan) for k in ("rta_acc", "rta_asr", "rta_ra")}
    row |= {"rta_k": retuned.get("k", math.nan), "rta_poison_fraction": retuned.get("poison_fraction", math.nan)}
    row |= {f"rta_asr_{ref}": (refs.get(ref) or {}).get("rta_asr", math.nan) for ref in ("backdoored", "clean")}
    qra = retuned.get("qra") or {}
    row |= {f"qra_{k}": qra.get(k, math.nan) for k in ("asr", "clean_flip")}
    row |= {f"qra_{k}_clean_model": (qra.get("clean_model") or {}).get(k, math.nan) for k in ("asr", "clean_flip")}
    row["seconds"] = result["seconds"]["method"]
    row["seconds_total"] = result["seconds"]["total"]
    row["before_source"] = result["before_source"]
    row |= {"grid": grid, "source": source}
    return row


def grid_name(runs_dir: Path, grid_dir: Path) -> str:
    """A grid's runs dir as named in a report over `runs_dir` ("." for runs_dir itself)."""
    return grid_dir.relative_to(runs_dir).as_posix() if grid_dir != runs_dir else "."


def drop_duplicates(table: pd.DataFrame, key: str, what: str) -> pd.DataFrame:
    """One row per key, the first one kept: the same configuration run in two grids is one run (its key hashes
    every argument and config file), and counting it twice would weigh it double in every median."""
    duplicated = table.duplicated(key)
    if duplicated.any():
        print(f"{what}: {int(duplicated.sum())} runs found more than once (same {key}); kept the first of each, "
              f"left out {table.loc[duplicated, 'source'].tolist()}", file=sys.stderr)
    return table[~duplicated].reset_index(drop=True)


def collect(runs_dir: str | Path) -> pd.DataFrame:
    """Defense results of every grid under runs_dir; unfinished runs (no result.json yet) are left out."""
    runs_dir = Path(runs_dir)
    rows = []
    for path in sorted(runs_dir.glob("**/defenses/*/*/result.json")):
        try:
            run_key = json.loads((path.parent / "run.json").read_text())["key"]
        except (OSError, ValueError, KeyError):
            continue  # a defense run of train.py's own layout, not the grid runner's
        rows.append(record_row(load_result(path), run_key, grid_name(runs_dir, path.parents[3]), str(path)))
    return drop_duplicates(pd.DataFrame(rows, columns=COLUMNS), KEY, str(runs_dir))


def collect_attacks(runs_dir: str | Path) -> pd.DataFrame:
    """One row per finished attacked model under runs_dir (its attack.json marker, experiments/runner.py)."""
    runs_dir = Path(runs_dir)
    rows = []
    for path in sorted(runs_dir.glob("**/attacks/*/attack.json")):
        try:
            record = load_attack_result(path)
        except (FileNotFoundError, ValueError) as err:
            print(f"{path}: left out ({err})", file=sys.stderr)
            continue
        rows.append({**{k: record[k] for k in ("dataset", "attack", "backbone", "poison_ratio", "seed", "epochs")},
                     **{k.removeprefix("test/"): v for k, v in record["metrics"].items()},
                     "seconds": record["seconds"], "attack_key": record["key"],
                     "grid": grid_name(runs_dir, path.parents[2]), "source": str(path)})
    return drop_duplicates(pd.DataFrame(rows, columns=ATTACK_COLUMNS), "attack_key", str(runs_dir))


def load_attack_result(path: str | Path) -> AttackResult:
    """The attack.json record at `path`; an older one is completed from the checkpoint beside it."""
    path = Path(path)
    checkpoint = path.parent / "checkpoints" / "last.ckpt"
    return read_attack_result(json.loads(path.read_text()), lambda: load_checkpoint(checkpoint, mmap=True), path)


def wandb_rows(runs: Any) -> list[dict[str, Any]]:
    """Rows from W&B runs (wandb.Api().runs(...)) logged by defense runs of the grid runner: from the result record
    in their config (`result`); runs that did not finish (no after/ metrics) are left out."""
    rows = []
    for run in runs:
        summary, config = dict(run.summary), dict(run.config)
        flat = [f"{stage}/{m}" for stage in ("before", "after") for m in METRICS] + ["arr", "rdr", "der", "rir"]
        if any(k not in summary for k in flat):
            continue
        path = "/".join(run.path) if isinstance(run.path, (list, tuple)) else str(run.path)
        record = config.get("result")
        if not isinstance(record, dict):  # logged before runs put their record in the config
            record = legacy_wandb_record(summary, config)
        run_key = config.get("run_key") or run.name  # the runner names each W&B run by its run key
        rows.append(record_row(read_result(record, f"wandb:{path}"), run_key, f"wandb:{path.rpartition('/')[0]}",
                               f"wandb:{path}"))
    return rows


def legacy_wandb_record(summary: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a result record that a W&B run without one logged: its metrics, and the grid's names turned
    into the record's (class names, through the registries)."""
    from core.backbones import BACKBONES
    from datamodules.triggers import TRIGGERS
    from lightning_modules.attacks import ATTACKS
    from lightning_modules.defenses import DEFENSES

    def class_name(registry: Any, key: Any) -> Any:
        return registry[key].__name__ if key in registry else key

    fields = config.get("grid") or {}
    result: dict[str, Any] = {stage: {m: summary[f"{stage}/{m}"] for m in METRICS} for stage in ("before", "after")}
    result |= {k: summary[k] for k in ("arr", "rdr", "der", "rir")}
    result["seconds"] = {"defense": summary.get("seconds/defense"), "total": None}  # a version 1 record
    attack = fields.get("attack")
    result |= {"dataset": fields.get("dataset"), "poison_ratio": fields.get("poison_ratio"),
               "attack": class_name(ATTACKS if attack in ATTACKS else TRIGGERS, attack),
               "backbone": class_name(BACKBONES, fields.get("backbone")),
               "defense": class_name(DEFENSES, fields.get("defense")),
               "spc": fields.get("spc"), "split_seed": fields.get("split_seed"), "seed": None}
    return result


def collect_wandb(project: str, entity: str | None = None) -> pd.DataFrame:
    import wandb

    path = f"{entity}/{project}" if entity else project
    return pd.DataFrame(wandb_rows(wandb.Api().runs(path, filters={"jobType": "defense"})), columns=COLUMNS)


def combine(local: pd.DataFrame, remote: pd.DataFrame) -> pd.DataFrame:
    """Local rows and W&B rows, one per run key; a run found in both keeps its local row (the record itself)."""
    parts = [t for t in (local, remote) if len(t)]
    table = pd.concat(parts, ignore_index=True) if parts else local
    return table.drop_duplicates(KEY, keep="first").reset_index(drop=True)


def save(table: pd.DataFrame, out_dir: str | Path, name: str = "results") -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.csv"]
    table.to_csv(paths[0], index=False)
    try:
        table.to_parquet(out / f"{name}.parquet", index=False)
        paths.append(out / f"{name}.parquet")
    except ImportError:
        pass
    return paths
