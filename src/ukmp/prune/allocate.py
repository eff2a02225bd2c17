"""Scores -> :class:`PruningPlan` (UKMP_METHOD.md §1.4, §2.4 injection, §2.5 loop).

* :func:`combine` — UKMI: language units ``I = Taylor * entropy``, vision units ``I = Taylor``.
* :func:`allocate` — ``scope="global"``: the modality-normalised, parameter-budgeted iterative threshold of
  §2.5 (:mod:`ukmp.prune.global_loop`); ``scope="local"``: the same fraction of units removed in every group
  (lowest scores first, here); ``scope="uniform"`` and ``width_multiple``: engine-friendly widths
  (:mod:`ukmp.prune.widths`). Whichever runs, the plan and its meta (achieved ratio, removed parameters per
  modality, :func:`ukmp.prune.budget.budget_check`) are assembled here. The knobs: :class:`AllocationConfig`
  (:mod:`ukmp.prune.allocation_config`, re-exported here).

The ratio is measured in parameters of the **whole** model by default (``budget="params"``: ``removed /
total_params`` where ``removed`` is the sum of ``params_per_unit`` over pruned units), or in units of the scored
groups (``budget="units"``, LLM-Pruner's count: a KV group and an MLP channel are one unit each). Groups without
scores (outside ``prune.layers``) stay whole and count as unprunable. Everything is deterministic: ties are broken
by (score, group order, unit index), so the same scores give the same plan. :func:`ratio_check` states how far a
plan lands from its target, in its budget's own currency.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Mapping

import torch

from ukmp.groups import PrunableGroup
from ukmp.plan import PruningPlan
from ukmp.prune.allocation_config import AllocationConfig
from ukmp.prune.budget import alive_at_start, budget_check, local_count
from ukmp.prune.global_loop import Flat, allocate_global, flatten
from ukmp.prune.widths import allocate_widths

CombineMode = Literal["product", "taylor_only"]

__all__ = ["AllocationConfig", "CombineMode", "allocate", "combine"]


def combine(
    taylor: Mapping[str, torch.Tensor],
    entropy: Mapping[str, torch.Tensor] | None,
    groups: list[PrunableGroup],
    mode: CombineMode = "product",
) -> dict[str, torch.Tensor]:
    """UKMI per unit (§2.4): language ``I = T * H``; vision ``I = T``.

    ``mode="taylor_only"`` ignores entropy. Groups without a Taylor score are left out.
    """
    if mode not in ("product", "taylor_only"):
        raise ValueError(f"combine.mode: unknown value {mode!r} (choose 'product' or 'taylor_only')")
    out: dict[str, torch.Tensor] = {}
    for g in groups:
        if g.id not in taylor:
            continue
        t = taylor[g.id].float()
        if mode == "product" and g.modality == "language":
            if entropy is None or g.id not in entropy:
                raise ValueError(f"entropy: no unit entropy for language group {g.id!r}")
            h = entropy[g.id].float().to(t.device)
            if h.shape != t.shape:
                raise ValueError(f"entropy: group {g.id!r} has shape {tuple(h.shape)}, "
                                 f"Taylor {tuple(t.shape)}")
            t = t * h
        out[g.id] = t
    return out


def _plan(flat: Flat, alive: torch.Tensor, meta: dict[str, Any]) -> PruningPlan:
    keep: dict[str, list[int]] = {}
    for i, g in enumerate(flat.order):
        sel = alive & (flat.gidx == i)
        keep[g.id] = sorted(int(u) for u in flat.uidx[sel].tolist())
    return PruningPlan(keep=keep, units={g.id: g.n_units for g in flat.order}, meta=meta)


def _removed_by_modality(flat: Flat, alive: torch.Tensor) -> dict[str, int]:
    dead = ~alive
    return {m: int(flat.ppu[dead & (flat.mod == i)].sum()) for i, m in enumerate(flat.modalities)}


# --------------------------------------------------------------------------------------------- allocation
def allocate(
    scores: Mapping[str, torch.Tensor],
    groups: list[PrunableGroup],
    total_params: int,
    cfg: AllocationConfig = AllocationConfig(),
    start: PruningPlan | None = None,
) -> PruningPlan:
    """A plan removing ``cfg.target_ratio`` of ``total_params`` (the whole model's parameter count), or of the
    scored units with ``cfg.budget="units"``.

    Higher score = more important. Groups without scores are kept whole and left out of the plan. ``start``
    (iterative pruning, :mod:`ukmp.prune.iterative`): the units an earlier round removed stay removed and count
    toward the budget and the group floors; their scores are not read (any finite value will do).
    """
    flat = flatten(scores, groups)
    prunable = int(sum(g.total_params for g in flat.order))
    if int(total_params) < prunable:
        raise ValueError(f"total_params: {total_params} is smaller than the scored groups' "
                         f"{prunable} parameters")
    widths = cfg.width_multiple > 1 or cfg.scope == "uniform"
    if start is not None and (widths or cfg.scope not in ("global", "local")):  # a new scope must use alive0 too
        raise ValueError(f"allocation: scope {cfg.scope} / width_multiple {cfg.width_multiple} cannot extend an "
                         f"earlier round's plan (prune.iterations)")
    alive0 = alive_at_start(flat.order, flat.gidx, start)
    if widths:
        alive, extra = allocate_widths(flat, int(total_params), prunable, cfg, allocate_global)
    elif cfg.scope == "local":
        alive, extra = _allocate_local(flat, int(total_params), prunable, cfg, alive0)
    else:
        alive, extra = allocate_global(flat, int(total_params), cfg, alive0)
    removed = int(flat.ppu[~alive].sum())
    meta: dict[str, Any] = {
        "allocator": "ukmp.prune.allocate",
        "config": cfg.to_dict(),
        "target_ratio": cfg.target_ratio,
        "achieved_ratio": removed / int(total_params),
        "total_params": int(total_params),
        "prunable_params": prunable,
        "removed_params": removed,
        "removed_params_by_modality": _removed_by_modality(flat, alive),
        "removed_units": int((~alive).sum()),
        "prunable_units": int(flat.score.numel()),
        "unscored_groups": [g.id for g in groups if g.id not in scores],
    }
    blocks = extra.pop("block_units", {})  # a block is the smallest step (ukmp.prune.widths)
    meta.update(extra)
    meta["ratio_check"] = {**budget_check(~alive, flat.ppu, int(total_params), prunable, cfg,
                                          float(extra.get("local_unit_ratio", 0.0))), **blocks}
    return _plan(flat, alive, meta)


def _allocate_local(
    flat: Flat, total: int, prunable: int, cfg: AllocationConfig, alive0: torch.Tensor
) -> tuple[torch.Tensor, dict[str, Any]]:
    raw = cfg.local_ratio_mode == "per_module_raw" or cfg.budget == "units"
    r = cfg.target_ratio if raw else cfg.target_ratio * total / prunable
    alive = alive0.clone()
    carry: dict[str, float] = {}
    capped = False
    for i, g in enumerate(flat.order):
        n_rm = local_count(g, r, cfg.local_rounding, carry)
        cap = min(math.floor(cfg.max_group_prune_ratio * g.n_units + 1e-9), g.n_units - cfg.min_units_per_group)
        capped |= n_rm > cap
        members = (alive & (flat.gidx == i)).nonzero().flatten()
        n_rm = min(n_rm, cap) - (g.n_units - members.numel())  # less what an earlier round removed
        if n_rm <= 0:
            continue
        order = torch.sort(flat.score[members], stable=True).indices  # ties: lower unit index first
        alive[members[order[:n_rm]]] = False
    target = r * prunable / total if raw else cfg.target_ratio
    if cfg.budget == "units":
        reached = int((~alive).sum()) >= math.floor(r * flat.score.numel() + 1e-9)
    else:
        reached = int(flat.ppu[~alive].sum()) / total >= target - 1e-12
    return alive, {"steps": 1, "local_unit_ratio": r, "reached_target": reached, "floors_hit": capped and not reached}
