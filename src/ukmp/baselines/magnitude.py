"""magnitude-sp (docs/BASELINES.md §6): data-free weight-magnitude scores of heads and channels.

* ``scope=out_proj`` (FLAP's mag-sp): a channel's score is the column L2 norm ‖W_out[:, j]‖₂ of the output
  projection (``projection`` / ``fc2`` / ``o`` / ``wo``); a head sums its hd columns.
* ``scope=group`` (LLM-Pruner's l1/l2 importance, the default): per Linear of the unit's group, Σ|w|^p over the unit's
  slice (no p-th root), the **mean** across the group's Linears, heads sum their dims.

Allocation: P1 (uniform per module at ρ') by default; ``allocation=global`` uses the shared P2 ranking, for which
``imp_normalizer=param`` (score per weight) is advised because raw sums do not compare across unit types.

Knobs (``prune.options.mag``): scope=group, p=2, allocation=local, imp_normalizer=none.
"""

from __future__ import annotations

import torch
from torch import nn

from ukmp.baselines.llm_pruner import unit_scores
from ukmp.baselines.primitives import read_options
from ukmp.groups import PrunableGroup

DEFAULTS = {"scope": "group", "p": 2, "allocation": "local", "imp_normalizer": "none"}
CHOICES = {"scope": ("group", "out_proj"), "p": (1, 2), "allocation": ("local", "global"),
           "imp_normalizer": ("none", "param")}


def out_proj_norms(weight: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Per unit: Σ over its ``unit_size`` columns of the column L2 norm (fp32)."""
    col = weight.detach().float().norm(dim=0)
    return col.view(-1, unit_size).sum(1)


def output_slice(group: PrunableGroup):
    """The output projection's column slice of a group (the last weight slice with dim 1)."""
    for sl in reversed(group.slices):
        if sl.param == "weight" and sl.dim == 1:
            return sl
    raise ValueError(f"group {group.id!r}: no output-projection slice")


def magnitude_scores(model: nn.Module, groups: list[PrunableGroup], scope: str = "group", p: int = 2,
                     normalizer: str = "none") -> dict[str, torch.Tensor]:
    out = {}
    for g in groups:
        if scope == "out_proj":
            sl = output_slice(g)
            w = model.get_parameter(sl.name)
            out[g.id] = out_proj_norms(w, sl.unit_size)
            if normalizer == "param":
                out[g.id] = out[g.id] / (w.shape[0] * sl.unit_size)
        else:
            sal = {sl.name: model.get_parameter(sl.name).detach().float().abs() ** p
                   for sl in g.slices if sl.param == "weight"}
            out[g.id] = unit_scores(g, sal, "param_first", "mean", normalizer)
        out[g.id] = out[g.id].cpu()
    return out


def score_magnitude_sp(model, groups, batches, pc, n_batches):
    from ukmp.prune.methods import ScoreResult

    opts = read_options(pc.options, "mag", DEFAULTS, CHOICES)
    scores = magnitude_scores(model, groups, opts["scope"], int(opts["p"]), opts["imp_normalizer"])
    return ScoreResult(scores, {"magnitude_sp": scores}, {},
                       {"scope": opts["allocation"], "normalization": "none"})
