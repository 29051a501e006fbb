"""Check a grid before running it: every cell must parse and be feasible. Nothing is trained or instantiated.

    python grid.py check configs/grids/survey.yaml      # one line per problem, then "N cells, K infeasible"

A cell is one attack run or one defense run of the grid. What is checked:

1. names: the grid file loads (`Grid.load`: attacks, defenses, datasets, backbones and profile exist);
2. configs: the train.py arguments of each run go through BackdoorCLI's own parser (`parse_args`, no
   instantiation), so a misspelled key in a config file or an override is an error here. Seeds, split seeds,
   the poison ratio and the SPC do not change whether arguments parse, so they are replaced by placeholders and
   each distinct remaining argument list is parsed once (96 attack and 23 defense parses for the survey). The
   parse also says which values a run really gets (an override may replace the grid's ratio or SPC);
3. poisoning: the values BackdoorDataModule rejects, and clean-label triggers (SIG) poisoning only target-class
   images: `poison_indices` on the training labels (datamodules/poisoning.py);
4. D_m: every class must supply spc images (+1 for D_v when int(val_fraction * spc) < 1) that were never
   poisoned, or, after a clean-label attack, any of its images (clean originals; datamodules/splits.py).

Feasibility depends only on the training labels and the poisoned indices, never on split seeds or backbones, so
it is computed once per (dataset, poisoned set, spc, val_fraction) and applied to every matching cell. Labels
come from the `y` array of `<data_dir>/<dataset>/train.npz` alone, or are built for the built-in digits. Where
no prepared file exists, the dataset's official per-class sizes (`train_class_sizes`) stand in: check 3 stays
exact, check 4 is a necessary condition after non-clean-label poisoning (where the poisoned images fall is
unknown), and those defense cells are counted as partly checked. The survey grid (124,416 cells, 119 parses)
takes about 20 s of CPU, half of it importing torch and Lightning, the rest mostly parsing.
"""

from __future__ import annotations

import importlib
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from experiments.grid import REPO, AttackRun, Grid

RATIO, SPC, SEED = "0.123456789", "987654321", "0"  # placeholders: parsed back, they mean "the grid's value"
FIELDS = [("dataset", "datasets", "attacks"), ("attack", "attacks", "attacks"), ("backbone", "backbones", "attacks"),
          ("poison_ratio", "poison_ratios", "attacks"), ("seed", "seeds", "attacks"),
          ("defense", "defenses", "defenses"), ("spc", "spc", "defenses"), ("split_seed", "split_seeds", "defenses")]
ESSENTIAL = {"attack config": {"dataset", "attack", "backbone"}, "poisoning": {"dataset", "attack", "poison_ratio"},
             "defense config": {"dataset", "defense"}, "D_m": {"dataset", "attack", "poison_ratio", "defense", "spc"}}


@dataclass
class Problem:
    kind: str  # a key of ESSENTIAL
    what: str  # what is wrong and how to fix it
    cells: list[dict[str, Any]] = field(default_factory=list)  # the fields of every run it makes infeasible


