"""The result tables of benchmarks/README.md, printed as Markdown from finished grid runs.

    python -m benchmarks.tables defenses runs/grids/digits_cpu runs/grids/cifar10_cpu
    python -m benchmarks.tables attacks runs/grids/attacks_digits_cpu runs/grids/cifar10_cpu
    python -m benchmarks.tables retuning runs/grids/retuning_digits_cpu
    python -m benchmarks.tables findings runs/grids/findings56_cifar10_cpu
    python -m benchmarks.tables by_spc runs/grids/new_defenses_digits_cpu

`defenses`: per dataset, attack and defense, the number of runs (split seeds) and medians over them of ACC, ASR
and RA before and after, ARR, RDR and the defense's seconds (its own work, without the two test-set
measurements), in two tables: FT and the pruning family, FT and the fine-tuning family (with BCU).
`attacks`: per dataset and attack, test ACC / ASR / RA of the attacked model, its ACC minus the clean model's
(victim training, same epochs) and, for the training-controlled attacks, minus the same recipe's at poison
ratio 0 (configs/grids/ot_clean_*), the epochs and the seconds of the run.
`retuning`: per dataset, attack and defense, medians of ASR after the defense and ACC / ASR after the retuning
attack (and QRA's, where measured), with the attacked and the clean model's retuned ASR as reference rows.
`findings`: the survey's findings 5 and 6 (protocol.md): per defense, median ASR and ACC after by SPC on the
ratio-0.1 models, and by poisoning ratio at SPC 10, with the number of runs.
`by_spc`: per dataset, attack, SPC and defense, medians of ACC / ASR / RA after, the retuned ASR and the seconds.
`--defenses ft,sau,...` keeps only those defenses (registered names), in that order where a table follows the grid's.
Nothing is computed here that the result records do not hold: the medians are over their numbers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from datamodules.triggers import TRIGGERS
from experiments.names import (
    attack_display,
    attack_key,
    defense_display,
    defense_key,
    family_members,
)
from experiments.results import collect, collect_attacks, load_attack_result
from lightning_modules.defenses import DEFENSES

PRUNING = ["FT", *family_members("pruning")]  # FT, the baseline, heads both tables
FINE_TUNING = family_members("fine-tuning")
ATTACK_ORDER = ["clean", "badnets", "blended", "sig", "lf", "ssba", "wanet", "iab", "bpp", "lira"]  # the survey's


def defense_table(table: pd.DataFrame, methods: list[str]) -> str:
    rows = []
    for (dataset, attack), part in table.groupby(["dataset", "attack"], sort=False):
        for method in methods:
            runs = part[part["defense"] == method]
            if runs.empty:
                continue
            m = runs.median(numeric_only=True)
            rows.append(f"| {dataset} | {attack_display(attack)} | {defense_display(method)} | {len(runs)} "
                        f"| {m.acc_before:.3f} → {m.acc_after:.3f} | {m.asr_before:.3f} → {m.asr_after:.3f} "
                        f"| {m.ra_before:.3f} → {m.ra_after:.3f} | {m.arr:.3f} | {m.rdr:.3f} | {m.seconds:.1f} |")
    head = ("| dataset | attack | defense | runs | ACC before → after | ASR before → after | RA before → after "
            "| ARR | RDR | seconds |\n|---|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head, *rows])


def retuning_table(table: pd.DataFrame) -> str:
    table = table[table["rta_asr"].notna()]
    qra = table["qra_asr"].notna().any()
    rows = []
    for (dataset, attack, k), part in table.groupby(["dataset", "attack", "rta_k"], sort=False):
        refs = part[["rta_asr_backdoored", "rta_asr_clean"]].median()
        cells = ["", "", ""] if qra else []
        rows.append(f"| {dataset} | {attack_display(attack)} | {k:g} | no defense (attacked model) | "
                    f"{part['attack_key'].nunique()} | {part['asr_before'].median():.3f} | | "
                    f"{refs.rta_asr_backdoored:.3f} |" + "".join(f"{c} |" for c in cells))
        if pd.notna(refs.rta_asr_clean):
            rows.append(f"| {dataset} | {attack_display(attack)} | {k:g} | never backdoored (clean model) | "
                        f"{part['attack_key'].nunique()} | | | {refs.rta_asr_clean:.3f} |" + "".join(f"{c} |" for c in cells))
        for method in dict.fromkeys([*PRUNING, *FINE_TUNING]):
            runs = part[part["defense"] == method]
            if runs.empty:
                continue
            m = runs.median(numeric_only=True)
            extra = (f" {m.qra_asr:.3f} | {m.qra_clean_flip:.3f} | {m.qra_asr_clean_model:.3f} |"
                     if qra and pd.notna(m.qra_asr) else (" | | |" if qra else ""))
            rows.append(f"| {dataset} | {attack_display(attack)} | {k:g} | {defense_display(method)} | {len(runs)} "
                        f"| {m.asr_after:.3f} | {m.rta_acc:.3f} | {m.rta_asr:.3f} |{extra}")
    head = ("| dataset | attack | k | defense | runs | ASR after | RtA ACC | RtA ASR |"
            + (" QRA ASR | QRA clean flip | QRA ASR on the clean model |" if qra else "")
            + "\n|" + "---|" * (8 + 3 * qra))
    return "\n".join([head, *rows])


def by_spc_table(table: pd.DataFrame) -> str:
    """Per dataset (in order of first appearance), attack (the survey's order), SPC (largest first) and defense (in
    order of first appearance): runs and medians of ACC, ASR and RA after, ASR after the retuning attack and the
    defense's seconds, under reference rows for the attacked model (ASR before, its retuned ASR) and the clean
    model (its retuned ASR)."""
    datasets = {d: i for i, d in enumerate(dict.fromkeys(table["dataset"]))}
    groups = sorted(table.groupby(["dataset", "attack", "spc"], sort=False),
                    key=lambda g: (datasets[g[0][0]], attack_rank(g[0][1]), -g[0][2]))
    rows = []
    for (dataset, attack, spc), part in groups:
        refs = part[["asr_before", "acc_before", "rta_asr_backdoored", "rta_asr_clean"]].median()
        retuned = lambda v: f"{v:.3f}" if pd.notna(v) else ""
        rows.append(f"| {dataset} | {attack_display(attack)} | {spc} | no defense (attacked model) | "
                    f"{part['attack_key'].nunique()} | {refs.acc_before:.3f} | {refs.asr_before:.3f} | | "
                    f"{retuned(refs.rta_asr_backdoored)} | |")
        if pd.notna(refs.rta_asr_clean):
            rows.append(f"| {dataset} | {attack_display(attack)} | {spc} | never backdoored (clean model) | "
                        f"{part['attack_key'].nunique()} | | | | {refs.rta_asr_clean:.3f} | |")
        for method in dict.fromkeys(part["defense"]):
            m = part[part["defense"] == method].median(numeric_only=True)
            rows.append(f"| {dataset} | {attack_display(attack)} | {spc} | {defense_display(method)} | "
                        f"{(part['defense'] == method).sum()} | {m.acc_after:.3f} | {m.asr_after:.3f} | "
                        f"{m.ra_after:.3f} | {retuned(m.rta_asr)} | {m.seconds:.1f} |")
    head = ("| dataset | attack | SPC | defense | runs | ACC after | ASR after | RA after | RtA ASR | seconds |\n|"
            + "---|" * 10)
    return "\n".join([head, *rows])


def findings_tables(table: pd.DataFrame) -> str:
    """Finding 5: by SPC on the highest-ratio models; finding 6: by poisoning ratio at SPC 10."""
    out = []
    top = table[table["poison_ratio"] == table["poison_ratio"].max()]
    for title, part, column in ((f"Finding 5: by SPC (poison ratio {table['poison_ratio'].max():g})", top, "spc"),
                                ("Finding 6: by poisoning ratio (SPC 10)", table[table["spc"] == 10], "poison_ratio")):
        values = sorted(part[column].unique())
        head = ("| attack | family | defense | " + " | ".join(f"{column} {v:g}: ASR / ACC (n)" for v in values)
                + " |\n|" + "---|" * (3 + len(values)))
        rows = []
        for attack, by_attack in part.groupby("attack", sort=False):
            for family, methods in (("pruning", family_members("pruning")), ("fine-tuning", FINE_TUNING)):
                for method in ["FT", *methods] if family == "pruning" else [m for m in methods if m != "FT"]:
                    cells = []
                    for v in values:
                        runs = by_attack[(by_attack["defense"] == method) & (by_attack[column] == v)]
                        cells.append(f"{runs['asr_after'].median():.3f} / {runs['acc_after'].median():.3f} "
                                     f"({len(runs)})" if len(runs) else "")
                    if any(cells):
                        rows.append(f"| {attack_display(attack)} | {family if method != 'FT' else 'baseline'} | "
                                    f"{defense_display(method)} | " + " | ".join(cells) + " |")
        out.append(f"{title}\n\n" + "\n".join([head, *rows]))
    return "\n\n".join(out)


def pattern_of(source: str) -> str:
    """The trigger file of the run (LF's `pattern`, Blended's `image`), '' when the default one was used."""
    trigger = load_attack_result(source)["trigger"]
    args = trigger["init_args"] if trigger else None
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
            name = attack_display(r.attack) + (" recipe, nothing poisoned" if r.poison_ratio == 0
                                            and r.attack != "clean" else "")
            if pattern := pattern_of(r.source):
                name += f" (`{pattern}`)"
            asr = "–" if r.attack == "clean" else f"{r.asr:.3f}"
            ra = "–" if r.attack == "clean" else f"{r.ra:.3f}"
            ratio = "–" if r.attack == "clean" else f"{r.poison_ratio:g}"
            epochs = "?" if pd.isna(r.epochs) else str(int(r.epochs))
            rows.append(f"| {dataset} | {name} | {ratio} | {epochs} | {r.acc:.3f} "
                        f"| {r.acc - clean_acc:+.3f} | {recipe} | {asr} | {ra} | {r.seconds:.0f} |")
    head = ("| dataset | attack | poison ratio | epochs | ACC | ACC − clean | ACC − same recipe, ratio 0 | ASR | RA "
            "| seconds |\n|---|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head, *rows])


def attack_rank(attack: str) -> int:
    """An attack's place in the survey's order (ATTACK_ORDER, then the other registered triggers)."""
    order = [*ATTACK_ORDER, *(a for a in TRIGGERS if a not in ATTACK_ORDER)]
    key = attack_key(attack)
    return order.index(key) if key in order else len(order)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["defenses", "attacks", "retuning", "findings", "by_spc"])
    parser.add_argument("runs_dirs", nargs="+")
    parser.add_argument("--defenses", help="comma-separated registered defense names: only these, in this order")
    args = parser.parse_args()
    keep = [n.strip() for n in args.defenses.split(",") if n.strip()] if args.defenses is not None else None
    if keep is not None:
        unknown = [n for n in keep if defense_key(n) is None]
        if unknown or not keep:
            what = f"unknown {', '.join(map(repr, unknown))}" if unknown else "no name given"
            parser.error(f"--defenses: {what}; registered: {', '.join(DEFENSES)}")

    def records() -> pd.DataFrame:
        table = pd.concat([collect(d) for d in args.runs_dirs], ignore_index=True)
        if keep is None:
            return table
        rank = {defense_key(n): i for i, n in enumerate(keep)}
        position = table["defense"].map(lambda d: rank.get(defense_key(str(d))))
        return table[position.notna()].iloc[position.dropna().argsort(kind="stable")].reset_index(drop=True)

    if args.what in ("retuning", "findings", "by_spc"):
        table = records()
        print({"retuning": retuning_table, "findings": findings_tables, "by_spc": by_spc_table}[args.what](table))
    elif args.what == "defenses":
        table = records()
        print("FT and the pruning family\n\n" + defense_table(table, PRUNING))
        print("\nFT and the fine-tuning family\n\n" + defense_table(table, FINE_TUNING))
    else:
        attacks = pd.concat([collect_attacks(d) for d in args.runs_dirs], ignore_index=True)
        attacks = attacks.sort_values(["dataset", "attack", "poison_ratio"],
                                      key=lambda s: s.map(attack_rank) if s.name == "attack" else s,
                                      kind="stable")
        print(attack_table(attacks))


if __name__ == "__main__":
    main()
