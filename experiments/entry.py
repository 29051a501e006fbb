"""`backdoor-bench`: the installed command, one entry for the three scripts of a checkout.

    backdoor-bench fit|test|validate|predict ...   = python train.py ...
    backdoor-bench grid run|check|count|sweep|one|report ...   = python grid.py ...
    backdoor-bench prepare <dataset|triggers> ...   = python -m datamodules.prepare ...

Config paths that do not exist where the command runs are looked up in the installed configs, so
`backdoor-bench fit --config configs/quickstart.yaml` works outside a checkout too.
"""

from __future__ import annotations

import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAIN = ("fit", "test", "validate", "predict")


def installed_config(path: str) -> str:
    """`configs/<x>` (or `<x>` relative to configs/) from the installed configs when it is not a file here."""
    if Path(path).exists():
        return path
    relative = Path(path).parts[1:] if Path(path).parts[:1] == ("configs",) else Path(path).parts
    candidate = CONFIGS.joinpath(*relative)
    return str(candidate) if relative and candidate.is_file() else path


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = (argv[0], argv[1:]) if argv else ("--help", [])
    if command in TRAIN:
        from lightning_modules.cli import main as train

        rest = [installed_config(a) if prev == "--config" else a for prev, a in zip(["", *rest], rest)]
        train([command, *rest])
    elif command == "grid":
        from experiments.commands import main as grid

        grid([rest[0], installed_config(rest[1]), *rest[2:]] if len(rest) > 1 and rest[0] != "report" else rest)
    elif command == "prepare":
        from datamodules.prepare import main as prepare

        prepare(rest)
    else:
        print(__doc__.strip().split("\n\n")[0] + "\n\n" + __doc__.strip().split("\n\n")[1])
        sys.exit(0 if command in ("-h", "--help") else f"unknown command {command!r}")
