"""Train an attacked model or run a defense: `python train.py fit --config configs/quickstart.yaml`.

See README.md for the commands, and `python train.py fit --help` for every option.
"""

from datamodules.errors import short_errors
from lightning_modules.cli import BackdoorCLI


def main() -> None:
    with short_errors("train.py"):
        BackdoorCLI()


if __name__ == "__main__":
    main()
