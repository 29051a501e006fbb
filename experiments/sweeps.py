"""W&B sweeps for a grid: how the benchmark scales past one machine.

Every sub-sweep is a grid-method sweep over one parameter, `run`, whose values are run keys; each agent run
executes the same single-run command, `python grid.py one <grid.yaml> --run=<key>`, which is idempotent (a
finished run is skipped) and trains a missing attacked model first under a file lock. W&B's grid search
enumerates every value listed in the sweep config, and large grid sweeps are reported to time out when created
(wandb/wandb#780) and not to terminate (wandb/wandb#8549), so the runs are split into sub-sweeps of at most
`max_runs` keys (250 by default, ~20 KB of YAML each; the survey's 124,128 defense runs make 497 of them).
`launch.sh`, written beside the YAMLs, creates them all with `wandb sweep` (attack sweeps first) and prints the
agent command of each. W&B groups runs by attacked model (group = attack key) with job type attack / defense.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

from experiments.grid import Grid

DEFAULT_MAX_RUNS = 250

LAUNCH = """#!/usr/bin/env bash
# Creates the W&B sweeps of {grid_file} (written by `python grid.py sweep`), attack sweeps first, and prints
# the agent command of each; the commands are also written to agents.txt here. Agents run `grid.py` from the
# directory they start in: start them from the repository root, e.g. one per SLURM job:
#   sbatch --gres=gpu:1 --wrap "cd <repo> && wandb agent --count 1 <entity>/<project>/<sweep id>"
#   bash {script} <project> [<entity>]
set -euo pipefail
project=${{1:?usage: bash launch.sh <project> [<entity>]}}
entity=${{2:-}}
here=$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)
agents=()
for file in {files}; do
    if ! out=$(WANDB_SILENT=false wandb sweep --project "$project" ${{entity:+--entity "$entity"}} "$here/$file" \
            2>&1); then
        printf '%s\\n' "$out" >&2
        exit 1
    fi
    agent=$(printf '%s\\n' "$out" | sed 's/\\x1b\\[[0-9;]*m//g' | sed -n 's/.*Run sweep agent with: //p' | tail -n 1)
    if [ -z "$agent" ]; then
        printf 'no agent command in the output of `wandb sweep %s`:\\n%s\\n' "$file" "$out" >&2
        exit 1
    fi
    echo "$file: $agent"
    agents+=("${{agent/wandb agent /wandb agent --count 1 }}")
done
printf '%s\\n' "${{agents[@]}}" > "$here/agents.txt"
echo "${{#agents[@]}} sweeps created; run these agent commands (any number of each, from the repository root):"
printf '  %s\\n' "${{agents[@]}}"
"""


def chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def sweep_configs(grid: Grid, grid_file: str | Path, max_runs: int = DEFAULT_MAX_RUNS) -> dict[str, dict[str, Any]]:
    if max_runs < 1:
        raise ValueError(f"max_runs must be >= 1, got {max_runs}")
    attacks = grid.attack_runs()
    defense_keys = [f"{d.attack.key}/{d.key}" for d in grid.defense_runs(attacks)]
    stages = [("attacks", [a.key for a in attacks]), ("defenses", defense_keys)]
    configs = {}
    for stage, keys in stages:
        for i, part in enumerate(chunks(keys, max_runs)):
            name = f"{grid.name}-{stage}-{i:03d}"
            configs[name] = {
                "name": name,
                "program": "grid.py",
                "method": "grid",
                "command": ["${env}", "${interpreter}", "${program}", "one", str(grid_file), "${args}"],
                "parameters": {"run": {"values": part}},
            }
    return configs


def write_sweeps(
    grid: Grid, grid_file: str | Path, out_dir: str | Path, max_runs: int = DEFAULT_MAX_RUNS
) -> list[Path]:
    """The sweep YAMLs (replacing this grid's earlier ones) and launch.sh under out_dir; returns the YAMLs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob(f"{grid.name}-attacks-*.yaml"), *out.glob(f"{grid.name}-defenses-*.yaml")]:
        stale.unlink()  # a split made with another max_runs would launch runs twice
    paths = []
    for name, config in sweep_configs(grid, grid_file, max_runs).items():
        path = out / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        paths.append(path)
    launch = out / "launch.sh"
    launch.write_text(LAUNCH.format(grid_file=grid_file, script=launch,
                                    files=" ".join(shlex.quote(p.name) for p in paths)))
    launch.chmod(0o755)
    return paths