@dataclass
class Report:
    grid: Grid
    cells: int = 0
    partly: int = 0  # defense cells whose D_m was checked against official class sizes only
    problems: dict[tuple[str, str], Problem] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    unprepared: set[tuple[str, str]] = field(default_factory=set)  # (dataset, data_dir) without prepared data

    @property
    def infeasible(self) -> int:
        return sum(len(p.cells) for p in self.problems.values())

    def add(self, kind: str, what: str, fields: dict[str, Any]) -> None:
        self.problems.setdefault((kind, what), Problem(kind, what)).cells.append(fields)

    def lines(self) -> list[str]:
        problems = sorted(self.problems.values(), key=lambda p: list(ESSENTIAL).index(p.kind))  # stable
        out = [*self.notes, *(f"{self.where(p)}: {p.what}{self.exclusion(p)}" for p in problems)]
        tail = f"{self.cells} cells, {self.infeasible} infeasible"
        if self.partly:
            dirs: dict[str, list[str]] = {}
            for dataset, data_dir in sorted(self.unprepared):
                dirs.setdefault(data_dir, []).append(dataset)
            missing = "; ".join(f"{', '.join(names)} not prepared under {d.rstrip('/')}/" for d, names in dirs.items())
            tail += f" ({self.partly} partly checked, D_m against official class sizes only: {missing})"
        return [*out, tail]

    @staticmethod
    def exclusion(problem: Problem) -> str:
        """For data problems: the exclude entry that drops exactly the runs concerned."""
        if problem.kind not in ("poisoning", "D_m"):
            return ""
        entry = []
        for name in ("dataset", "attack", "poison_ratio", "spc"):
            values = sorted({c[name] for c in problem.cells if name in c})
            if values and (name != "spc" or problem.kind == "D_m"):
                entry.append(f"{name}: {values[0] if len(values) == 1 else values}")
        return f"; or exclude these runs: exclude: [{{{', '.join(entry)}}}]"

    def where(self, problem: Problem) -> str:
        """The runs a problem concerns: its essential fields, and any other field it covers only part of."""
        attacks = [c for c in problem.cells if "defense" not in c]
        defenses = [c for c in problem.cells if "defense" in c]
        parts = []
        for name, key, section in FIELDS:
            if section == "defenses" and problem.kind in ("attack config", "poisoning"):
                continue  # every defense run of those attacked models
            planned = getattr(self.grid, section).get(key) or []
            cells = (attacks or defenses) if section == "attacks" else defenses
            values = sorted({c[name] for c in cells if name in c},
                            key=lambda v: planned.index(v) if v in planned else len(planned))
            whole = len(values) == len(planned) > 1 and set(values) == set(planned)
            if not values or (name not in ESSENTIAL[problem.kind] and (whole or len(planned) <= 1)):
                continue
            label = name.replace("_", " ") + ("s" if len(values) > 1 else "")
            parts.append(f"{label} " + (f"all {len(values)}" if whole else ", ".join(map(str, values))))
        counts = [f"{n} {what}{'s' if n > 1 else ''}"
                  for n, what in ((len(attacks), "attacked model"), (len(defenses), "defense run")) if n]
        return f"{'; '.join(parts)} ({', '.join(counts)})"


# -- parsing ---------------------------------------------------------------------------------------------------
_PARSER = None


def cli_parser():
    """The parser of `train.py fit` as BackdoorCLI builds it, raising instead of exiting on errors."""
    global _PARSER
    if _PARSER is None:
        from lightning_modules.cli import BackdoorCLI

        class Built(Exception):
            pass

        class ParserOnly(BackdoorCLI):
            def parse_arguments(self, parser, args):  # LightningCLI calls this right after building its parsers
                raise Built(self._subcommand_parsers["fit"])  # twice as fast as going through the subcommand

        try:
            ParserOnly(args=[], parser_kwargs={"exit_on_error": False})  # subcommand parsers inherit it
        except Built as built:
            _PARSER = built.args[0]
            _PARSER.exit_on_error = False
    return _PARSER


def one_line(err: Exception) -> str:
    """jsonargparse's nested error as one line: its informative lines, without the union bookkeeping."""
    skip = ("Subtypes:", "Errors:", "Given value", "Does not validate against any", "Expected a <class 'NoneType'>",
            "tip:")
    lines = [s.strip().removeprefix("- ").strip() for s in str(err).splitlines()]
    return " ".join(s for s in lines if s and not s.startswith(skip)) or type(err).__name__


def placeholders(args: tuple[str, ...], values: dict[str, str]) -> tuple[str, ...]:
    """args with the value after the first occurrence of each option in `values` replaced."""
    out, todo = list(args), dict(values)
    for i, arg in enumerate(out[:-1]):
        if arg in todo:
            out[i + 1] = todo.pop(arg)
    return tuple(out)


def locate(error: str, args: tuple[str, ...]) -> str:
    """Where an option that jsonargparse rejected was given (a config file of the run or an override), or which
    config file is not valid YAML."""
    configs = [arg for previous, arg in zip(("", *args), args) if previous == "--config"]
    found = re.search(r"Option '([^']+)' is not accepted", error)
    if not found:
        broken = []
        for arg in configs:
            try:
                yaml.safe_load(Path(arg).read_text())
            except (OSError, yaml.YAMLError):
                broken.append(arg)
        return f" (cannot read or not YAML: {', '.join(map(shown, broken))})" if broken else ""
    name = found.group(1)

    def has_key(node: Any) -> bool:
        if isinstance(node, dict):
            return name in node or any(has_key(v) for v in node.values())
        return isinstance(node, list) and any(has_key(v) for v in node)

    places = [f"override {a}" for a in args if a.startswith("--") and a.split("=")[0].split(".")[-1] == name]
    for arg in configs:
        try:
            if has_key(yaml.safe_load(Path(arg).read_text())):
                places.append(shown(arg))
        except (OSError, yaml.YAMLError):
            pass
    return f" ('{name}' is set in: {', '.join(places)})" if places else ""


