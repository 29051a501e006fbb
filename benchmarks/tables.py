"""The result tables of benchmarks/README.md, printed as Markdown from finished grid runs.

    python -m benchmarks.tables defenses runs/grids/digits_cpu runs/grids/cifar10_cpu
    python -m benchmarks.tables attacks runs/grids/attacks_digits_cpu runs/grids/cifar10_cpu

`defenses`: per dataset, attack and defense, the number of runs (split seeds) and medians over them of ACC, ASR
and RA before and after, ARR, RDR and the defense's seconds (its own work, without the two test-set
measurements), in two tables: FT and the pruning family, FT and the fine-tuning family (with BCU).
`attacks`: per dataset and attack, test ACC / ASR / RA of the attacked model, its ACC minus the clean model's
(victim training, same epochs) and, for the training-controlled attacks, minus the same recipe's at poison
ratio 0 (configs/grids/ot_clean_*), the epochs and the seconds of the run.
Nothing is computed here that the result records do not hold: the medians are over their numbers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import yaml

from experiments.results import collect, collect_attacks

PRUNING = ["FT", "FP", "BNP", "CLP", "ANP", "AWM", "RNP", "MMBD", "NPD"]
FINE_TUNING = ["FT", "FST", "FTSAM", "NAD", "NC", "PBE", "IBAU", "SAU", "BCU"]
NAMES = {"MMBD": "MM-BD", "FTSAM": "FT-SAM", "IBAU": "i-BAU"}
ATTACK_NAMES = {"badnets": "BadNets", "blended": "Blended", "sig": "SIG", "lf": "LF", "ssba": "SSBA",
                "wanet": "WaNet", "iab": "IAB", "bpp": "BPP", "lira": "LIRA", "clean": "clean (no attack)"}


def defense_table(table: pd.DataFrame, methods: list[str]) -> str:
    rows = []
    for (dataset, attack), part in table.groupby(["dataset", "attack"], sort=False):
        for method in methods:
            runs = part[part["method"] == method]
            if runs.empty:
                continue
            m = runs.median(numeric_only=True)
            rows.append(f"| {dataset} | {ATTACK_NAMES.get(attack, attack)} | {NAMES.get(method, method)} | {len(runs)} "
                        f"| {m.acc_before:.3f} → {m.acc_after:.3f} | {m.asr_before:.3f} → {m.asr_after:.3f} "
                        f"| {m.ra_before:.3f} → {m.ra_after:.3f} | {m.arr:.3f} | {m.rdr:.3f} | {m.seconds:.1f} |")
    head = ("| dataset | attack | defense | runs | ACC before → after | ASR before → after | RA before → after "
            "| ARR | RDR | seconds |\n|---|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head, *rows])


def saved_config(source: str, *keys: str) -> object:
    """A value of the LightningCLI config saved beside a run's marker (None when absent or unreadable)."""
    try:
        value = yaml.safe_load((Path(source).parent / "config.yaml").read_text())
        for key in keys:
            value = value[key]
        return value
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None


def epochs_of(source: str) -> str:
    """max_epochs of the run."""
    epochs = saved_config(source, "trainer", "max_epochs")
    return "?" if epochs is None else str(epochs)


def pattern_of(source: str) -> str:
    """The trigger file of the run (LF's `pattern`, Blended's `image`), '' when the default one was used."""
    args = saved_config(source, "data", "init_args", "trigger", "init_args")
    value = (args.get("pattern") or args.get("image")) if isinstance(args, dict) else None
    return Path(value).name if isinstance(value, str) else ""


def attack_table(attacks: pd.DataFrame) -> str:
    """Rows at poison ratio 0 of an attack are its clean comparator: its own training recipe with no sample
    poisoned (configs/grids/ot_clean_*); they fill the "same recipe" column of that attack's row."""
    rows = []
    for dataset, part in attacks.groupby("dataset", sort=False):
        clean = part[part["attack"] == "clean"]
        clean_acc = float(clean["acc"].iloc[0]) if len(clean) else float("nan")
        for _, r in part.iterrows():
            unpoisoned = r.attack == "clean" or r.poison_ratio == 0
            same = part[(part["attack"] == r.attack) & (part["poison_ratio"] == 0)]
            recipe = f"{r.acc - float(same['acc'].iloc[0]):+.3f}" if len(same) and not unpoisoned else "–"
            name = ATTACK_NAMES.get(r.attack, r.attack) + (" recipe, nothing poisoned" if r.poison_ratio == 0
                                                           and r.attack != "clean" else "")
            if pattern := pattern_of(r.source):
                name += f" (`{pattern}`)"
            asr = "–" if r.attack == "clean" else f"{r.asr:.3f}"
            ra = "–" if r.attack == "clean" else f"{r.ra:.3f}"
            ratio = "–" if r.attack == "clean" else f"{r.poison_ratio:g}"
            rows.append(f"| {dataset} | {name} | {ratio} | {epochs_of(r.source)} | {r.acc:.3f} "
                        f"| {r.acc - clean_acc:+.3f} | {recipe} | {asr} | {ra} | {r.seconds:.0f} |")
    head = ("| dataset | attack | poison ratio | epochs | ACC | ACC − clean | ACC − same recipe, ratio 0 | ASR | RA "
            "| seconds |\n|---|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head, *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["defenses", "attacks"])
    parser.add_argument("runs_dirs", nargs="+")
    args = parser.parse_args()
    if args.what == "defenses":
        table = pd.concat([collect(d) for d in args.runs_dirs], ignore_index=True)
        print("FT and the pruning family\n\n" + defense_table(table, PRUNING))
        print("\nFT and the fine-tuning family\n\n" + defense_table(table, FINE_TUNING))
    else:
        attacks = pd.concat([collect_attacks(d) for d in args.runs_dirs], ignore_index=True)
        order = {a: i for i, a in enumerate(["clean", *(a for a in ATTACK_NAMES if a != "clean")])}
        attacks = attacks.sort_values(["dataset", "attack", "poison_ratio"],
                                      key=lambda s: s.map(order) if s.name == "attack" else s, kind="stable")
        print(attack_table(attacks))


if __name__ == "__main__":
    main()
