"""Budget arithmetic of the allocator: how many units a local rule removes from one group, and how far a plan lands
from its target, in the budget's own currency.

* :func:`local_count` — ``floor`` / ``carry`` / ``llm_pruner`` rounding of ``r * n`` units (see
  :class:`ukmp.prune.allocate.AllocationConfig`).
* :func:`budget_check` — ``{"budget", "target", "achieved", "overshoot", "one_unit", "largest_unit"}`` of a plan: a
  fraction of the whole model's parameters (``budget="params"``) or of the scored units (``budget="units"``).
* :func:`ratio_check` — the same figures for any plan (a method's own plan counts whole-model parameters).
* :func:`alive_at_start` — the units an earlier round's plan keeps (iterative pruning starts the allocator there).
* :func:`per_param` — ``rank_by="per_param"``: normalised scores divided by the parameters each unit frees.
* :func:`overshoot_problem` — a one-line message when a plan lands more than one smallest unit away from its target,
  flagged as an error when it overshoots by more than both its largest unit and ``prune.max_overshoot`` (a plan cut
  at the unit that reaches the target may overshoot by that unit, which on a tiny model is a big share: a KV group
  of tiny-llama is 4.5 % of it).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ukmp.groups import PrunableGroup
from ukmp.plan import PruningPlan


def unit_width(g: PrunableGroup) -> int:
    """Root channels per unit for LLM-Pruner's local rounding: the narrowest weight slice (a KV group's key rows,
    a head's ``hd`` rows, one MLP channel); 1 for a group described without slices."""
    return min((s.unit_size for s in g.slices if s.param == "weight"), default=1)


def local_count(g: PrunableGroup, r: float, rounding: str, carry: dict[str, float]) -> int:
    """Units to remove from ``g`` at unit ratio ``r``. ``llm_pruner``: ``c - int(c * (1 - r))`` of the group's
    ``c = n * w`` root channels, in whole units of ``w`` (so a KV group goes only once that reaches ``w`` channels);
    ``floor``: ``floor(r * n)``; ``carry``: the same with the fractional units floor() dropped so far in groups of
    the same kind added first (``carry`` is updated)."""
    if rounding == "llm_pruner":
        w = unit_width(g)
        c = g.n_units * w
        return (c - int(c * (1 - min(r, 1.0)))) // w
    want = min(r, 1.0) * g.n_units + (carry.get(g.kind, 0.0) if rounding == "carry" else 0.0)
    n_rm = math.floor(want + 1e-9)
    carry[g.kind] = want - n_rm
    return n_rm


def budget_check(dead: torch.Tensor, ppu: torch.Tensor, total: int, prunable: int, cfg: Any,
                 local_unit_ratio: float = 0.0) -> dict[str, Any]:
    """Target and achieved of an allocator plan (``dead``: the removed units, ``ppu``: parameters per unit, both
    flat over the scored units; ``cfg``: its AllocationConfig)."""
    n = dead.numel()
    if cfg.budget == "units":
        achieved = int(dead.sum()) / n
        return {"budget": "units", "target": cfg.target_ratio, "achieved": achieved,
                "overshoot": achieved - cfg.target_ratio, "one_unit": 1 / n, "largest_unit": 1 / n}
    target = cfg.target_ratio
    if cfg.scope == "local" and cfg.local_ratio_mode == "per_module_raw":  # every group's own fraction
        target = local_unit_ratio * prunable / total
    achieved = int(ppu[dead].sum()) / total
    return {"budget": "params", "target": target, "achieved": achieved, "overshoot": achieved - target,
            "one_unit": int(ppu.min()) / total, "largest_unit": int(ppu.max()) / total}


def ratio_check(meta: Mapping[str, Any], groups: list[PrunableGroup], total: int, target: float) -> dict[str, Any]:
    """The allocator's :func:`budget_check` when the plan has one, else (a method's own plan, always a whole-model
    parameter ratio) the same figures from its removed parameters, less the output biases it adds (FLAP), against
    ``target``."""
    if "ratio_check" in meta:
        return dict(meta["ratio_check"])
    achieved = (int(meta["removed_params"]) - int(meta.get("added_bias_params", 0))) / total
    return {"budget": "params", "target": target, "achieved": achieved, "overshoot": achieved - target,
            "one_unit": min(g.params_per_unit for g in groups) / total,
            "largest_unit": max(g.params_per_unit for g in groups) / total}


def _points(fraction: float, decimals: int) -> str:
    """``fraction`` in percentage points, with ``decimals`` decimals, or two significant digits when that would read
    0 (a full-size model's units are thousandths of a point)."""
    p = 100 * fraction
    return f"{p:.{decimals}f}" if p == 0 or abs(p) >= 10 ** -decimals else f"{p:.2g}"


def overshoot_problem(check: Mapping[str, Any], max_overshoot: float) -> tuple[str | None, bool]:
    """``(message, is_error)``: a message when the plan lands more than one smallest unit away from its target,
    an error when it overshoots by more than both its largest unit and ``max_overshoot``."""
    off, unit = float(check["overshoot"]), float(check["one_unit"])
    if abs(off) <= unit * (1 + 1e-9):
        return None, False
    what = "parameters of the whole model" if check["budget"] == "params" else "scored units"
    msg = (f"the plan removes {100 * check['achieved']:.2f}% of the {what}, target {100 * check['target']:.2f}% "
           f"({'+' if off > 0 else ''}{_points(off, 2)} points; one unit is {_points(unit, 3)} points)")
    return msg, off > max(float(check.get("largest_unit", unit)), max_overshoot) * (1 + 1e-9)


def alive_at_start(order: list[PrunableGroup], gidx: torch.Tensor, start: PruningPlan | None) -> torch.Tensor:
    """Flat keep-mask of the scored units (``order``: the scored groups; ``gidx``: each unit's index into it, units
    in ascending index within a group) that ``start`` keeps; every unit when it is None."""
    alive = torch.ones(gidx.numel(), dtype=torch.bool)
    for i, g in enumerate(order if start is not None else ()):
        if g.id in start.keep:
            if start.units.get(g.id, g.n_units) != g.n_units:
                raise ValueError(f"start: plan has {start.units[g.id]} units for group {g.id!r}, scores {g.n_units}")
            alive[(gidx == i).nonzero().flatten()[torch.tensor(start.removed(g), dtype=torch.long)]] = False
    return alive


def per_param(norm: torch.Tensor, ppu: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """``norm / ppu``: each unit's normalised score per parameter it frees (``cand``: the ranked units, whose
    scores must not be negative: a negative score divided by a unit's size would rank it higher the bigger it is)."""
    if bool((norm[cand] < 0).any()):
        raise ValueError("allocation.rank_by: 'per_param' needs non-negative normalised scores")
    return norm / ppu.double()
