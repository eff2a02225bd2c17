"""FLAP: fluctuation-based adaptive structured pruning with bias compensation (docs/BASELINES.md §4).

One no-grad pass over the dense model hooks the input X of every output projection (ViT ``projection``/``fc2``, T5
``o``/``wo``) and keeps the exact fp32 token mean μ_j and unbiased variance σ²_j per input channel (Welford, pad
tokens excluded). Metrics: ``wifv`` σ²_j·‖W[:, j]‖² (default), ``ifv`` σ²_j, ``wifn`` mean_i|W_ij|·√(mean_t X²).

* **AL-AM** (default): per module, attention metrics squared (``square_attn``), then standardised over the module's
  channels (unbiased std); a channel's score is its Ẑ, a head's the mean Ẑ of its hd channels. P3 over every unit of
  both towers jointly (``per_tower``: each tower separately) with weights N_u and kept mass (1 − ρ')·ΣN_u; keep
  score > threshold; every module keeps at least its best unit, charged to the lowest-scoring kept units elsewhere.
  **[infer]** ``charge_bias``: the output biases added to T5 ``o``/``wo`` count against the budget;
  ``exact_budget``: after the threshold, marginal units are toggled so the kept mass lands on the target (this
  matters on coarse test models where one head is > 1% of the model; on BLIP-2 it moves a unit or two).
* **UL-UM**: the raw metric per module (head = Σ of its channels), P1 at ρ'.
* Compensation (``bias_compensation``): b ← b + W[:, P]·μ_P on the dense model before slicing; T5 ``o``/``wo`` get a
  zero bias first (``plan.out_bias``).

Knobs (``prune.options.flap``): metric=wifv, structure=al_am, square_attn=true, per_tower=false,
bias_compensation=true, charge_bias=true, exact_budget=true.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ukmp.baselines.magnitude import output_slice
from ukmp.baselines.primitives import (
    balance_kept, guard_min_one, plan_meta, prunable_ratio, read_options, total_prunable, uniform_local, weighted_threshold)
from ukmp.baselines.stats import RunningMoments, collect_input_stats
from ukmp.groups import PrunableGroup
from ukmp.plan import PruningPlan

DEFAULTS = {"metric": "wifv", "structure": "al_am", "square_attn": True, "per_tower": False,
            "bias_compensation": True, "charge_bias": True, "exact_budget": True}
CHOICES = {"metric": ("wifv", "ifv", "wifn"), "structure": ("al_am", "ul_um"), "square_attn": (True, False),
           "per_tower": (True, False), "bias_compensation": (True, False), "charge_bias": (True, False),
           "exact_budget": (True, False)}


# ------------------------------------------------------------------------------------------------ pure math
def channel_metric(weight: torch.Tensor, m: RunningMoments, metric: str) -> torch.Tensor:
    w = weight.detach().float()
    var = m.variance().to(w.device)
    if metric == "wifv":
        return var * (w * w).sum(0)
    if metric == "ifv":
        return var
    if metric == "wifn":
        return w.abs().mean(0) * m.mean_square().to(w.device).sqrt()
    raise ValueError(f"prune.options.flap.metric: unknown value {metric!r}")


def standardize(x: torch.Tensor) -> torch.Tensor:
    """(x − mean) / std over one module's channels (unbiased std; a constant module maps to zeros)."""
    x = x.double()
    sd = x.std(unbiased=True)
    return ((x - x.mean()) / (sd if sd > 0 else 1.0)).float()


def unit_scores(metric: torch.Tensor, unit_size: int, heads: bool, square_attn: bool, standardized: bool):
    if not standardized:
        return metric.view(-1, unit_size).sum(1)
    if heads and square_attn:
        metric = metric * metric
    return standardize(metric).view(-1, unit_size).mean(1)


def compensate_bias_(linear: nn.Linear, removed_cols: torch.Tensor, mean: torch.Tensor) -> None:
    """b ← b + W[:, P]·μ_P (in the bias dtype; computed in fp32)."""
    if linear.bias is None:
        raise ValueError("compensate_bias_: the output projection has no bias (add it first)")
    with torch.no_grad():
        idx = removed_cols.to(linear.weight.device)
        delta = linear.weight.index_select(1, idx).float() @ mean.float().to(idx.device).index_select(0, idx)
        linear.bias.add_(delta.to(linear.bias.dtype))