def shown(path: str) -> str:
    """A config file as the repository names it (configs/...), else as given."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else path


def import_class(class_path: str | None) -> type | None:
    if not class_path:
        return None
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


# -- data ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Labels:
    y: torch.Tensor  # the training labels; when not exact, made from the official per-class sizes
    exact: bool


@dataclass(frozen=True)
class Poisoning:
    """What an attack run's parse says about its training set."""
    dataset: str
    data_dir: str
    clean_label: bool
    ratio: float | None  # None: nothing poisoned (no data trigger: clean or training-controlled)
    target: int
    seed: int
    over_target: bool


class Checker:
    def __init__(self, grid: Grid) -> None:
        self.grid, self.report = grid, Report(grid)
        self.parses: dict[tuple[str, ...], Any] = {}
        self.labels: dict[tuple[str, str], Labels | None] = {}
        self.poisoned: dict[Poisoning, torch.Tensor | None] = {}  # per-class poisoned counts (None: unknown)
        self.dm: dict[tuple, tuple[str | None, bool]] = {}

    def parse(self, run: Any, argv: tuple[str, ...], normal: dict[str, str]) -> tuple[Any, str | None]:
        """(the `fit` namespace, None) or (None, error) for a run's job argv, parsed once per normalised args."""
        args = placeholders(run.args, normal)
        if args not in self.parses:
            tail = argv[1 + len(run.args):]  # argv is ("fit", *run.args, what the runner adds)
            try:
                cfg = cli_parser().parse_args([*args, *tail])
                if cfg.get("data.init_args") is None:
                    raise ValueError("no data module: a config must give data.class_path")
                self.parses[args] = (cfg, None)
            except Exception as err:  # noqa: BLE001 - any parse failure is the finding
                message = one_line(err)
                self.parses[args] = (None, message + locate(message, run.args))
        return self.parses[args]

    def training_labels(self, dataset: str, data_dir: str) -> Labels | None:
        key = (dataset, data_dir)
        if key not in self.labels:
            from datamodules.datasets import get_dataset

            source = get_dataset(dataset)
            path = source.prepared_path(data_dir, "train")
            sizes = getattr(source, "train_class_sizes", None)
            if path.exists():
                try:
                    with np.load(path, allow_pickle=False) as f:
                        self.labels[key] = Labels(torch.from_numpy(f["y"].astype(np.int64)), True)
                except (OSError, ValueError, KeyError, EOFError) as err:
                    raise ValueError(f"cannot read the labels of {path} ({type(err).__name__}: {err}); delete it and "
                                     f"run `python -m datamodules.prepare {dataset} --data_dir {data_dir}`") from err
            elif source.builtin:
                self.labels[key] = Labels(torch.from_numpy(source.build("train")[1]).long(), True)
            else:
                self.report.unprepared.add(key)
                self.labels[key] = None if sizes is None else Labels(
                    torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)), False)
                known = (f"checking against its {len(sizes)} official class sizes ({sum(sizes):,} training images)"
                         if sizes else "no class sizes known: its data checks are skipped")
                self.report.notes.append(f"note: {dataset}: no prepared {path}; {known}. `python -m "
                                         f"datamodules.prepare {dataset} --data_dir {data_dir}` makes the check exact")
        return self.labels[key]

    # -- attack runs ---------------------------------------------------------------------------------------------
    def attack(self, run: AttackRun) -> tuple[Poisoning | None, tuple[str, str] | None]:
        """The run's poisoning, or the (kind, what) of its first problem."""
        from datamodules.datasets import get_dataset
        from datamodules.poisoning import check_attack_args, poison_indices
        from experiments.runner import attack_job
        from lightning_modules.attacks.base import TrainingControlledAttack

        cfg, error = self.parse(run, attack_job(self.grid, run).argv,
                                {"--data.init_args.poison_ratio": RATIO, "--seed_everything": SEED})
        if error:
            return None, ("attack config", f"train.py arguments do not parse (fix the file or override named): {error}")
        data = cfg.data.init_args
        ratio = run.poison_ratio if str(data.get("poison_ratio")) == RATIO else float(data.get("poison_ratio"))
        trigger = data.get("trigger")
        try:
            trigger_cls = import_class(trigger.class_path if trigger is not None else None)
            model_cls = import_class(cfg.model.class_path)
            source = get_dataset(data.get("dataset"))
            check_attack_args(ratio, data.get("target"), source.spec.num_classes, data.get("mode"))
            clean_label = bool(getattr(trigger_cls, "clean_label", False))
            if clean_label and data.get("mode") != "all_to_one":
                raise ValueError(f"{trigger_cls.__name__} is a clean-label attack: it supports mode all_to_one only")
            controlled = isinstance(model_cls, type) and issubclass(model_cls, TrainingControlledAttack)
            if trigger_cls is not None and controlled:
                raise ValueError(f"{model_cls.__name__} poisons during training: remove data.init_args.trigger")
        except (ValueError, TypeError, ImportError, AttributeError) as err:
            return None, ("attack config", f"invalid value: {err}")
        poisoning = Poisoning(data.get("dataset"), str(data.get("data_dir")), clean_label,
                              ratio if trigger_cls is not None else None, data.get("target"),
                              data.get("poison_seed"), bool(data.get("ratio_over_target")))
        if poisoning not in self.poisoned and poisoning.ratio is not None:
            try:
                labels = self.training_labels(poisoning.dataset, poisoning.data_dir)
            except ValueError as err:
                return None, ("poisoning", str(err))
            counts = None
            if labels is not None and (labels.exact or clean_label):  # else: where the draw falls is unknown
                try:
                    idx = poison_indices(labels.y, ratio, poisoning.seed, poisoning.target, clean_label,
                                         poisoning.over_target)
                except ValueError as err:
                    return None, ("poisoning", f"{err} (per dataset: configs/attack/{run.dataset}/{run.attack}.yaml)")
                counts = torch.bincount(labels.y[idx], minlength=int(labels.y.max()) + 1)
            self.poisoned[poisoning] = counts
        return poisoning, None

    # -- defense runs --------------------------------------------------------------------------------------------
    def defense(self, run: Any) -> tuple[Any, str | None]:
        from experiments.runner import defense_job

        return self.parse(run, defense_job(self.grid, run).argv,
                          {"--data.spc": SPC, "--data.split_seed": SEED, "--seed_everything": SEED})

    def mitigation(self, poisoning: Poisoning, data_dir: str, spc: int | None, ratio: float | None,
                   val_fraction: float) -> tuple[str | None, bool]:
        """(what is wrong with D_m, or None; whether that is exact) for one poisoned set and D_m setting."""
        key = (poisoning, data_dir, spc, ratio, val_fraction)
        if key not in self.dm:
            try:
                labels = self.training_labels(poisoning.dataset, data_dir)
            except ValueError as err:
                self.dm[key] = (str(err), True)
            else:
                what = d_m_problem(labels, self.poisoned.get(poisoning), poisoning, spc, ratio, val_fraction)
                self.dm[key] = (what, labels is not None and labels.exact)
        return self.dm[key]

    def check(self) -> Report:
        report, grid = self.report, self.grid
        attacks = grid.attack_runs()
        outcome = {run.key: self.attack(run) for run in attacks}
        for run in attacks:
            report.cells += 1
            poisoning, problem = outcome[run.key]
            if problem:
                report.add(*problem, run.fields())
            elif poisoning.clean_label and self.labels.get((poisoning.dataset, poisoning.data_dir)) is None:
                report.partly += 1  # no labels and no class sizes: its ratio is unchecked
        examples: dict[tuple[str, str], Any] = {}  # (defense, dataset) -> one of its DefenseRuns
        parsed: dict[tuple[str, str], tuple[Any, str | None]] = {}
        for attack, defense, spc, fields in defense_cells(grid, attacks):
            report.cells += 1
            poisoning, problem = outcome[attack.key]
            if problem:
                report.add(*problem, fields)
                continue
            if (defense, attack.dataset) not in parsed:
                if (defense, attack.dataset) not in examples:
                    for d in grid.defense_runs([attack]):
                        examples.setdefault((d.defense, attack.dataset), d)
                parsed[defense, attack.dataset] = self.defense(examples[defense, attack.dataset])
            cfg, error = parsed[defense, attack.dataset]
            if error:
                report.add("defense config", f"train.py arguments do not parse (fix the file or override named): "
                                             f"{error}", fields)
                continue
            data = cfg.data.init_args
            spc_run = spc if str(data.get("spc")) == SPC else data.get("spc")
            what, exact = self.mitigation(poisoning, data.get("data_dir") or poisoning.data_dir, spc_run,
                                          data.get("ratio"), data.get("val_fraction", 0.0))
            if what:
                report.add("D_m", what, fields)
            elif not exact:
                report.partly += 1
        return report


