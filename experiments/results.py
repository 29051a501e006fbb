"""The results store: every finished run under a runs folder (and W&B runs when online) as one table.

One row per defense run: the grid's names (dataset, attack, backbone, poison_ratio, defense, spc, split_seed),
ACC / ASR / RA before and after, ARR, RDR, DER, RIR, seconds, its run key and where the record lives. One row
per attacked model in the attack table (test ACC / ASR / RA and seconds of its training). Records are found at
any depth in the grid layout (<grid runs dir>/defenses/<attack key>/<run key>/result.json and
<grid runs dir>/attacks/<attack key>/attack.json), so `runs/` collects every grid under it. Written as CSV, and
Parquet when pyarrow is installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

KEY = "run_key"  # "<attack key>/<defense run key>": the same configuration wherever it ran
METRICS = ["acc", "asr", "ra"]
NAMES = ["dataset", "attack", "backbone", "poison_ratio", "defense", "spc", "split_seed"]
COLUMNS = [*NAMES, "attack_key", KEY, *(f"{m}_{s}" for s in ("before", "after") for m in METRICS),
           "arr", "rdr", "der", "rir", "seconds", "seconds_total", "method", "grid", "source"]
ATTACK_COLUMNS = ["dataset", "attack", "backbone", "poison_ratio", "seed", "acc", "asr", "ra", "seconds",
                  "attack_key", "grid", "source"]


def record_row(result: dict[str, Any], fields: dict[str, Any], run_key: str, grid: str,
               source: str) -> dict[str, Any]:
    row = {k: fields.get(k) for k in NAMES} | {"attack_key": run_key.partition("/")[0], KEY: run_key}
    for stage in ("before", "after"):
        for m in METRICS:
            row[f"{m}_{stage}"] = result[stage][m]
    row |= {k: result[k] for k in ("arr", "rdr", "der", "rir")}
    row["seconds"] = result["seconds"]["defense"]
    row["seconds_total"] = result["seconds"]["total"]
    row |= {"method": result.get("defense"), "grid": grid, "source": source}
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
            run = json.loads((path.parent / "run.json").read_text())
        except (OSError, ValueError):
            continue  # a defense run of train.py's own layout, not the grid runner's
        result = json.loads(path.read_text())
        rows.append(record_row(result, run["fields"], run["key"], grid_name(runs_dir, path.parents[3]), str(path)))
    return drop_duplicates(pd.DataFrame(rows, columns=COLUMNS), KEY, str(runs_dir))


def collect_attacks(runs_dir: str | Path) -> pd.DataFrame:
    """One row per finished attacked model under runs_dir (its attack.json marker, experiments/runner.py)."""
    runs_dir = Path(runs_dir)
    rows = []
    for path in sorted(runs_dir.glob("**/attacks/*/attack.json")):
        marker = json.loads(path.read_text())
        fields = {**marker["fields"], **configured_ratio(path.parent / "config.yaml")}
        rows.append({**fields, **{k.removeprefix("test/"): v for k, v in marker["metrics"].items()},
                     "seconds": marker.get("seconds"), "attack_key": marker["key"],
                     "grid": grid_name(runs_dir, path.parents[2]), "source": str(path)})
    return drop_duplicates(pd.DataFrame(rows, columns=ATTACK_COLUMNS), "attack_key", str(runs_dir))


def configured_ratio(config_file: Path) -> dict[str, float]:
    """{"poison_ratio": the ratio the run used} from its saved LightningCLI config (a grid's per-attack arguments
    can override the grid's ratio axis, e.g. SIG on digits), or {} when there is no readable one."""
    try:
        config = yaml.safe_load(config_file.read_text()) or {}
        return {"poison_ratio": float(config["data"]["init_args"]["poison_ratio"])}
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return {}


def wandb_rows(runs: Any) -> list[dict[str, Any]]:
    """Rows from W&B runs (wandb.Api().runs(...)) logged by defense runs of the grid runner; runs that did not
    finish (no after/ metrics) are left out."""
    rows = []
    for run in runs:
        summary, config = dict(run.summary), dict(run.config)
        flat = [f"{stage}/{m}" for stage in ("before", "after") for m in METRICS] + ["arr", "rdr", "der", "rir"]
        if any(k not in summary for k in flat):
            continue
        result = {stage: {m: summary[f"{stage}/{m}"] for m in METRICS} for stage in ("before", "after")}
        result |= {k: summary[k] for k in ("arr", "rdr", "der", "rir")}
        result["seconds"] = {"defense": summary.get("seconds/defense"), "total": None}
        fields = config.get("grid") or {}
        model = config.get("model") if isinstance(config.get("model"), dict) else {}
        # the Defense class, as LightningCLI logged it; else by the convention of lightning_modules/defenses/
        # (the class in <name>.py is NAME)
        class_name = str(model.get("class_path") or "").rpartition(".")[2]
        result["defense"] = class_name or str(fields.get("defense", "")).upper()
        run_key = config.get("run_key") or run.name  # the runner names each W&B run by its run key
        path = "/".join(run.path) if isinstance(run.path, (list, tuple)) else str(run.path)
        rows.append(record_row(result, fields, run_key, f"wandb:{path.rpartition('/')[0]}", f"wandb:{path}"))
    return rows


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
