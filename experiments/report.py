"""The survey's figures and a summary table from a results table (experiments/results.py).

Fig. 6: box plots of ASR, RDR and ARR per defense. Fig. 7: median RDR and ARR against median ASR per defense,
with the rectangles spanned by FP's and FT's medians (a method inside both beats both baselines). Figs. 8-14:
the same box plots split by SPC, attack, static vs dynamic attack, backbone, dataset and poisoning ratio.
Summary: median and IQR per defense (ASR, RDR, ARR, ACC, RA; DER and RIR medians), seconds per run and a ranking by
median DER; per-attack tables of each defense's medians; the attack table: every attacked model's test ACC / ASR
/ RA and seconds (always present, and all there is for an attack-only grid). Output: report.md, report.html, PNGs.
"""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.patches import Rectangle

from experiments.names import attack_kind, defense_order
from experiments.results import ATTACK_COLUMNS

SCORES = [("asr_after", "ASR"), ("rdr", "RDR"), ("arr", "ARR")]
SPLITS = [("spc", "SPC"), ("attack", "attack"), ("attack_type", "static vs dynamic attack"),
          ("backbone", "backbone"), ("dataset", "dataset"), ("poison_ratio", "poisoning ratio")]


def method_order(methods: list[str]) -> list[str]:
    return defense_order(methods)