def defense_cells(grid: Grid, attacks: list[AttackRun]) -> Iterator[tuple[AttackRun, str, int, dict[str, Any]]]:
    """Grid.defense_runs without building arguments and run keys (the survey has 124,128): (attack run,
    defense, spc, the run's fields) for every defense run, in the same order."""
    d = grid.defenses
    spcs, seeds = d.get("spc", [10]), d.get("split_seeds", [0])
    once = set(d.get("once_per_model", []))
    for attack in attacks:
        base = attack.fields()
        for defense in d.get("defenses", []):
            combos = [(spcs[0], seeds[0])] if defense in once else itertools.product(spcs, seeds)
            for spc, seed in combos:
                fields = {**base, "defense": defense, "spc": int(spc), "split_seed": int(seed)}
                if not grid.excluded(fields):
                    yield attack, defense, int(spc), fields


def d_m_problem(labels: Labels | None, poisoned: torch.Tensor | None, poisoning: Poisoning, spc: int | None,
                ratio: float | None, val_fraction: float) -> str | None:
    """What makes D_m impossible to draw (datamodules/splits.py), or None. `poisoned`: poisoned images per class
    (None with a poisoned set whose draw is unknown: then only the class sizes are checked)."""
    if (spc is None) == (ratio is None):
        return f"give exactly one of data.spc and data.ratio (got spc={spc}, ratio={ratio})"
    if not 0.0 <= val_fraction < 1.0:
        return f"val_fraction must lie in [0, 1), got {val_fraction}"
    if labels is None:
        return None
    sizes = torch.bincount(labels.y)
    originals = poisoning.clean_label  # datamodules/mitigation.py: D_m may take clean originals then
    hit = torch.zeros_like(sizes)
    if poisoned is not None and not originals:
        hit[: len(poisoned)] = poisoned[: len(sizes)]
    if ratio is not None:  # split_by_ratio: round(ratio * N) from the images never poisoned
        if not 0.0 < ratio <= 1.0:
            return f"data.ratio must lie in (0, 1], got {ratio}"
        total = 0 if poisoning.ratio is None else int(poisoned.sum()) if poisoned is not None else round(
            poisoning.ratio * len(labels.y))
        need, pool = round(ratio * len(labels.y)), len(labels.y) - total
        return None if need <= pool else f"data.ratio {ratio} asks for {need} clean images but only {pool} are clean"
    if spc < 1:
        return f"spc must be >= 1, got {spc}"
    extra = 1 if val_fraction > 0 and int(val_fraction * spc) < 1 else 0
    draw = spc + extra
    available = sizes - hit
    short = torch.nonzero(available < draw).flatten().tolist()
    if not short:
        return None
    c = int(torch.argmin(available))
    most = int(available[c])
    largest = most - (1 if val_fraction > 0 and int(val_fraction * most) < 1 else 0)
    kind = "unpoisoned images" if int(hit.sum()) else "images"
    note = f" ({int(hit[c])} of its {int(sizes[c])} are poisoned)" if int(hit[c]) else ""
    fix = f"use spc <= {largest}" if largest >= 1 else "no spc works"
    if int(hit.sum()):
        fix += " or a lower poison ratio"
    return (f"D_m needs {draw} images per class (spc {spc}" + (" + 1 for D_v" if extra else "") +
            f") but {len(short)} class(es) have fewer {kind}: class {c} has {most}{note}; {fix}")


def check_grid(grid: Grid) -> Report:
    return Checker(grid).check()
