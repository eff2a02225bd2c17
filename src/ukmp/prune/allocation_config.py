"""What an allocation is asked for: :class:`AllocationConfig`, every knob of :func:`ukmp.prune.allocate.allocate`
checked when it is built (one-line errors under ``allocation.<knob>``), and the vocabularies of its choices.

Kept apart from the algorithm so that the allocator's parts (the global loop of :mod:`ukmp.prune.global_loop`, the
plan assembly of :mod:`ukmp.prune.allocate`) can all name it; :mod:`ukmp.prune.allocate` re-exports it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Mapping

Scope = Literal["global", "local", "uniform"]
Normalization = Literal["mean_iterative", "mean_once", "none", "minmax", "standardize"]
LocalRatioMode = Literal["whole_model", "per_module_raw"]

_SCOPES = ("global", "local", "uniform")
_ROUNDINGS = ("floor", "carry", "llm_pruner")
_BUDGETS = ("params", "units")
_NORMS = ("mean_iterative", "mean_once", "none", "minmax", "standardize")
_LOCAL_MODES = ("whole_model", "per_module_raw")
_RANK_BY = ("importance", "per_param")


@dataclass(frozen=True)
class AllocationConfig:
    """How scores become a plan.

    ``target_ratio``: fraction of ALL model parameters to remove (§1.4). ``units_per_step`` units per global
    step, ``fine_units_per_step`` once the ratio exceeds ``fine_after * target`` or from the start when
    ``target <= fine_from_start_at_or_below``. A group leaves the ranking once its remaining units fall below
    ``(1 - max_group_prune_ratio) * n_units`` or reach ``min_units_per_group``; no step leaves a group with
    fewer than ``min_units_per_group`` units. ``normalization`` is per modality over the ranked units:
    ``mean_iterative`` (recomputed every step, the reference), ``mean_once`` (means of the first step kept),
    ``minmax`` and ``standardize`` (recomputed every step), ``none``. ``local_ratio_mode`` (local scope):
    ``whole_model`` removes ``target * total_params / prunable_params`` of each group's units so that the
    whole-model ratio matches the target; ``per_module_raw`` removes ``target`` of each group's units (as
    UKMP's ``prune_local``). ``local_rounding``: ``floor`` (P1 as written), ``carry`` (hits the ratio) or
    ``llm_pruner`` (LLM-Pruner's ``c - int(c * (1 - r))`` root channels in whole units); see
    :func:`ukmp.prune.budget.local_count`.

    ``budget``: ``params`` (the ratio is of the whole model's parameters) or ``units`` (global scope: remove
    ``N - int(N * (1 - target))`` of the ``N`` scored units, each unit counting 1, as LLM-Pruner's global
    pruning; local scope: ``target`` of every group's units, as ``per_module_raw``). ``exact_stop`` (global): the
    plan never overshoots the budget (a unit that would is skipped, a later smaller one may fill the gap), so it
    lands below the target by less than the smallest unit still rankable; without it the last step is cut at the
    unit that reaches the target, so the plan overshoots by less than that unit (the reference removes the rest
    of its step too).

    ``width_multiple`` / ``scope="uniform"``: engine-friendly widths, ranking blocks of units (:mod:`ukmp.prune.widths`).
    ``rank_by`` (global scope): ``importance`` ranks the modality-normalised scores (§2.5); ``per_param`` divides
    each normalised score by the parameters its unit frees (its group's ``params_per_unit``), so a unit is kept for
    what it is worth per parameter: of two units worth the same, the bigger one goes first. Scores that are already
    a mean per weight (UKMP's Taylor term, magnitude) then count ``sum / params_per_unit ** 2``; raw sums
    (LLM-Pruner's default) become a mean per weight. Within one group every unit frees the same parameters, so a
    local scope is refused rather than left unchanged.
    """

    target_ratio: float = 0.5
    scope: Scope = "global"
    normalization: Normalization = "mean_iterative"
    units_per_step: int = 1000
    fine_units_per_step: int = 100
    fine_after: float = 0.9
    fine_from_start_at_or_below: float = 0.2
    max_group_prune_ratio: float = 0.9
    min_units_per_group: int = 1
    local_ratio_mode: LocalRatioMode = "whole_model"
    local_rounding: str = "carry"  # local scope: "floor" | "carry" | "llm_pruner" (see above)
    exact_stop: bool = False  # global scope: never overshoot the budget (see above)
    budget: str = "params"  # "params" (whole-model parameters) | "units" (LLM-Pruner: every unit counts 1)
    width_multiple: int = 1  # kept channels per channel group: a multiple of this (or all of them)
    # -- parameter-cost-aware ranking (issue 28): see ``rank_by`` in the class docstring
    rank_by: str = "importance"  # "importance" | "per_param"

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_ratio < 1.0:
            raise ValueError(f"allocation.target_ratio: must be in [0, 1), got {self.target_ratio}")
        for name, choices in (("scope", _SCOPES), ("normalization", _NORMS), ("local_rounding", _ROUNDINGS),
                              ("budget", _BUDGETS), ("local_ratio_mode", _LOCAL_MODES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"allocation.{name}: unknown value {getattr(self, name)!r} "
                                 f"(choose from {list(choices)})")
        for name in ("units_per_step", "fine_units_per_step", "min_units_per_group", "width_multiple"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"allocation.{name}: must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.max_group_prune_ratio <= 1.0:
            raise ValueError(f"allocation.max_group_prune_ratio: must be in (0, 1], "
                             f"got {self.max_group_prune_ratio}")
        if not 0.0 <= self.fine_after <= 1.0:
            raise ValueError(f"allocation.fine_after: must be in [0, 1], got {self.fine_after}")
        if self.rank_by not in _RANK_BY:
            raise ValueError(f"allocation.rank_by: unknown value {self.rank_by!r} (choose from {list(_RANK_BY)})")
        for bad, why in ((self.scope != "global", (f"scope={self.scope} ranks within a group, where every unit "
                                                    "frees the same parameters")),
                         (self.normalization == "standardize", ("normalization=standardize makes scores negative, "
                                                                "whose order a division by the parameters inverts"))):
            if self.rank_by == "per_param" and bad:
                raise ValueError(f"allocation.rank_by: 'per_param' ranks across groups by a positive score; {why}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AllocationConfig":
        known = {f.name for f in fields(cls)}
        for k in d:
            if k not in known:
                raise ValueError(f"allocation: unknown key {k!r}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
