"""Write a dataset's prepared files: `python -m datamodules.prepare cifar10 --data_dir data`.

Downloads the original files (torchvision, or the Tiny-ImageNet archive) into <data_dir>/<name>/raw and
writes <data_dir>/<name>/{train,test}.npz, which every run then reads directly.
`python -m datamodules.prepare triggers --data_dir data` fetches every registered trigger resource
(BackdoorBench's Hello Kitty, BadNets pictures and LF patterns; datamodules/resources.py) into
<data_dir>/triggers/, checking each file's sha256; files already there are only checked.
"""

from __future__ import annotations

import argparse
import sys

from datamodules import resources
from datamodules.datasets import DATASETS, get_dataset
from datamodules.errors import short_errors

TRIGGERS = "triggers"


def prepare_triggers(data_dir: str, download: bool = True) -> None:
    """Fetch (or, without downloading, check) every registered resource; list the failures at the end."""
    failed = []
    for name in resources.RESOURCES:
        try:
            path, how = resources.ensure(name, data_dir, download_missing=download)
        except (OSError, ValueError) as err:
            failed.append(f"{name}: {err}")
            print(f"{name}: FAILED", flush=True)
        else:
            print(f"{name}: {path} ({how}, sha256 ok)", flush=True)
    if failed:
        sys.exit(f"{len(failed)} of {len(resources.RESOURCES)} trigger resources are missing or wrong:\n"
                 + "\n".join(failed))
    print(f"all {len(resources.RESOURCES)} trigger resources are in {data_dir}/{resources.FOLDER}/")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=[*sorted(DATASETS), TRIGGERS],
                        help=f"a dataset, or {TRIGGERS!r} for the trigger resource files")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--no-download", dest="download", action="store_false",
                        help="read the original files already under <data_dir>/<name>/raw "
                             "(triggers: only check the files already there)")
    args = parser.parse_args(argv)
    with short_errors("datamodules.prepare"):
        prepare(args)


def prepare(args: argparse.Namespace) -> None:
    if args.dataset == TRIGGERS:
        prepare_triggers(args.data_dir, download=args.download)
        return
    dataset = get_dataset(args.dataset)
    if dataset.builtin:
        print(f"{args.dataset} is built in; nothing to prepare")
        return
    dataset.prepare(args.data_dir, download=args.download)
    print(f"wrote {dataset.prepared_path(args.data_dir, 'train').parent}/{{train,test}}.npz")


if __name__ == "__main__":
    main()
