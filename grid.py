"""The benchmark as one job: `python grid.py run|check|count|sweep|one|report ...` (experiments/commands.py; the
installed command is `backdoor-bench grid ...`)."""

from experiments.commands import main

if __name__ == "__main__":
    main()
