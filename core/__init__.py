"""The lowest layer: registries, backbones (with their layer roles), metrics and optimiser recipes.

Nothing here imports `datamodules`, `lightning_modules`, `callbacks` or `experiments`; all of them may import it.
"""