# ------------------------------------------------------------------------------------------------ selection
def al_am_keep(scores: Mapping[str, torch.Tensor], groups: list[PrunableGroup], keep_fraction: float,
               charge: int = 0, exact_budget: bool = True) -> dict[str, list[int]]:
    """P3 over ``groups`` jointly (keep score > threshold), then the min-one guard charged to the lowest-scoring kept
    units elsewhere. ``charge`` parameters are taken out of the kept budget. ``exact_budget`` **[infer]**: the kept
    mass is then moved to the target (1 − ρ')·ΣN_u − charge by toggling marginal units (see ``balance_kept``)."""
    score = torch.cat([scores[g.id].double().reshape(-1) for g in groups])
    weight = torch.cat([torch.full((g.n_units,), float(g.params_per_unit), dtype=torch.float64) for g in groups])
    module = torch.cat([torch.full((g.n_units,), i, dtype=torch.long) for i, g in enumerate(groups)])
    target = max(0.0, keep_fraction * float(weight.sum()) - charge)
    thr = weighted_threshold(score, weight, target / float(weight.sum()))
    keep = score > thr
    if not exact_budget:
        target = float(weight[keep].sum())
    keep = guard_min_one(keep, score, module, len(groups))
    keep = balance_kept(keep, score, weight, module, target)
    out, start = {}, 0
    for g in groups:
        out[g.id] = keep[start: start + g.n_units].nonzero().flatten().tolist()
        start += g.n_units
    return out


def out_bias_modules(groups: list[PrunableGroup], keep: Mapping[str, list[int]], model: nn.Module) -> list[str]:
    """Output projections of pruned groups that have no bias yet (T5 ``o``/``wo``)."""
    out = []
    for g in groups:
        if len(keep[g.id]) < g.n_units:
            path = output_slice(g).module
            if model.get_submodule(path).bias is None and path not in out:
                out.append(path)
    return out


def make_pre_apply(groups: list[PrunableGroup], means: Mapping[str, torch.Tensor]):
    def pre_apply(model: nn.Module, plan: PruningPlan) -> None:
        for g in groups:
            removed = plan.removed(g)
            if g.id not in plan.keep or not removed:
                continue
            sl = output_slice(g)
            cols = sl.indices(torch.tensor(removed, dtype=torch.long))
            compensate_bias_(model.get_submodule(sl.module), cols, means[sl.module])

    return pre_apply


def score_flap(model, groups, batches, pc, n_batches):
    from ukmp.models import count_parameters
    from ukmp.prune.methods import ScoreResult

    opts = read_options(pc.options, "flap", DEFAULTS, CHOICES)
    total = count_parameters(model)
    rate = prunable_ratio(pc.ratio, total, total_prunable(groups))
    paths = [output_slice(g).module for g in groups]
    moments = collect_input_stats(model, paths, batches(0))
    standardized = opts["structure"] == "al_am"
    scores, raw = {}, {}
    for g in groups:
        sl = output_slice(g)
        metric = channel_metric(model.get_parameter(sl.name), moments[sl.module], opts["metric"]).cpu()
        raw[g.id] = metric.view(-1, sl.unit_size).sum(1)
        scores[g.id] = unit_scores(metric, sl.unit_size, g.unit_type == "heads", opts["square_attn"], standardized)
    if standardized:
        towers = ([[g for g in groups if g.modality == m] for m in ("vision", "language")]
                  if opts["per_tower"] else [groups])
        towers = [t for t in towers if t]

        def select(charge_per_tower: list[int]) -> dict[str, list[int]]:
            keep: dict[str, list[int]] = {}
            for t, c in zip(towers, charge_per_tower):
                keep.update(al_am_keep(scores, t, 1.0 - rate, c, bool(opts["exact_budget"])))
            return keep

        keep = select([0] * len(towers))
        if opts["bias_compensation"] and opts["charge_bias"]:
            charge = []
            for t in towers:
                mods = out_bias_modules(t, keep, model)
                charge.append(sum(model.get_submodule(p).weight.shape[0] for p in mods))
            keep = select(charge)
        plan = PruningPlan(keep=keep, units={g.id: g.n_units for g in groups}, meta={"allocator": "P3 AL-AM"})
    else:
        plan = uniform_local(scores, groups, rate)
    pre_apply = None
    if opts["bias_compensation"]:
        plan.out_bias = out_bias_modules(groups, plan.keep, model)
        pre_apply = make_pre_apply(groups, {p: m.mean.detach().clone() for p, m in moments.items()})
    bias_params = sum(model.get_submodule(p).weight.shape[0] for p in plan.out_bias)
    plan = plan_meta(plan, groups, total, method="flap", unit_ratio=rate, added_bias_params=bias_params)
    return ScoreResult(scores, {"flap": scores, "flap_raw": raw},
                       {"calibration_tokens_vision": int(next(iter(moments.values())).n)}, plan=plan,
                       pre_apply=pre_apply)
