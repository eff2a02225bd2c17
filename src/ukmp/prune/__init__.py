"""Turning unit scores into a :class:`ukmp.plan.PruningPlan`."""

from ukmp.prune.allocate import AllocationConfig, allocate, combine

__all__ = ["AllocationConfig", "allocate", "combine"]
