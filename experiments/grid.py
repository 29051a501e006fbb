"""Grid files: which attacked models to train and which defense runs to make on each.

A grid file (configs/grids/*.yaml):

    name: quickstart
    runs_dir: runs/grids/quickstart      # attacked models and defense runs go here
    data_dir: data
    profile: null                        # e.g. survey: also configs/{attack,defense}/survey/<name>.yaml
    attacks:                             # every combination is one attacked model
      datasets: [digits]
      attacks: [badnets, blended]        # configs/attack/<name>.yaml (+ configs/attack/<dataset>/<name>.yaml)
      backbones: [small_cnn]             # configs/model/<name>.yaml
      poison_ratios: [0.1]
      seeds: [0]                         # seed_everything of the attack run
      args: [--trainer.max_epochs, "15"] # extra train.py arguments for every attack run
      per_attack_args: {}                # attack name -> extra arguments
    defenses:
      defenses: [ft, fp, clp]            # configs/defense/<name>.yaml (+ configs/defense/<dataset>/<name>.yaml)
      spc: [2, 10]
      split_seeds: [0, 1]                # the draw of D_m (--data.split_seed)
      seed_everything: split_seed        # the training seed: split_seed (the default) or one integer for all
      once_per_model: [clp]              # data-free: one run per attacked model, at the first spc and seed
      args: []
      per_defense_args: {}               # defense name -> extra arguments
      retune: {k: 5}                     # the retuning attack after each run (datamodules/retuning.py; omit: off),
                                         # with the grid's `clean` model of the same dataset/backbone/seed if any
    exclude:                             # a run matching every key of an entry is dropped
      - {defense: nc, dataset: [gtsrb, tiny_imagenet]}

A profile is a folder of config overlays, one per method, applied after the method's own config and before its
dataset's: `profile: survey` runs every method with the behaviours the survey's numbers depend on where they
differ from the project's defaults (docs/fidelity.md lists each one and why).

A defense run's training seed (`--seed_everything`: initialisation of new parts, batch order, augmentation) is
its split seed unless `defenses.seed_everything` names one integer: so by default a split seed varies the defender's
data and the training randomness together, and the spread over split seeds is the spread over both. An integer
keeps the training seed fixed while D_m varies. Either way the seed is an argument of the run (in its key's hash)
and its result.json states it (`seed`).

Runs are identified by a readable key plus a hash of their arguments and of the contents of the config files they
name (parsed: a comment or layout edit keeps the key), so changing an override or a value in a config YAML makes
a new run instead of reusing a stale one. Config files enter the hash by their path inside the repository, so
checkouts in different places (the machines of a W&B sweep) agree on every key.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.backbones import BACKBONES
from core.registry import class_path
from datamodules.datasets import DATASETS
from datamodules.record import attack_run_name, defense_run_name
from datamodules.retuning import Retuning
from datamodules.triggers import TRIGGERS
from lightning_modules.defenses import DEFENSES

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
MATCH_KEYS = {"dataset", "attack", "backbone", "poison_ratio", "seed", "defense", "spc", "split_seed"}
TOP_KEYS = {"name", "runs_dir", "data_dir", "profile", "attacks", "defenses", "exclude"}
ATTACK_KEYS = {"datasets", "attacks", "backbones", "poison_ratios", "seeds", "args", "per_attack_args"}
DEFENSE_KEYS = {"defenses", "spc", "split_seeds", "seed_everything", "once_per_model", "args", "per_defense_args",
                "retune"}
RETUNE_KEYS = {"k", "epochs", "lr", "momentum", "batch_size", "clean", "fraction", "seed", "qra", "qra_eps", "qra_alpha",
               "qra_epochs", "qra_lr", "qra_clean", "qra_poison"}
SPLIT_SEED = "split_seed"  # defenses.seed_everything: the training seed is each run's split seed


def check_schema(raw: Any, path: Path) -> None:
    """Every key at every level of a grid file known, every value of the right type and range; raises a
    ValueError naming the first problem (with the closest known key for a misspelling)."""

    def fail(where: str, message: str) -> None:
        raise ValueError(f"{path}: {where}: {message}")

    def keys(where: str, section: Any, known: set[str]) -> None:
        if not isinstance(section, dict):
            fail(where or "the file", f"must be a map of keys, got {type(section).__name__}")
        for key in section:
            if key not in known:
                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(known))})"
                fail(f"{where}.{key}" if where else str(key), f"unknown key{hint}")

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def values(where: str, value: Any, ok: Any, what: str, empty: bool = False) -> None:
        if not isinstance(value, list) or (not value and not empty):
            fail(where, f"must be a {'' if empty else 'non-empty '}list, got {value!r}")
        for v in value:
            if not ok(v):
                fail(where, f"{v!r} is not {what}")

    def arguments(where: str, value: Any) -> None:
        values(where, value, lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool),
               "a command-line word (quote it: \"true\", \"0.1\")", empty=True)

    def per_method(where: str, value: Any, folder: str) -> None:
        if not isinstance(value, dict):
            fail(where, f"must map a method name to a list of arguments, got {value!r}")
        for name, args in value.items():
            if not (CONFIGS / folder / f"{name}.yaml").exists():
                fail(f"{where}.{name}", f"no configs/{folder}/{name}.yaml")
            arguments(f"{where}.{name}", args)

    keys("", raw, TOP_KEYS)
    for key in ("name", "runs_dir", "data_dir", "profile"):
        if key in raw and not isinstance(raw[key], str) and not (key == "profile" and raw[key] is None):
            fail(key, f"must be a string, got {raw[key]!r}")
    names = lambda v: isinstance(v, str)
    attacks = raw.get("attacks") or {}
    keys("attacks", attacks, ATTACK_KEYS)
    for key in ("datasets", "attacks", "backbones"):
        values(f"attacks.{key}", attacks.get(key), names, "a name")
    values("attacks.poison_ratios", attacks.get("poison_ratios"), lambda v: number(v) and 0 <= v <= 1,
           "a poison ratio in [0, 1]")
    if "seeds" in attacks:
        values("attacks.seeds", attacks["seeds"], lambda v: type(v) is int and v >= 0, "a seed (an integer >= 0)")
    if "args" in attacks:
        arguments("attacks.args", attacks["args"])
    if "per_attack_args" in attacks:
        per_method("attacks.per_attack_args", attacks["per_attack_args"], "attack")
    defenses = raw.get("defenses") or {}
    keys("defenses", defenses, DEFENSE_KEYS)
    for key in ("defenses", "once_per_model"):
        if key in defenses:
            values(f"defenses.{key}", defenses[key], names, "a name", empty=True)
    if "spc" in defenses:
        values("defenses.spc", defenses["spc"], lambda v: type(v) is int and v >= 1,
               "a number of clean samples per class (an integer >= 1)")
    if "split_seeds" in defenses:
        values("defenses.split_seeds", defenses["split_seeds"], lambda v: type(v) is int and v >= 0,
               "a split seed (an integer >= 0)")
    if "seed_everything" in defenses:
        seed = defenses["seed_everything"]
        if seed != SPLIT_SEED and not (type(seed) is int and seed >= 0):
            fail("defenses.seed_everything", f"must be {SPLIT_SEED!r} (each run's split seed, the default) or a "
                                             f"training seed (an integer >= 0), got {seed!r}")
    if "args" in defenses:
        arguments("defenses.args", defenses["args"])
    if "per_defense_args" in defenses:
        per_method("defenses.per_defense_args", defenses["per_defense_args"], "defense")
    if defenses.get("retune") is not None:
        keys("defenses.retune", defenses["retune"], RETUNE_KEYS)
        try:
            Retuning(**{"clean_model": "the grid's clean model (checked in validate)", **defenses["retune"]})
        except (TypeError, ValueError) as err:
            fail("defenses.retune", str(err))
    exclude = raw.get("exclude") or []
    if not isinstance(exclude, list):
        fail("exclude", f"must be a list of maps, got {exclude!r}")


def content_digest(path: Path) -> str:
    """sha256 of a YAML file's parsed contents (canonical JSON), so comments and layout do not change run keys;
    of its bytes when it does not parse (the run itself will then fail and say why)."""
    text = path.read_text()
    try:
        canonical = json.dumps(yaml.safe_load(text), sort_keys=True, separators=(",", ":"), default=str)
    except yaml.YAMLError:
        canonical = text
    return hashlib.sha256(canonical.encode()).hexdigest()


# options whose value is a file the grid itself made (the retuning's clean model): in a key by its place, not its
# spelling, so a grid with `runs_dir: /abs/path/runs/x` and one with `runs_dir: runs/x` agree on every key
PATH_OPTIONS = frozenset({"--data.init_args.retune.clean_model"})


def repo_path(arg: str) -> str:
    """`arg` as a path inside the repository (posix, relative) when it is one; its absolute path otherwise."""
    path = Path(arg).resolve()
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)


def identity(args: Sequence[str], digests: dict[str, str] | None = None) -> list[str]:
    """What a run's hash covers: `args`, with the file after each `--config` replaced by its path inside the
    repository and the digest of its parsed contents (content_digest), and the file after each of PATH_OPTIONS by
    its path inside the repository. `digests` caches the files already read (one per grid)."""
    digests = {} if digests is None else digests
    out = []
    for previous, arg in zip(("", *args), args):
        if previous in PATH_OPTIONS:
            arg = repo_path(arg)
        elif previous == "--config":
            if arg not in digests:
                digests[arg] = f"{repo_path(arg)}@sha256:{content_digest(Path(arg).resolve())}"
            arg = digests[arg]
        out.append(arg)
    return out


def short_hash(args: Sequence[str], digests: dict[str, str] | None = None) -> str:
    return hashlib.sha256(json.dumps(identity(args, digests)).encode()).hexdigest()[:8]


def config_args(*files: Path) -> list[str]:
    return [a for f in files if f.exists() for a in ("--config", str(f))]


@dataclass(frozen=True)
class AttackRun:
    dataset: str
    attack: str
    backbone: str
    poison_ratio: float
    seed: int
    args: tuple[str, ...]
    digest: str  # short_hash(args): the arguments and the contents of their config files

    @property
    def key(self) -> str:
        return attack_run_name(self.dataset, self.attack, self.backbone, f"p{self.poison_ratio:g}", f"s{self.seed}",
                               self.digest)

    def fields(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "attack": self.attack, "backbone": self.backbone,
                "poison_ratio": self.poison_ratio, "seed": self.seed}


@dataclass(frozen=True)
class DefenseRun:
    attack: AttackRun
    defense: str
    spc: int
    split_seed: int
    args: tuple[str, ...]  # without the attacked checkpoint, which the runner adds
    digest: str  # short_hash(args)
    needs: tuple[AttackRun, ...] = ()  # other attacked models it reads (the retuning's clean model)

    @property
    def key(self) -> str:
        return f"{defense_run_name(self.defense, self.spc, self.split_seed)}-{self.digest}"

    def fields(self) -> dict[str, Any]:
        """The run's names in the grid (for its key, exclusions and W&B); its record says what it was."""
        return {**self.attack.fields(), "defense": self.defense, "spc": self.spc, "split_seed": self.split_seed}


