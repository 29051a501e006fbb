"""Wall seconds of defense runs as a grid worker runs them: one process, train.py's CLI per run, one after another.

Run it from the checkout to measure (the modules are imported from the working directory), with the same
arguments in two checkouts, to compare an old commit with a new one on one machine in one sitting:

    cd <checkout> && python <this file> --attacks runs/grids/cifar10_cpu/attacks/cifar10-badnets-* \\
        --defenses ft fst nad bnp awm --once clp --spc 2 10 --seeds 0 1 --out <checkout>-cost.json

Each run: configs/defense/<name>.yaml and its survey overlay, `--data.spc`, `--data.split_seed`, `--seed_everything`
(the split seed, as the grid does), CPU, no progress bar; a fresh folder under --work. The output lists per run the
wall seconds of the CLI call and the result record's before/after metrics and seconds; `--compare old.json
new.json` prints the per-defense and overall ratios of wall seconds and whether every metric is identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def run_all(args: argparse.Namespace) -> list[dict]:
    sys.path.insert(0, str(Path.cwd()))
    from lightning_modules.cli import BackdoorCLI

    work = Path(args.work or tempfile.mkdtemp(prefix="defense-cost-"))
    configs = Path.cwd() / "configs" / "defense"
    plan = [(a, d, spc, seed) for a in args.attacks for d in args.defenses for spc in args.spc for seed in args.seeds]
    plan += [(a, d, args.spc[0], args.seeds[0]) for a in args.attacks for d in args.once]
    rows = []
    for i, (attack, defense, spc, seed) in enumerate(plan):
        checkpoint = Path(attack) / "checkpoints" / "last.ckpt"
        folder = work / f"{i:03d}-{Path(attack).name}-{defense}-spc{spc}-seed{seed}"
        folder.mkdir(parents=True)
        files = [configs / f"{defense}.yaml", configs / "survey" / f"{defense}.yaml"]
        cli_args = [a for f in files if f.exists() for a in ("--config", str(f))]
        cli_args += ["--model.backdoored", str(checkpoint.resolve()), "--data.spc", str(spc),
                     "--data.split_seed", str(seed), "--seed_everything", str(seed),
                     "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
                     "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(folder)]
        argv, sys.argv = sys.argv, sys.argv[:1]
        start = time.perf_counter()
        try:
            BackdoorCLI(args=["fit", *cli_args])
        finally:
            sys.argv = argv
        wall = time.perf_counter() - start
        result = json.loads(next(folder.rglob("result.json")).read_text())
        rows.append({"attack": result["attack"], "defense": result["defense"], "spc": spc, "split_seed": seed,
                     "wall": wall, "before": result["before"], "after": result["after"],
                     "seconds": result["seconds"], "before_source": result.get("before_source")})
        print(f"{i + 1}/{len(plan)} {result['attack']} {result['defense']} spc {spc} seed {seed}: {wall:.1f} s", flush=True)
    return rows


def compare(old_path: str, new_path: str) -> None:
    old, new = (json.loads(Path(p).read_text()) for p in (old_path, new_path))
    key = lambda r: (r["attack"], r["defense"], r["spc"], r["split_seed"])
    old_rows, new_rows = {key(r): r for r in old["runs"]}, {key(r): r for r in new["runs"]}
    common = sorted(old_rows.keys() & new_rows.keys())
    same = [k for k in common if all(old_rows[k][s] == new_rows[k][s] for s in ("before", "after"))]
    print(f"{len(common)} runs in both; before/after metrics identical in {len(same)}")
    for k in common:
        if k not in same:
            print("  differs:", k, {s: (old_rows[k][s], new_rows[k][s]) for s in ("before", "after")})
    print("| defense | runs | old s/run (median) | new s/run (median) | ratio of sums |\n|---|---|---|---|---|")
    for defense in sorted({k[1] for k in common}):
        ks = [k for k in common if k[1] == defense]
        o, n = [old_rows[k]["wall"] for k in ks], [new_rows[k]["wall"] for k in ks]
        print(f"| {defense} | {len(ks)} | {statistics.median(o):.1f} | {statistics.median(n):.1f} | "
              f"{sum(o) / sum(n):.2f}x |")
    o, n = sum(old_rows[k]["wall"] for k in common), sum(new_rows[k]["wall"] for k in common)
    print(f"| all | {len(common)} | {o / len(common):.1f} (mean) | {n / len(common):.1f} (mean) | **{o / n:.2f}x** |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attacks", nargs="+", help="attacked-model run folders (holding checkpoints/last.ckpt)")
    parser.add_argument("--defenses", nargs="+", default=["ft", "fst", "nad", "bnp", "awm"])
    parser.add_argument("--once", nargs="*", default=["clp"], help="data-free defenses: once per attacked model")
    parser.add_argument("--spc", nargs="+", type=int, default=[2, 10])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--work", help="folder for the runs (default: a new temporary one)")
    parser.add_argument("--out", help="write the rows here (JSON)")
    parser.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="compare two outputs and exit")
    args = parser.parse_args(argv)
    if args.compare:
        compare(*args.compare)
        return
    rows = run_all(args)
    if args.out:
        import platform

        Path(args.out).write_text(json.dumps({"machine": f"{platform.machine()} {platform.processor()}",
                                              "cwd": str(Path.cwd()), "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