def prepared(table: pd.DataFrame) -> pd.DataFrame:
    table = table.copy()
    table["attack_type"] = table["attack"].map(attack_kind)
    return table


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Median and IQR of each score per defense, with the number of runs, the median seconds, and the ranking by
    median DER (BackdoorBench's rating of ASR removed against accuracy lost; 1 is best)."""
    rows = []
    for method, group in table.groupby("defense"):
        row = {"defense": method, "runs": len(group)}
        for column, label in [*SCORES, ("acc_after", "ACC"), ("ra_after", "RA")]:
            q1, med, q3 = group[column].quantile([0.25, 0.5, 0.75])
            row[f"{label} median"], row[f"{label} IQR"] = med, q3 - q1
        row["DER median"], row["RIR median"] = group["der"].median(), group["rir"].median()
        if group["rta_asr"].notna().any():  # the retuning attack: is the backdoor gone, or only asleep?
            row["RtA ASR median"] = group["rta_asr"].median()
        row["seconds median"] = group["seconds"].median()  # the method's own work
        row["run seconds median"] = group["seconds_total"].median()  # with loading and the measurements
        rows.append(row)
    out = pd.DataFrame(rows)
    out["rank (DER)"] = out["DER median"].rank(ascending=False, method="min").astype(int)
    return out.set_index("defense").loc[method_order(list(out["defense"]))].reset_index()


def per_attack(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """One table per attack: each defense's medians over its runs on that attack's models (pooled medians hide
    that a method removes one trigger and not another)."""
    columns = [("asr_after", "ASR"), ("rdr", "RDR"), ("arr", "ARR"), ("acc_after", "ACC"), ("ra_after", "RA")]
    out = {}
    for attack, part in table.groupby("attack"):
        med = part.groupby("defense")[[c for c, _ in columns]].median().rename(columns=dict(columns))
        med.insert(0, "runs", part.groupby("defense").size())
        out[str(attack)] = med.loc[method_order(list(med.index))].rename_axis("defense").reset_index()
    return out


def boxplots(table: pd.DataFrame, path: Path, split: str | None = None, title: str = "") -> Path:
    methods = method_order(sorted(table["defense"].unique()))
    levels = sorted(table[split].dropna().unique(), key=lambda v: (isinstance(v, str), v)) if split else [None]
    fig, axes = plt.subplots(len(SCORES), 1, figsize=(max(6, 0.9 * len(methods) * max(1, len(levels) / 2)), 9),
                             sharex=True)
    width = 0.8 / len(levels)
    for ax, (column, label) in zip(axes, SCORES):
        for i, level in enumerate(levels):
            part = table if level is None else table[table[split] == level]
            data = [part.loc[part["defense"] == m, column].dropna().to_numpy() for m in methods]
            positions = [j + (i - (len(levels) - 1) / 2) * width for j in range(len(methods))]
            keep = [(p, d) for p, d in zip(positions, data) if len(d)]
            if keep:
                box = ax.boxplot([d for _, d in keep], positions=[p for p, _ in keep], widths=width * 0.9,
                                 patch_artist=True, showfliers=True, medianprops={"color": "black"})
                colour = plt.cm.tab10(i % 10)
                for patch in box["boxes"]:
                    patch.set_facecolor(colour if level is not None else "#9ecae1")
                ax.plot([], [], color=colour, lw=6, label=str(level)) if level is not None else None
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    counts = [", ".join(str(int(((table["defense"] == m) & (table[split] == level)).sum())) if split else
                        str(int((table["defense"] == m).sum())) for level in levels) for m in methods]
    axes[-1].set_xticks(range(len(methods)))
    axes[-1].set_xticklabels([f"{m}\nn={c}" for m, c in zip(methods, counts)], rotation=45, ha="right")
    if split:
        axes[0].legend(title=split, fontsize=8, ncol=min(len(levels), 6))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scatter(table: pd.DataFrame, path: Path) -> Path:
    med = table.groupby("defense")[["asr_after", "rdr", "arr"]].median()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (column, label) in zip(axes, [("rdr", "median RDR"), ("arr", "median ARR")]):
        for baseline, colour in (("FP", "tab:orange"), ("FT", "tab:green")):
            if baseline in med.index:
                x, y = med.loc[baseline, "asr_after"], med.loc[baseline, column]
                ax.add_patch(Rectangle((0, min(0, y)), x, abs(y), fill=False, ec=colour, ls="--",
                                       label=f"{baseline} rectangle"))
        ax.scatter(med["asr_after"], med[column], color="tab:blue")
        for method, (dx, dy) in label_offsets(med["asr_after"], med[column]).items():
            ax.annotate(method, (med.loc[method, "asr_after"], med.loc[method, column]), fontsize=8,
                        xytext=(dx, dy), textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "grey"} if dy > 6 else None)
        ax.set_xlabel("median ASR")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Median RDR and ARR against median ASR (Fig. 7)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def superficial_safety(table: pd.DataFrame, path: Path) -> Path:
    """Median ASR after the defense against median ASR after the retuning attack, per defense, with the attacked
    and the clean model's retuned ASR as reference lines: points high above the diagonal were put to sleep."""
    rows = table[table["rta_asr"].notna()]
    med = rows.groupby("defense")[["asr_after", "rta_asr"]].median()
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="retuning changes nothing")
    for column, label, colour in (("rta_asr_backdoored", "no defense, retuned", "tab:red"),
                                  ("rta_asr_clean", "never backdoored, retuned", "tab:green")):
        if rows[column].notna().any():
            ax.axhline(rows[column].median(), color=colour, ls="--", lw=1, label=f"{label} (median)")
    ax.scatter(med["asr_after"], med["rta_asr"], color="tab:blue")
    for method, (dx, dy) in label_offsets(med["asr_after"], med["rta_asr"]).items():
        ax.annotate(method, (med.loc[method, "asr_after"], med.loc[method, "rta_asr"]), fontsize=8,
                    xytext=(dx, dy), textcoords="offset points")
    k = sorted(rows["rta_k"].dropna().unique())
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("median ASR after the defense")
    ax.set_ylabel(f"median ASR after retuning (k = {', '.join(f'{v:g}' for v in k)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Superficial safety: ASR after defense vs after retuning")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def label_offsets(x: pd.Series, y: pd.Series, width: float = 0.12, height: float = 0.035) -> dict[str, tuple[int, int]]:
    """Point offsets for the labels of Fig. 7: each label takes the lowest line (9 points apart) at which it does not
    cover an earlier label (`width`, `height`: a label's size as a fraction of the axes), so clusters of methods stay
    readable; labels near the right edge go to the left of their point."""
    span_x, span_y = max(float(x.max() - x.min()), 1e-9), max(float(y.max() - y.min()), 1e-9)
    placed: list[tuple[float, float]] = []  # label positions, axes fractions
    offsets = {}
    for method in sorted(x.index, key=lambda m: (y[m], x[m])):
        px, py = (x[method] - x.min()) / span_x, (y[method] - y.min()) / span_y
        line = 0
        while any(abs(qx - px) < width and abs(qy - (py + line * height)) < height for qx, qy in placed):
            line += 1
        placed.append((px, py + line * height))
        offsets[method] = (-3 - 6 * len(method) if px > 0.85 else 3, 3 + 9 * line)
    return offsets