@dataclass
class Grid:
    name: str
    runs_dir: Path
    data_dir: str = "data"
    profile: str | None = None  # configs/{attack,defense}/<profile>/ overlays
    attacks: dict[str, Any] = field(default_factory=dict)
    defenses: dict[str, Any] = field(default_factory=dict)
    exclude: list[dict[str, Any]] = field(default_factory=list)
    source: Path | None = None
    digests: dict[str, str] = field(default_factory=dict, repr=False, compare=False)  # see identity()

    @classmethod
    def load(cls, path: str | Path) -> Grid:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"grid file {path} not found (see configs/grids/ for examples)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
        check_schema(raw, path)
        grid = cls(name=raw.get("name", path.stem), runs_dir=Path(raw.get("runs_dir", f"runs/grids/{path.stem}")),
                   data_dir=str(raw.get("data_dir", "data")), profile=raw.get("profile"),
                   attacks=raw.get("attacks") or {},
                   defenses=raw.get("defenses") or {}, exclude=raw.get("exclude") or [], source=path)
        grid.validate()
        return grid

    def validate(self) -> None:
        a, d = self.attacks, self.defenses
        for key in ("datasets", "attacks", "backbones", "poison_ratios"):
            if not a.get(key):
                raise ValueError(f"grid {self.name}: attacks.{key} must list at least one value")
        # names come from the registries; attacks and defenses also need their config (configs/<kind>/<name>.yaml),
        # a registered backbone without configs/model/<name>.yaml is named by its class path
        checks = [("attack", a["attacks"], {"clean", *TRIGGERS}), ("model", a["backbones"], set(BACKBONES)),
                  ("data", a["datasets"], set(DATASETS)), ("defense", d.get("defenses", []), set(DEFENSES))]
        for folder, names, known in checks:
            what = {"model": "backbone", "data": "dataset"}.get(folder, folder)
            for n in names:
                if n not in known:
                    raise ValueError(f"grid {self.name}: unknown {what} {n!r}; registered: {', '.join(sorted(known))}")
                if folder in ("attack", "defense", "data") and not (CONFIGS / folder / f"{n}.yaml").exists():
                    raise ValueError(f"grid {self.name}: {what} {n!r} has no config configs/{folder}/{n}.yaml")
        profiled = [CONFIGS / kind / str(self.profile) for kind in ("attack", "defense")]
        if self.profile is not None and not any(p.is_dir() for p in profiled):
            raise ValueError(f"grid {self.name}: unknown profile {self.profile!r} (no configs/attack/{self.profile}/ "
                             f"or configs/defense/{self.profile}/)")
        if (d.get("retune") or {}).get("qra") and "clean" not in a["attacks"]:
            raise ValueError(f"grid {self.name}: defenses.retune.qra needs a clean model: add `clean` to "
                             f"attacks.attacks (and exclude its defense runs)")
        for r in a["poison_ratios"]:
            if not 0 <= float(r) <= 1:
                raise ValueError(f"grid {self.name}: poison ratio {r} outside [0, 1]")
        for entry in self.exclude:
            if not isinstance(entry, dict) or not entry or set(entry) - MATCH_KEYS:
                raise ValueError(f"grid {self.name}: exclude entries are maps over {sorted(MATCH_KEYS)}, got {entry}")
        for name in d.get("once_per_model", []):
            if name not in d.get("defenses", []):
                raise ValueError(f"grid {self.name}: once_per_model names {name!r}, which is not in defenses")

    def excluded(self, fields: dict[str, Any]) -> bool:
        for entry in self.exclude:
            if all(k in fields and fields[k] in (v if isinstance(v, list) else [v]) for k, v in entry.items()):
                return True
        return False

    def method_configs(self, kind: str, name: str, dataset: str) -> list[Path]:
        """configs/<kind>/<name>.yaml, then the profile's and the dataset's overlays (config_args skips absent ones)."""
        folder = CONFIGS / kind
        layers = [folder, *([folder / self.profile] if self.profile else []), folder / dataset]
        return [layer / f"{name}.yaml" for layer in layers]

    def attack_runs(self) -> list[AttackRun]:
        a = self.attacks
        runs = []
        for dataset, attack, backbone, ratio, seed in itertools.product(
            a["datasets"], a["attacks"], a["backbones"], a["poison_ratios"], a.get("seeds", [0])
        ):
            model = CONFIGS / "model" / f"{backbone}.yaml"
            args = [*config_args(CONFIGS / "data" / f"{dataset}.yaml", *self.method_configs("attack", attack, dataset),
                                 model),
                    *([] if model.exists() else ["--model.init_args.backbone.class_path", class_path(BACKBONES[backbone])]),
                    "--data.init_args.poison_ratio", str(ratio), "--data.init_args.data_dir", self.data_dir,
                    "--seed_everything", str(seed), *map(str, a.get("args", [])),
                    *map(str, a.get("per_attack_args", {}).get(attack, []))]
            run = AttackRun(dataset, attack, backbone, float(ratio), int(seed), tuple(args),
                            short_hash(args, self.digests))
            if not self.excluded(run.fields()):
                runs.append(run)
        return runs

    def defense_runs(self, attack_runs: list[AttackRun] | None = None) -> list[DefenseRun]:
        d = self.defenses
        spcs, seeds = d.get("spc", [10]), d.get("split_seeds", [0])
        once = set(d.get("once_per_model", []))
        training_seed = d.get("seed_everything", SPLIT_SEED)
        attacks = attack_runs if attack_runs is not None else self.attack_runs()
        retune = d.get("retune")
        # the retuning's "never backdoored" reference: the grid's clean model of the same dataset, backbone and seed
        clean = {(a.dataset, a.backbone, a.seed): a for a in attacks if a.attack == "clean"}
        runs = []
        configs: dict[tuple[str, str], list[str]] = {}  # per (defense, dataset): 124,128 runs share 48 of them
        for attack in attacks:
            reference = clean.get((attack.dataset, attack.backbone, attack.seed)) if retune is not None else None
            retune_args = [] if retune is None else [
                "--data.init_args.retune", json.dumps(retune, sort_keys=True),
                *(["--data.init_args.retune.clean_model", str(self.attack_checkpoint(reference))]
                  if reference is not None and reference is not attack else [])]
            needs = (reference,) if retune_args[2:] else ()
            for defense in d.get("defenses", []):
                if (defense, attack.dataset) not in configs:
                    configs[defense, attack.dataset] = config_args(*self.method_configs("defense", defense,
                                                                                        attack.dataset))
                combos = [(spcs[0], seeds[0])] if defense in once else itertools.product(spcs, seeds)
                for spc, seed in combos:
                    args = [*configs[defense, attack.dataset],
                            "--data.spc", str(spc), "--data.split_seed", str(seed),
                            "--seed_everything", str(seed if training_seed == SPLIT_SEED else training_seed),
                            *map(str, d.get("args", [])), *map(str, d.get("per_defense_args", {}).get(defense, [])),
                            *retune_args]
                    run = DefenseRun(attack, defense, int(spc), int(seed), tuple(args), short_hash(args, self.digests),
                                     needs)
                    if not self.excluded(run.fields()):
                        runs.append(run)
        return runs

    # -- where runs live ------------------------------------------------------------------------------------
    def attack_dir(self, run: AttackRun) -> Path:
        return self.runs_dir / "attacks" / run.key

    def defense_dir(self, run: DefenseRun) -> Path:
        return self.runs_dir / "defenses" / run.attack.key / run.key

    def attack_checkpoint(self, run: AttackRun) -> Path:
        return self.attack_dir(run) / "checkpoints" / "last.ckpt"
