"""The retuning attack (RtA, lightning_modules/defenses/retuning.py) again on finished defense runs, from their saved
defended checkpoints, with other settings (k = 1, another retuning set, QRA): the defenses are not run again.

    python grid.py retune runs/grids/retuning_cifar10_cpu runs/grids/retuning_k1_cifar10_cpu_posthoc --set k=1

For each finished defense run of the source runs folder (result.json and checkpoints/last.ckpt), the run's own
config.yaml builds its defense on the attacked model and its DataModule with the retuning settings (the run's,
changed by `--set`); the reference rows (attacked and clean model retuned) are measured on the attacked weights,
or read from their cache beside the attacked checkpoint; then the defended weights are loaded, "after" is measured
again (it must equal the run's: a check that this is the run's defended model) and retuned. The destination gets
`defenses/<attack>/<run>/result.json`: the source's record with the new `retuned` block, `seconds.retune` replaced
and `retuned_from` (the source run and its retuning settings), so `benchmarks.tables retuning` and `grid.py report`
read it like any grid's runs (report the destination on its own: over a folder holding both, each defense run
would count twice). Its run key is the source's plus "+rta-<hash of the changes>". Resumable: runs with a result
are skipped.
Cost: per run, the defense's construction (a second), one test-set pass for the check and the RtA itself (10-15 s on
CIFAR-10 SmallCNN on one CPU thread, measured), against a full defense run (2-110 s there).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L

from datamodules.record import load_checkpoint, write_json

AFTER_TOLERANCE = 1e-3  # the re-measured "after" may differ from the run's by float summation order, no more


class RetuneDefended(L.Callback):
    """At the start of the test stage, on the defense built from the attacked model: the reference rows, then the
    defended weights of `checkpoint` loaded, "after" measured and the retuning attack run; the block, the new
    "after" and the seconds go to `out` (JSON)."""

    def __init__(self, checkpoint: str, out: str) -> None:
        self.checkpoint, self.out = checkpoint, out

    def on_test_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from lightning_modules.defenses import retuning

        start = time.perf_counter()
        references, _ = retuning.reference_rows(module)
        state = load_checkpoint(self.checkpoint, map_location=module.device)["state_dict"]
        module.load_state_dict(state)
        module.eval()
        after = module.measure()
        block = retuning.retune_defended(module, references)
        if block is None:
            raise ValueError(f"{self.checkpoint}: the retuning set is empty (retuning off, or a clean model)")
        write_json(Path(self.out), {"retuned": block, "after": after, "seconds": time.perf_counter() - start})


def change_key(changes: dict[str, Any]) -> str:
    return "rta-" + hashlib.sha256(json.dumps(changes, sort_keys=True).encode()).hexdigest()[:8]


def retune_run(run_dir: Path, dst_dir: Path, changes: dict[str, Any]) -> dict[str, Any]:
    """Retune one finished defense run (see the module's docstring); returns its new record."""
    from experiments.runner import redirect_fds
    from lightning_modules.cli import BackdoorCLI

    record = json.loads((run_dir / "result.json").read_text())
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{run_dir}: no defended checkpoint ({checkpoint}); the run was made with "
                                f"save_defended false and cannot be retuned without running its defense again")
    dst_dir.mkdir(parents=True, exist_ok=True)
    scratch = dst_dir / "retuned.partial.json"
    callback = {"class_path": "experiments.retune.RetuneDefended",
                "init_args": {"checkpoint": str(checkpoint), "out": str(scratch)}}
    args = ["test", "--config", str(run_dir / "config.yaml"),
            *(a for key, value in changes.items()
              for a in (f"--data.init_args.retune.{key}", json.dumps(value))),
            "--trainer.logger", "false", "--trainer.callbacks", json.dumps([callback]),
            "--trainer.inference_mode", "false", "--trainer.limit_test_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--verbose", "false"]
    argv, sys.argv = sys.argv, [sys.argv[0]]  # LightningCLI warns when argv and args both hold arguments
    try:
        with open(dst_dir / "log.txt", "w") as log, redirect_fds(log.fileno()):
            BackdoorCLI(args=args, save_config_callback=None)  # no logger: its config.yaml would land in the cwd
    finally:
        sys.argv = argv
    out = json.loads(scratch.read_text())
    scratch.unlink()
    drift = max(abs(out["after"][k] - record["after"][k]) for k in record["after"])
    if not drift <= AFTER_TOLERANCE:
        raise ValueError(f"{run_dir}: the defended checkpoint measures {out['after']}, the run recorded "
                         f"{record['after']}: it is not the run's defended model (was the run folder changed?)")
    previous = {k: v for k, v in (record.get("retuned") or {}).items() if k not in ("references", "qra")}
    record["retuned"] = out["retuned"]
    record["retuned_from"] = {"run": str(run_dir), "retuned": previous or None, "changes": changes,
                              "after_drift": drift}
    record["seconds"] = {**record["seconds"], "retune": out["seconds"]}
    return record


def retune_runs(src: str | Path, dst: str | Path, changes: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Retune every finished defense run under `src` into `dst` (resumable); returns counts and failures."""
    from tqdm import tqdm

    src, dst = Path(src), Path(dst)
    runs = sorted(p.parent for p in src.glob("defenses/*/*/result.json"))
    if not runs:
        raise FileNotFoundError(f"{src}: no finished defense runs (defenses/<attack>/<run>/result.json)")
    suffix, failures, done = change_key(changes), [], 0
    for run_dir in tqdm(runs, desc=f"retune {src.name}", unit="run", disable=not progress):
        out_dir = dst / "defenses" / run_dir.parent.name / f"{run_dir.name}+{suffix}"
        if (out_dir / "result.json").is_file():
            done += 1
            continue
        try:
            source_run = json.loads((run_dir / "run.json").read_text())  # the grid runner's record of the run
            record = retune_run(run_dir, out_dir, changes)
        except Exception as err:  # noqa: BLE001 - one bad run must not stop the others: listed, redone next time
            failures.append({"run": str(run_dir), "error": " ".join(str(err).split())})
            continue
        write_json(out_dir / "run.json", {**source_run, "key": f"{source_run['key']}+{suffix}",
                                          "retuned_from": str(run_dir)})
        write_json(out_dir / "result.json", record)  # last: a result.json marks a finished run
        done += 1
    return {"runs": len(runs), "done": done, "failures": failures}


def parse_changes(items: list[str]) -> dict[str, Any]:
    """`k=1` -> {"k": 1}: values read as YAML (numbers, booleans, null, strings)."""
    import yaml

    from datamodules.retuning import Retuning

    fields = set(Retuning.__dataclass_fields__)
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set {item!r}: expected <setting>=<value> with a setting of datamodules/retuning.py "
                             f"({', '.join(sorted(fields))})")
        changes[key] = yaml.safe_load(value)
    if not changes:
        raise SystemExit("retune: nothing to change; give at least one --set <setting>=<value> (e.g. --set k=1)")
    try:  # bad values fail here, before any run
        Retuning(**{"clean_model": "checked per run", **changes})
    except (TypeError, ValueError) as err:
        raise SystemExit(f"--set: {err}") from None
    return changes