def attack_table(attacks: pd.DataFrame) -> pd.DataFrame:
    """The attacked models, one row each: test ACC / ASR / RA of the attack run and its seconds."""
    order = ["grid"] * (attacks["grid"].nunique() > 1) + ["dataset", "attack", "backbone", "poison_ratio", "seed"]
    names = {"poison_ratio": "poison ratio", "acc": "ACC", "asr": "ASR", "ra": "RA"}
    return attacks.sort_values(order)[[*order, "acc", "asr", "ra", "seconds"]].rename(columns=names)


def figures(table: pd.DataFrame, out: Path) -> list[tuple[str, Path]]:
    drawn = [("Fig. 6: ASR, RDR and ARR per defense", boxplots(table, out / "fig6_boxplots.png",
                                                                title="All settings (Fig. 6)")),
             ("Fig. 7: medians against median ASR", scatter(table, out / "fig7_scatter.png"))]
    if table["rta_asr"].notna().any():
        drawn.append(("Superficial safety: ASR after defense and after the retuning attack",
                      superficial_safety(table, out / "retuning.png")))
    for column, label in SPLITS:
        if table[column].nunique() > 1:
            drawn.append((f"Split by {label}", boxplots(table, out / f"split_{column}.png", column,
                                                        f"Split by {label}")))
    return drawn


def write_report(table: pd.DataFrame, out_dir: str | Path, attacks: pd.DataFrame | None = None,
                 title: str = "Backdoor mitigation report") -> Path:
    """Figures, the defense summary, the attack table, report.md and report.html under out_dir; returns
    report.md's path. A grid without defense runs (attacks only) gets the attack table alone."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    attacks = pd.DataFrame(columns=ATTACK_COLUMNS) if attacks is None else attacks
    if table.empty and attacks.empty:
        raise ValueError("no finished runs: neither result.json nor attack.json records were found; run a grid "
                         "first (python grid.py run <grid.yaml>)")
    md, body = [f"# {title}", ""], [f"<h1>{html.escape(title)}</h1>"]
    if table.empty:
        line = "No defense runs (an attack-only grid, or none finished yet)."
        md += [line, ""]
        body.append(f"<p>{line}</p>")
    else:
        table = prepared(table)
        drawn = figures(table, out)
        table_summary = summary(table)
        line = (f"{len(table)} defense runs over {table['attack_key'].nunique()} attacked models; "
                f"{table['defense'].nunique()} defenses.")
        md += [line, "", "## Summary (median, IQR)", "", table_summary.to_markdown(index=False, floatfmt=".3f"), ""]
        body += [f"<p>{html.escape(line)}</p>", "<h2>Summary (median, IQR)</h2>",
                 table_summary.to_html(index=False, float_format=lambda v: f"{v:.3f}")]
        if table["attack"].nunique() > 1:
            md += ["## Per attack (medians)", ""]
            body.append("<h2>Per attack (medians)</h2>")
            for attack, rows in per_attack(table).items():
                md += [f"### {attack}", "", rows.to_markdown(index=False, floatfmt=".3f"), ""]
                body += [f"<h3>{html.escape(attack)}</h3>",
                         rows.to_html(index=False, float_format=lambda v: f"{v:.3f}")]
        for caption, path in drawn:
            md += [f"## {caption}", "", f"![{caption}]({path.name})", ""]
            body.append(f"<h2>{html.escape(caption)}</h2><img src='{path.name}' style='max-width:100%'>")
    heading = f"Attacked models ({len(attacks)}; test set of each attack run, attacks.csv)"
    md += [f"## {heading}", ""]
    body.append(f"<h2>{html.escape(heading)}</h2>")
    if attacks.empty:
        md += ["No finished attacked models (attack.json) under this folder.", ""]
        body.append("<p>No finished attacked models (attack.json) under this folder.</p>")
    else:
        rows = attack_table(attacks)
        md += [rows.to_markdown(index=False, floatfmt=".3f"), ""]
        body.append(rows.to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-"))
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text("<html><body>" + "\n".join(body) + "</body></html>")
    return out / "report.md"
