"""The global allocation loop (UKMP_METHOD.md §2.5) over a flat layout of every scored unit.

:func:`flatten` lays the scored groups' units out as one vector each of score, group, unit index, parameters per
unit and modality (:class:`Flat`, in group order then unit index: the order every tie is broken by).
:func:`allocate_global` then removes units step by step: per step the scores are normalised per modality over the
units still rankable, the ``k`` lowest go (``units_per_step``, ``fine_units_per_step`` near the target), a group
leaves the ranking at its floor, and the last step is shrunk to the budget. :mod:`ukmp.prune.allocate` calls it for
``scope="global"``; :mod:`ukmp.prune.widths` runs it on blocks of units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ukmp.groups import PrunableGroup, groups_by_id
from ukmp.prune.allocation_config import AllocationConfig
from ukmp.prune.budget import per_param


@dataclass
class Flat:
    order: list[PrunableGroup]
    score: torch.Tensor  # float64 [U]
    gidx: torch.Tensor  # long [U]
    uidx: torch.Tensor  # long [U]
    ppu: torch.Tensor  # long [U]
    mod: torch.Tensor  # long [U], index into modalities
    modalities: list[str]
    count: torch.Tensor | None = None  # long [U]: units per entry when the entries are blocks (ukmp.prune.widths)


def flatten(scores: Mapping[str, torch.Tensor], groups: list[PrunableGroup]) -> Flat:
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
    return Flat(order, torch.cat(vals), torch.cat(gi), torch.cat(ui), torch.cat(pp), torch.cat(md),
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


def _enforce_min_units(
    flat: Flat, remaining: torch.Tensor, sel: torch.Tensor, norm: torch.Tensor, keep_min: int
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


def allocate_global(flat: Flat, total: int, cfg: AllocationConfig,
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
