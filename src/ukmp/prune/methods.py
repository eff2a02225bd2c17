"""The pruning-method vocabulary: what a method returns (:class:`ScoreResult`) and the registry of methods.

A method is ``fn(model, groups, batches, prune_config, n_batches) -> ScoreResult``. UKMP and the trivial methods are
registered by :mod:`ukmp.prune.scoring`, the baselines by :mod:`ukmp.baselines`; this module imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

import torch
from torch import nn

if TYPE_CHECKING:
    from ukmp.plan import PruningPlan

Batches = Callable[[int], Iterable[dict[str, torch.Tensor]]]  # epoch -> batches


@dataclass
class ScoreResult:
    scores: dict[str, torch.Tensor]  # what the allocator ranks
    parts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # e.g. {"taylor": ..., "entropy": ...}
    stats: dict[str, float | int] = field(default_factory=dict)
    allocation: dict[str, object] = field(default_factory=dict)  # AllocationConfig overrides
    plan: "PruningPlan | None" = None  # a method that allocates itself (FLAP P3, ECoFLaP P4, UPop) returns its plan
    pre_apply: "Callable[[nn.Module, PruningPlan], None] | None" = None  # e.g. FLAP bias compensation (dense model)


METHODS: dict[str, Callable[..., ScoreResult]] = {}
DATA_FREE: set[str] = set()


def register_method(name: str, fn: Callable[..., ScoreResult], data_free: bool = False) -> None:
    if not name or name in METHODS:
        raise ValueError(f"prune.method: {name!r} is empty or already registered")
    METHODS[name] = fn
    if data_free:
        DATA_FREE.add(name)


def get_method(name: str) -> Callable[..., ScoreResult]:
    if name not in METHODS:
        raise ValueError(f"prune.method: unknown method {name!r} (choose from {', '.join(sorted(METHODS))})")
    return METHODS[name]
