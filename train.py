"""Train an attacked model or run a defense: `python train.py fit --config configs/quickstart.yaml`.

See README.md for the commands, and `python train.py fit --help` for every option (installed: `backdoor-bench fit`).
"""

from lightning_modules.cli import main

if __name__ == "__main__":
    main()
