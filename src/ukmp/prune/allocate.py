"""Scores -> :class:`PruningPlan` (UKMP_METHOD.md §1.4, §2.4 injection, §2.5 loop).

* :func:`combine` — UKMI: language units ``I = Taylor * entropy``, vision units ``I = Taylor``.
* :func:`allocate` — ``scope="global"``: the modality-normalised, parameter-budgeted iterative threshold of
  §2.5; ``scope="local"``: the same fraction of units removed in every group (lowest scores first);
  ``scope="uniform"`` and ``width_multiple``: engine-friendly widths (:mod:`ukmp.prune.widths`).

The ratio is measured in parameters of the **whole** model by default (``budget="params"``: ``removed /
total_params`` where ``removed`` is the sum of ``params_per_unit`` over pruned units), or in units of the scored
groups (``budget="units"``, LLM-Pruner's count: a KV group and an MLP channel are one unit each). Groups without
scores (outside ``prune.layers``) stay whole and count as unprunable. Everything is deterministic: ties are broken
by (score, group order, unit index), so the same scores give the same plan. :func:`ratio_check` states how far a
plan lands from its target, in its budget's own currency.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Mapping

import torch

from ukmp.groups import PrunableGroup, groups_by_id
from ukmp.plan import PruningPlan
from ukmp.prune.budget import alive_at_start, budget_check, local_count, per_param
from ukmp.prune.widths import allocate_widths

Scope = Literal["global", "local", "uniform"]
Normalization = Literal["mean_iterative", "mean_once", "none", "minmax", "standardize"]
LocalRatioMode = Literal["whole_model", "per_module_raw"]
CombineMode = Literal["product", "taylor_only"]

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


# --------------------------------------------------------------------------------------------- helpers
@dataclass
class _Flat:
    order: list[PrunableGroup]
    score: torch.Tensor  # float64 [U]
    gidx: torch.Tensor  # long [U]
    uidx: torch.Tensor  # long [U]
    ppu: torch.Tensor  # long [U]
    mod: torch.Tensor  # long [U], index into modalities
    modalities: list[str]
    count: torch.Tensor | None = None  # long [U]: units per entry when the entries are blocks (ukmp.prune.widths)


def _flatten(scores: Mapping[str, torch.Tensor], groups: list[PrunableGroup]) -> _Flat:
    by_id = groups_by_id(groups)
    for gid in scores:
        if gid not in by_id:
            raise ValueError(f"scores: unknown group {gid!r}")
    order = [g for g in groups if g.id in scores]
    if not order:
        raise ValueError("scores: no score for any group")
    modalities = sorted({g.modality for g in order})
    vals, gi, ui, pp, md = [], [], [], [], []
    for i, g in enumerate(order):
        s = torch.as_tensor(scores[g.id]).detach().to("cpu", torch.float64).reshape(-1)
        if s.numel() != g.n_units:
            raise ValueError(f"scores: group {g.id!r} has {s.numel()} scores for {g.n_units} units")
        if not torch.isfinite(s).all():
            raise ValueError(f"scores: group {g.id!r} has non-finite scores")
        vals.append(s)
        gi.append(torch.full((g.n_units,), i, dtype=torch.long))
        ui.append(torch.arange(g.n_units))
        pp.append(torch.full((g.n_units,), g.params_per_unit, dtype=torch.long))
        md.append(torch.full((g.n_units,), modalities.index(g.modality), dtype=torch.long))
    return _Flat(order, torch.cat(vals), torch.cat(gi), torch.cat(ui), torch.cat(pp), torch.cat(md),
                 modalities)


def _stats(score: torch.Tensor, cand: torch.Tensor, masks: list[torch.Tensor], mode: str) -> list[tuple]:
    """Per modality ``(shift, scale)`` over the candidate units, so that normalised = (I - shift) / scale.
    ``masks[m]``: the units of modality ``m``."""
    out = []
    for mask in masks:
        v = score[cand & mask]
        if v.numel() == 0:
            out.append((0.0, 1.0))
        elif mode in ("mean_iterative", "mean_once"):
            mu = float(v.mean())
            out.append((0.0, mu if mu > 0 and math.isfinite(mu) else 1.0))
        elif mode == "minmax":
            lo, hi = float(v.min()), float(v.max())
            out.append((lo, hi - lo if hi > lo else 1.0))
        elif mode == "standardize":
            mu, sd = float(v.mean()), float(v.std(unbiased=False))
            out.append((mu, sd if sd > 0 else 1.0))
        else:
            out.append((0.0, 1.0))
    return out


def _apply_stats(score: torch.Tensor, mod: torch.Tensor, stats: list[tuple]) -> torch.Tensor:
    scale = torch.tensor([s[1] for s in stats], dtype=torch.float64)[mod]
    if all(s[0] == 0.0 for s in stats):  # x - 0.0 == x exactly: skip the subtraction
        return score / scale
    shift = torch.tensor([s[0] for s in stats], dtype=torch.float64)[mod]
    return (score - shift) / scale


def _plan(flat: _Flat, alive: torch.Tensor, meta: dict[str, Any]) -> PruningPlan:
    keep: dict[str, list[int]] = {}
    for i, g in enumerate(flat.order):
        sel = alive & (flat.gidx == i)
        keep[g.id] = sorted(int(u) for u in flat.uidx[sel].tolist())
    return PruningPlan(keep=keep, units={g.id: g.n_units for g in flat.order}, meta=meta)


def _removed_by_modality(flat: _Flat, alive: torch.Tensor) -> dict[str, int]:
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
    flat = _flatten(scores, groups)
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
        alive, extra = allocate_widths(flat, int(total_params), prunable, cfg, _allocate_global)
    elif cfg.scope == "local":
        alive, extra = _allocate_local(flat, int(total_params), prunable, cfg, alive0)
    else:
        alive, extra = _allocate_global(flat, int(total_params), cfg, alive0)
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


def _enforce_min_units(
    flat: _Flat, remaining: torch.Tensor, sel: torch.Tensor, norm: torch.Tensor, keep_min: int
) -> torch.Tensor:
    """Drop from ``sel`` the best-ranked units of any group that the step would leave below ``keep_min``
    (``remaining``: alive units per group before the step)."""
    after = remaining - torch.bincount(flat.gidx[sel], minlength=len(flat.order))
    for i in (after < keep_min).nonzero().flatten().tolist():
        members = (sel & (flat.gidx == i)).nonzero().flatten()  # ascending (group order, unit index)
        order = torch.sort(norm[members], stable=True).indices  # ascending (score, unit index)
        give_back = min(keep_min - int(after[i]), members.numel())
        sel[members[order[members.numel() - give_back:]]] = False
    return sel


def _last_step(sel: torch.Tensor, norm: torch.Tensor, cost: torch.Tensor, gap: float,
               exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A step that would pass the budget, shrunk: ``(taken, skipped)``. In score order (ties: flat order), the
    units up to the one that reaches the budget (``exact=False``), or every unit that still fits (``exact=True``;
    the others are skipped for good: the gap only shrinks)."""
    idx = sel.nonzero().flatten()
    order = idx[torch.sort(norm[idx], stable=True).indices]
    taken, skipped = torch.zeros_like(sel), torch.zeros_like(sel)
    if not exact:
        cum = torch.cumsum(cost[order], 0)
        n_take = int(torch.searchsorted(cum, torch.tensor([gap - 1e-9], dtype=torch.float64)).item()) + 1
        taken[order[: min(n_take, order.numel())]] = True
        return taken, skipped
    for u in order.tolist():
        c = float(cost[u])
        if c <= gap + 1e-9:
            taken[u] = True
            gap -= c
        else:
            skipped[u] = True
    return taken, skipped


