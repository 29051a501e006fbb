"""The benchmark as one job: run a grid, make W&B sweeps of it, collect results, draw the report.

    python grid.py run configs/grids/quickstart.yaml                  # offline, CPU, a few minutes
    python grid.py run configs/grids/survey.yaml --devices 0,1,2,3    # one worker per GPU
    python grid.py count configs/grids/survey.yaml                    # how many runs the grid expands to
    python grid.py check configs/grids/survey.yaml                    # is every run feasible? (nothing trained)
    python grid.py sweep configs/grids/survey.yaml                    # W&B sweep YAMLs (sub-sweeps)
    python grid.py one configs/grids/survey.yaml --run <key>          # one run (what sweep agents execute)
    python grid.py report runs/                                       # every grid under runs/: tables + figures
    python grid.py retune runs/grids/g runs/grids/g_k1 --set k=1      # RtA again on finished runs' defended models
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from datamodules.errors import short_errors
from experiments.grid import Grid
from experiments.sweeps import DEFAULT_MAX_RUNS


def load(path: str) -> Grid:
    """Grid.load, with a bad grid file reported in one line instead of a traceback."""
    try:
        return Grid.load(path)
    except (OSError, ValueError, TypeError, AttributeError, KeyError, yaml.YAMLError) as err:
        message = " ".join(str(err).split())
        raise SystemExit(message if message.startswith(f"{Path(path)}:") else f"{path}: {message}") from None


def checked(grid: Grid, command: str) -> None:
    """Refuse to start `command` on a grid with infeasible runs (see `grid.py check`)."""
    from experiments.check import check_grid

    report = check_grid(grid)
    if report.infeasible:
        print("\n".join(report.lines()))
        raise SystemExit(f"{grid.name}: not starting `grid.py {command}`: {report.infeasible} of {report.cells} runs "
                         f"cannot run (above); fix the grid and check it with `python grid.py check {grid.source}`")
    print(f"{grid.name}: checked, {report.lines()[-1]}")


def cmd_count(args: argparse.Namespace) -> None:
    grid = load(args.grid)
    attacks = grid.attack_runs()
    defenses = grid.defense_runs(attacks)
    print(f"{grid.name}: {len(attacks)} attacked models, {len(defenses)} defense runs")


def cmd_check(args: argparse.Namespace) -> None:
    from experiments.check import check_grid

    report = check_grid(load(args.grid))
    print("\n".join(report.lines()))
    if report.infeasible:
        sys.exit(1)


def cmd_run(args: argparse.Namespace) -> None:
    from experiments.runner import run_grid

    grid = load(args.grid)
    if not args.skip_check:
        checked(grid, "run")
    devices = ["cpu"] if args.devices == "cpu" else args.devices.split(",")
    try:
        summary = run_grid(grid, devices, args.jobs_per_device, args.wandb_project, progress=not args.quiet)
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM (experiments/runner.py)
        print(f"{grid.name}: interrupted ({err or 'SIGINT'}); finished runs are kept, the same command resumes")
        sys.exit(130)
    failures = summary["failures"]
    print(f"{grid.name}: {summary['attacks']} attacked models, {summary['defenses']} defense runs, "
          f"{len(failures)} failed; results under {grid.runs_dir}")
    for f in failures:
        print(f"  FAILED {f['kind']} {f['key']}: {f['error']} (see {f['log']})")
    if summary["busy"]:
        print(f"  {len(summary['busy'])} runs were being run by another runner or agent and were left to it "
              f"(with an attacked model, its defense runs): {', '.join(summary['busy'])}; run this command again "
              f"once it has finished to pick up anything it did not")
    if failures:
        sys.exit(1)


@contextmanager
def locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cmd_one(args: argparse.Namespace) -> None:
    from experiments.runner import attack_job, defense_job, execute, read_marker

    grid = load(args.grid)  # no full check here: once per sweep job, it must stay fast
    project = args.wandb_project
    if project is None and os.environ.get("WANDB_SWEEP_ID"):  # under a sweep agent: log to the sweep's project
        project = os.environ.get("WANDB_PROJECT", "backdoor-mitigation-bench")
    attacks = {a.key: a for a in grid.attack_runs()}
    attack_key, _, defense_key = args.run.partition("/")
    if attack_key not in attacks:
        raise SystemExit(f"no attacked model {attack_key!r} in {args.grid} (see `python grid.py count`)")
    attack = attacks[attack_key]

    def trained(model: Any, log_to: str | None) -> None:
        with locked(grid.runs_dir / "locks" / f"{model.key}.lock"):  # agents share one training of each model
            if read_marker(grid.attack_dir(model), "attack") is None:
                outcome = execute(attack_job(grid, model, log_to))
                if outcome["status"] == "busy":
                    raise SystemExit(f"attacked model {model.key} is being trained by another runner; run this "
                                     f"again once it has finished")
                if outcome["status"] != "done":
                    raise SystemExit(f"attack {model.key} failed: {outcome['error']}")

    trained(attack, project if not defense_key else None)
    if defense_key:
        # planned over all attacked models, as the runner plans: a retuning run names the grid's clean model
        runs = {d.key: d for d in grid.defense_runs(list(attacks.values())) if d.attack.key == attack_key}
        if defense_key not in runs:
            raise SystemExit(f"no defense run {defense_key!r} for {attack_key} in {args.grid}")
        for model in runs[defense_key].needs:  # the retuning's clean reference model
            trained(model, None)
        outcome = execute(defense_job(grid, runs[defense_key], project))
        if outcome["status"] == "busy":  # e.g. two agents handed the same key: the other one runs it
            print(f"{args.run}: being run by another runner or agent; left to it")
            return
        if outcome["status"] != "done":
            raise SystemExit(f"{args.run} failed: {outcome['error']}")
    print(f"{args.run}: done")


def cmd_sweep(args: argparse.Namespace) -> None:
    from experiments.sweeps import write_sweeps

    grid = load(args.grid)
    if not args.skip_check:
        checked(grid, "sweep")
    out = Path(args.out or grid.runs_dir / "sweeps")
    paths = write_sweeps(grid, args.grid, out, args.max_runs)
    print(f"wrote {len(paths)} sweep configs and launch.sh to {out}. `bash {out / 'launch.sh'} <project>` creates "
          f"the sweeps (attack sweeps first) and prints one agent command per sweep; run it on any number of "
          f"machines, e.g. `wandb agent --count 1 <entity>/<project>/<sweep id>` per SLURM job")


def cmd_report(args: argparse.Namespace) -> None:
    from experiments.report import write_report
    from experiments.results import collect, collect_attacks, collect_wandb, combine, save

    table = collect(args.runs_dir)  # every grid under runs_dir
    if args.wandb_project:
        table = combine(table, collect_wandb(args.wandb_project, args.wandb_entity))
    attacks = collect_attacks(args.runs_dir)
    out = Path(args.out or Path(args.runs_dir) / "report")
    save(table, out)
    save(attacks, out, "attacks")
    path = write_report(table, out, attacks)
    print(f"{len(table)} defense runs, {len(attacks)} attacked models -> {path} "
          f"(and report.html, results.csv, attacks.csv)")


def cmd_retune(args: argparse.Namespace) -> None:
    from experiments.retune import parse_changes, retune_runs

    changes = parse_changes(args.set)
    outcome = retune_runs(args.src, args.dst, changes, progress=not args.quiet)
    for failure in outcome["failures"]:
        print(f"failed: {failure['run']}: {failure['error']}", file=sys.stderr)
    print(f"{outcome['done']} of {outcome['runs']} runs retuned with {changes} -> {args.dst}"
          + (f"; {len(outcome['failures'])} failed (listed above; run the command again to retry them)"
             if outcome["failures"] else ""))
    if outcome["failures"]:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("count", help="print how many runs a grid expands to")
    p.add_argument("grid")
    p.set_defaults(func=cmd_count)
    p = sub.add_parser("check", help="check that every run of a grid parses and is feasible, training nothing")
    p.add_argument("grid")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("run", help="run every unfinished run of a grid")
    p.add_argument("grid")
    p.add_argument("--devices", default="cpu", help="'cpu' or comma-separated GPU indices, e.g. 0,1,2,3")
    p.add_argument("--jobs-per-device", type=int, default=1)
    p.add_argument("--wandb-project", default=None, help="also log every run to this W&B project")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--skip-check", action="store_true", help="start without `grid.py check` first")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("one", help="run one run of a grid by key (what W&B sweep agents call)")
    p.add_argument("grid")
    p.add_argument("--run", required=True, help="<attack key> or <attack key>/<defense key>")
    p.add_argument("--wandb-project", default=None)
    p.set_defaults(func=cmd_one)
    p = sub.add_parser("sweep", help="write W&B sweep configs for a grid")
    p.add_argument("grid")
    p.add_argument("--out", default=None)
    p.add_argument("--max-runs", type=int, default=DEFAULT_MAX_RUNS,
                   help=f"run keys per sub-sweep (default {DEFAULT_MAX_RUNS})")
    p.add_argument("--skip-check", action="store_true", help="write the sweeps without `grid.py check` first")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("report", help="results table, figures and summary from a runs folder")
    p.add_argument("runs_dir")
    p.add_argument("--out", default=None)
    p.add_argument("--wandb-project", default=None, help="also collect defense runs from this W&B project")
    p.add_argument("--wandb-entity", default=None)
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("retune", help="the retuning attack again, with other settings, on the defended models of "
                                      "finished runs (experiments/retune.py)")
    p.add_argument("src", help="a runs folder with finished defense runs")
    p.add_argument("dst", help="where the retuned runs' records go")
    p.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE",
                   help="a retuning setting to change (datamodules/retuning.py), e.g. k=1; repeatable")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_retune)
    args = parser.parse_args(argv)
    with short_errors("grid.py"):
        args.func(args)


if __name__ == "__main__":
    main()
