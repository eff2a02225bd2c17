"""Turning unit scores into a :class:`ukmp.plan.PruningPlan`.

The names below are imported on first use, so that the torch-free table of method traits (:mod:`ukmp.prune.traits`,
read by config validation) loads without torch.
"""

from importlib import import_module

__all__ = ["AllocationConfig", "allocate", "combine"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(import_module("ukmp.prune.allocate"), name)
    raise AttributeError(f"module 'ukmp.prune' has no attribute {name!r}")
