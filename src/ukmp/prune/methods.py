"""The pruning-method vocabulary: what a method returns (:class:`ScoreResult`) and the registry of methods.

A method is ``fn(model, groups, batches, prune_config, n_batches) -> ScoreResult``. The registry is filled without
this layer knowing who provides the methods: UKMP and the trivial methods register when :mod:`ukmp.prune.scoring` is
imported (same layer), and every other provider through the ``ukmp.methods`` entry-point group of the installed
distributions (ukmp's own baselines declare their registering function there, in ``pyproject.toml``). Each entry
point names a callable that registers its methods with :func:`register_method`; the group is loaded once, the first
time a name is looked up that is not registered yet. A third-party package adds methods the same way.

What a method is beyond its function (data-free, who makes its plan, whether its scores read the ratio) is declared
once, in the torch-free table :mod:`ukmp.method_traits`: a built-in method's traits come from there, a plugin passes
its own (``traits=``, or the older ``data_free=`` alone) and they are added to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Callable, Iterable

import torch
from torch import nn

from ukmp.method_traits import MethodTraits, declare_traits, method_traits

if TYPE_CHECKING:
    from ukmp.plan import PruningPlan

Batches = Callable[[int], Iterable[dict[str, torch.Tensor]]]  # epoch -> batches
ENTRY_POINT_GROUP = "ukmp.methods"


@dataclass
class ScoreResult:
    scores: dict[str, torch.Tensor]  # what the allocator ranks
    parts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # e.g. {"taylor": ..., "entropy": ...}
    stats: dict[str, float | int] = field(default_factory=dict)
    allocation: dict[str, object] = field(default_factory=dict)  # AllocationConfig overrides
    plan: "PruningPlan | None" = None  # a method that allocates itself (FLAP P3, ECoFLaP P4, UPop) returns its plan
    pre_apply: "Callable[[nn.Module, PruningPlan], None] | None" = None  # e.g. FLAP bias compensation (dense model)


METHODS: dict[str, Callable[..., ScoreResult]] = {}
_plugins_loaded = False


def register_method(name: str, fn: Callable[..., ScoreResult], data_free: bool | None = None,
                    traits: MethodTraits | None = None) -> None:
    """Register ``fn`` under ``name``. Its traits: ``traits`` if given, else those :mod:`ukmp.method_traits` declares
    for a built-in, else the defaults; ``data_free`` (kept for plugins written before the table) overrides that one
    flag. A declaration that contradicts the table is refused before anything is registered."""
    if not name or name in METHODS:
        raise ValueError(f"prune.method: {name!r} is empty or already registered")
    declared = traits if traits is not None else method_traits(name)
    if data_free is not None and data_free != declared.data_free:
        if traits is not None:
            raise ValueError(f"prune.method: {name!r} registered with data_free={data_free} but traits {traits}")
        declared = replace(declared, data_free=data_free)
    declare_traits(name, declared)
    METHODS[name] = fn


def load_plugins() -> None:
    """Call every ``ukmp.methods`` entry point once (each registers its methods); idempotent."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()()
        except Exception as e:  # a broken third-party plugin must name itself, not surface as an unknown method
            raise RuntimeError(f"pruning-method plugin {ep.name!r} ({ep.value}) failed to register: {e}") from e


def available_methods() -> list[str]:
    """Every registered method name, plugins included, sorted."""
    load_plugins()
    return sorted(METHODS)


def get_method(name: str) -> Callable[..., ScoreResult]:
    if name not in METHODS:
        load_plugins()
    if name not in METHODS:
        hint = "" if len(METHODS) > 3 else " (no plugin methods found: is ukmp installed, e.g. `pip install -e .`?)"
        raise ValueError(f"prune.method: unknown method {name!r} (choose from {', '.join(sorted(METHODS))}){hint}")
    return METHODS[name]


def is_data_free(name: str) -> bool:
    """Whether ``name`` scores without calibration data (looks the method up first, so plugins are loaded)."""
    get_method(name)
    return method_traits(name).data_free
