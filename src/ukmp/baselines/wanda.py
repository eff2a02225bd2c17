"""Wanda-sp (docs/BASELINES.md §7): |W| times the input-channel norm, reduced to heads and channels.

‖X_j‖ = √(mean over the valid (non-pad) calibration tokens of X_tj²) **[infer]** per-token normalisation of Wanda's
``scaler_row`` for padded batches.

* ``scope=out_proj`` (FLAP's wanda-sp, the default): S_j = mean_i |W_out[i, j]| · ‖X_j‖ at the output projection's
  input; a head sums its hd channels.
* ``scope=group`` (used inside ECoFLaP_sp): every Linear of the group with its own input norm: rows sum over j,
  columns sum over i, sum across the group's Linears, heads sum their dims.

Allocation P1 at ρ'. ``sequential=true`` (default, as FLAP) scores one block at a time in forward order (ViT,
then T5 encoder, then T5 decoder) with the blocks before it already pruned: the simple exact form that re-runs the
full model (pruned units masked to zero) once per block. ``sequential=false`` gathers statistics once on the dense
model and returns scores for the shared local allocator.

Knobs (``prune.options.wanda``): scope=out_proj, sequential=true, local_rounding=floor.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ukmp.baselines.magnitude import output_slice
from ukmp.baselines.primitives import (
    block_of, plan_meta, prunable_ratio, read_options, total_prunable, uniform_local)
from ukmp.baselines.stats import RunningMoments, collect_input_stats
from ukmp.groups import PrunableGroup
from ukmp.plan import PruningPlan

DEFAULTS = {"scope": "out_proj", "sequential": True, "local_rounding": "floor"}
CHOICES = {"scope": ("out_proj", "group"), "sequential": (True, False), "local_rounding": ("floor", "carry")}


def input_norm(m: RunningMoments) -> torch.Tensor:
    return m.mean_square().sqrt()


def out_proj_wanda(weight: torch.Tensor, norm: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Per unit: Σ over its columns of mean_i |W_ij| · ‖X_j‖."""
    s = weight.detach().float().abs().mean(0) * norm.float().to(weight.device)
    return s.view(-1, unit_size).sum(1)


def group_wanda(group: PrunableGroup, weights: Mapping[str, torch.Tensor],
                norms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per unit: Σ over the group's weight slices of Σ |W_ij|·‖X_j‖ over the unit's rows or columns."""
    units = torch.arange(group.n_units)
    total = torch.zeros(group.n_units, dtype=torch.float32)
    for sl in group.slices:
        if sl.param != "weight":
            continue
        w = weights[sl.name].detach().float()
        sal = w.abs() * norms[sl.module].float().to(w.device)[None, :]
        line = sal.sum(dim=1 - sl.dim).cpu()
        total += line.index_select(0, sl.indices(units)).view(group.n_units, -1).sum(1)
    return total


def stat_paths(groups: list[PrunableGroup], scope: str) -> list[str]:
    if scope == "out_proj":
        return [output_slice(g).module for g in groups]
    return [m for g in groups for m in g.linear_modules()]


def wanda_scores(model: nn.Module, groups: list[PrunableGroup], moments: Mapping[str, RunningMoments],
                 scope: str) -> dict[str, torch.Tensor]:
    norms = {p: input_norm(m) for p, m in moments.items()}
    out = {}
    for g in groups:
        if scope == "out_proj":
            sl = output_slice(g)
            out[g.id] = out_proj_wanda(model.get_parameter(sl.name), norms[sl.module], sl.unit_size).cpu()
        else:
            weights = {sl.name: model.get_parameter(sl.name) for sl in g.slices if sl.param == "weight"}
            out[g.id] = group_wanda(g, weights, norms)
    return out


def sequential_plan(model: nn.Module, groups: list[PrunableGroup], batches, rate: float, scope: str,
                    rounding: str = "floor") -> tuple[PruningPlan, dict[str, torch.Tensor], list[dict]]:
    """Block by block in forward order: statistics with earlier blocks masked by the plan so far, then P1."""
    from ukmp.models import adapter_for

    adapter = adapter_for(model.config)
    blocks: dict[str, list[PrunableGroup]] = {}
    for g in groups:
        blocks.setdefault(block_of(g), []).append(g)
    plan = PruningPlan(keep={}, units={})
    scores: dict[str, torch.Tensor] = {}
    trace = []
    for name, members in blocks.items():
        with adapter.mask(model, plan):
            moments = collect_input_stats(model, stat_paths(members, scope), batches(0))
            s = wanda_scores(model, members, moments, scope)
        part = uniform_local(s, members, rate, rounding)
        plan.keep.update(part.keep)
        plan.units.update(part.units)
        scores.update(s)
        trace.append({"block": name, "moments": {p: m.mean_square().clone() for p, m in moments.items()}})
    order = {g.id: i for i, g in enumerate(groups)}
    plan.keep = dict(sorted(plan.keep.items(), key=lambda kv: order[kv[0]]))
    return plan, scores, trace


def score_wanda_sp(model, groups, batches, pc, n_batches):
    from ukmp.models import count_parameters
    from ukmp.prune.methods import ScoreResult

    opts = read_options(pc.options, "wanda", DEFAULTS, CHOICES)
    total = count_parameters(model)
    if not opts["sequential"]:
        moments = collect_input_stats(model, stat_paths(groups, opts["scope"]), batches(0))
        scores = wanda_scores(model, groups, moments, opts["scope"])
        if opts["local_rounding"] == "floor":
            return ScoreResult(scores, {"wanda_sp": scores}, {}, {"scope": "local", "normalization": "none"})
        plan = uniform_local(scores, groups, prunable_ratio(pc.ratio, total, total_prunable(groups)), "carry")
        return ScoreResult(scores, {"wanda_sp": scores}, {}, plan=plan_meta(plan, groups, total, method="wanda_sp"))
    rate = prunable_ratio(pc.ratio, total, total_prunable(groups))
    plan, scores, _ = sequential_plan(model, groups, batches, rate, opts["scope"], opts["local_rounding"])
    plan = plan_meta(plan, groups, total, method="wanda_sp", allocator="P1 sequential", unit_ratio=rate)
    return ScoreResult(scores, {"wanda_sp": scores}, {"sequential_blocks": len({block_of(g) for g in groups})},
                       plan=plan)