def _allocate_global(flat: _Flat, total: int, cfg: AllocationConfig,
                     alive0: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    n_units = torch.tensor([g.n_units for g in flat.order], dtype=torch.long)
    floor = torch.tensor([round((1.0 - cfg.max_group_prune_ratio) * g.n_units, 9) for g in flat.order],
                         dtype=torch.float64)
    keep_min = int(cfg.min_units_per_group)
    target = cfg.target_ratio
    n_all = flat.score.numel() if flat.count is None else int(flat.count.sum())
    if cfg.budget == "units":  # LLM-Pruner's count: the units it keeps are int(N * (1 - r))
        cost = torch.ones(n_all, dtype=torch.float64) if flat.count is None else flat.count.double()
        goal, scale = float(n_all - int(n_all * (1 - target))), n_all
    else:
        cost, goal, scale = flat.ppu.double(), target * total, total
    alive = alive0.clone()
    # state kept across steps instead of recomputed over every unit: alive units per group, and the candidates
    # (alive units of groups not frozen; a group never unfreezes, since its count only falls)
    remaining = n_units - torch.bincount(flat.gidx[~alive], minlength=len(flat.order))
    frozen = torch.zeros(len(flat.order), dtype=torch.bool)
    cand = alive.clone()
    masks = [flat.mod == m for m in range(len(flat.modalities))]
    removed = float(cost[~alive].sum())
    once_stats = None
    history: list[list[float]] = []
    last_step_params = 0
    reached = removed >= goal
    while not reached:
        now = (remaining.double() < floor) | (remaining <= keep_min) | (n_units <= keep_min)
        if bool((now & ~frozen).any()):
            cand &= ~now[flat.gidx]
            frozen = now
        if not bool(cand.any()):
            break
        if cfg.exact_stop and float(cost[cand].min()) > goal - removed + 1e-9:
            reached = True  # nothing left fits the gap: within one unit below the target
            break
        fine = target <= cfg.fine_from_start_at_or_below or removed / scale > cfg.fine_after * target
        k = int(cfg.fine_units_per_step if fine else cfg.units_per_step)
        if cfg.normalization == "mean_once":
            if once_stats is None:
                once_stats = _stats(flat.score, cand, masks, "mean_once")
            stats = once_stats
        else:
            stats = _stats(flat.score, cand, masks, cfg.normalization)
        norm = _apply_stats(flat.score, flat.mod, stats)
        if cfg.rank_by == "per_param":
            norm = per_param(norm, flat.ppu, cand)
        cvals = norm[cand]
        # the k-th smallest normalised score: the largest of the k smallest (topk with a small k is a single
        # partial pass, several times faster than a selection over every candidate)
        theta = torch.topk(cvals, min(k, cvals.numel()), largest=False, sorted=False).values.max()
        sel = cand & (norm <= theta)
        sel = _enforce_min_units(flat, remaining, sel, norm, keep_min)
        if not bool(sel.any()):
            break
        if removed + float(cost[sel].sum()) > goal + 1e-9:  # the last step: shrunk to the budget
            sel, skipped = _last_step(sel, norm, cost, goal - removed, cfg.exact_stop)
            cand &= ~skipped
        alive &= ~sel
        cand &= ~sel
        remaining -= torch.bincount(flat.gidx[sel], minlength=len(flat.order))
        last_step_params = int(flat.ppu[sel].sum())
        removed += float(cost[sel].sum())
        history.append([k, int(sel.sum()), removed / scale])
        reached = removed >= goal - 1e-9
    extra = {
        "steps": len(history),
        "reached_target": bool(reached),
        "floors_hit": not reached,  # the loop only stops short when every group is at its floor
        "last_step_removed_params": last_step_params,
        "history": history,
    }
    if cfg.budget == "units":
        extra["target_units"] = int(goal)
    return alive, extra


def _allocate_local(
    flat: _Flat, total: int, prunable: int, cfg: AllocationConfig, alive0: torch.Tensor
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
