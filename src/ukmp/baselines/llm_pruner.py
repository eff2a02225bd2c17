"""LLM-Pruner, global and local (docs/BASELINES.md), on head/channel units.

Element-wise salience per Linear weight (fp32), with G = (1/N) Σ_n g_n and F = (1/N) Σ_n g_n ⊙ g_n from per-sample
gradients (sample loss = mean CE over its own target tokens):

* ``param_first``  S = W ⊙ G,                 per row/column Σ |S|
* ``param_second`` S = W ⊙ F ⊙ W,             Σ |S|
* ``param_mix``    S = W ⊙ G − ½ W ⊙ F ⊙ W,    Σ |S|
* ``vectorize``    S = W ⊙ G,                 |Σ S|  (sum over the slice's other dim, then abs)

Per hidden dim, the layers of a group (attention: query/key/value rows + output columns; MLP: input rows + output column)
are reduced with ``group_reduction`` (sum by default); a head sums its hd dims. A KV group (grouped-query attention)
counts each parameter channel once: q rows and o columns per query head, its k and v rows once.
``imp_normalizer='param'`` divides by the unit's weight count. Global → the shared P2 allocator without modality normalisation; local → P1.

Knobs (``prune.options.llmp``): taylor=param_first, group_reduction=sum, imp_normalizer=none, skip_edge_layers=false,
local_ratio_mode=whole_model. ``skip_edge_layers`` is a shorthand for ``prune.layers`` (:func:`edge_layer_ranges`);
LLM-Pruner's own setups are named by ``prune.layers``, ``prune.local_rounding: llm_pruner`` and ``prune.budget:
units`` (configs/compare/llm_pruner_*_l4.yaml).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from ukmp.baselines.primitives import read_options, to_device
from ukmp.groups import PrunableGroup
from ukmp.importance.taylor import unit_weight_count
from ukmp.layer_ranges import select_layers, tower_depths

DEFAULTS = {"taylor": "param_first", "group_reduction": "sum", "imp_normalizer": "none",
            "skip_edge_layers": False, "local_ratio_mode": "whole_model"}
CHOICES = {"taylor": ("param_first", "param_second", "param_mix", "vectorize"),
           "group_reduction": ("sum", "mean", "max", "prod", "first"), "imp_normalizer": ("none", "param"),
           "skip_edge_layers": (True, False), "local_ratio_mode": ("whole_model", "per_module_raw")}


# ------------------------------------------------------------------------------------------------ pure math
def salience(weight: torch.Tensor, grad: torch.Tensor | None, fisher: torch.Tensor | None, mode: str) -> torch.Tensor:
    """Signed per-weight salience S (fp32); the reduction decides abs-then-sum or sum-then-abs."""
    w = weight.detach().float()
    if mode in ("param_first", "vectorize"):
        return w * grad.float()
    second = w * fisher.float() * w
    if mode == "param_second":
        return second
    if mode == "param_mix":
        return w * grad.float() - 0.5 * second
    raise ValueError(f"prune.options.llmp.taylor: unknown value {mode!r}")


def line_scores(s: torch.Tensor, dim: int, mode: str) -> torch.Tensor:
    """One value per row (dim 0) or column (dim 1): Σ|S| over the other dim, or |Σ S| for ``vectorize``."""
    if mode == "vectorize":
        return s.sum(dim=1 - dim).abs()
    return s.abs().sum(dim=1 - dim)


def reduce_layers(stack: torch.Tensor, how: str) -> torch.Tensor:
    """[n_layers, dims] -> [dims] across the layers of one group."""
    if how == "sum":
        return stack.sum(0)
    if how == "mean":
        return stack.mean(0)
    if how == "max":
        return stack.amax(0)
    if how == "prod":
        return stack.prod(0)
    raise ValueError(f"prune.options.llmp.group_reduction: unknown value {how!r}")


def unit_scores(group: PrunableGroup, salience_of: Mapping[str, torch.Tensor], mode: str,
                reduction: str = "sum", normalizer: str = "none") -> torch.Tensor:
    """[n_units] for one group from per-weight saliences ``{'<module>.weight': S}`` (bias slices ignored).

    Every parameter channel counts once. A slice wider than the group's narrowest (the q rows and o columns of a KV
    group: ``r`` query heads of ``hd`` dims each, against its one key/value head of ``hd``) is split into heads of
    the narrow width, each an entry of its own: dim ``d`` of a KV group reduces ``2r + 2`` entries (q and o of each
    query head, k and v once) with ``reduction``; the unit sums its dims. ``first`` is the group's first slice alone
    (every query head's q rows). Equal-width groups (heads, channels) reduce one entry per Linear, as before."""
    units = torch.arange(group.n_units)
    per_layer, shapes = [], {}
    for sl in group.slices:
        if sl.param != "weight":
            continue
        s = salience_of[sl.name]
        shapes[sl.name] = s.shape
        line = line_scores(s, sl.dim, mode)
        per_layer.append(line.index_select(0, sl.indices(units).to(line.device)).cpu().view(group.n_units, -1))
    if reduction == "first":
        unit = per_layer[0].sum(1)
    else:
        narrow = min(p.shape[1] for p in per_layer)
        entries = torch.cat([p.view(group.n_units, -1, narrow).transpose(0, 1) for p in per_layer])  # [E, n, hd]
        unit = reduce_layers(entries.reshape(entries.shape[0], -1), reduction).view(group.n_units, -1).sum(1)
    if normalizer == "param":
        unit = unit / unit_weight_count(group, shapes)
    return unit


def edge_layer_skips(n_layers: int) -> set[int]:
    """LLaMA-7B's skip of the first 4 and last 2 of 32 layers, mapped proportionally **[infer]**."""
    first = math.ceil(4 * n_layers / 32 - 1e-9)
    last = math.floor(2 * n_layers / 32 + 1e-9)
    return set(range(first)) | set(range(n_layers - last, n_layers))


def edge_layer_ranges(groups: list[PrunableGroup]) -> dict[str, str]:
    """``skip_edge_layers`` as the ``prune.layers`` it stands for: per tower, the slice between the skipped edges
    (``"4:30"`` on 32 layers, ``"4:29"`` on 30, ``"3:23"`` on 24)."""
    out = {}
    for tower, n in tower_depths(groups).items():
        skip = edge_layer_skips(n)
        kept = [i for i in range(n) if i not in skip]
        out[tower] = f"{kept[0]}:{kept[-1] + 1}" if kept else "0:0"
    return out


def eligible_groups(groups: list[PrunableGroup], skip_edges: bool) -> list[PrunableGroup]:
    return select_layers(groups, edge_layer_ranges(groups), "prune.options.llmp.skip_edge_layers") \
        if skip_edges else list(groups)


# ------------------------------------------------------------------------------------------------ gradients
class GradStats:
    """fp32 Σ g and Σ g⊙g over ``collect()`` calls for a set of parameters; ``count`` samples seen."""

    def __init__(self, params: Mapping[str, nn.Parameter], squares: bool):
        self.params = dict(params)
        self.g = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in self.params.items()}
        self.g2 = ({n: torch.zeros_like(v) for n, v in self.g.items()} if squares else None)
        self.count = 0

    @torch.no_grad()
    def collect(self, n_samples: int = 1) -> None:
        for n, p in self.params.items():
            if p.grad is not None:
                g = p.grad.float()
                self.g[n].add_(g)
                if self.g2 is not None:
                    self.g2[n].add_(g * g)
                p.grad = None
        self.count += n_samples

    def mean_grad(self, name: str) -> torch.Tensor:
        return self.g[name] / max(self.count, 1)

    def fisher(self, name: str) -> torch.Tensor | None:
        return None if self.g2 is None else self.g2[name] / max(self.count, 1)


def gradient_stats(model: nn.Module, groups: list[PrunableGroup], batches, second: bool) -> GradStats:
    """Per-sample gradients of the groups' weights: batched backward of the summed per-sample losses for first order;
    one backward per sample (batch size 1) when squares are needed."""
    from ukmp.baselines.primitives import lm_loss

    names = {s.name for g in groups for s in g.slices if s.param == "weight"}
    params = {n: model.get_parameter(n) for n in sorted(names)}
    flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in {id(q) for q in params.values()})
    stats = GradStats(params, squares=second)
    try:
        for batch in batches:
            b = to_device(batch, model)
            n = b["labels"].shape[0]
            if second:
                for i in range(n):
                    lm_loss(model, {k: v[i:i + 1] for k, v in b.items()}, per_sample=True).backward()
                    stats.collect(1)
            else:
                lm_loss(model, b, per_sample=True).backward()
                stats.collect(n)
    finally:
        for p, f in flags.values():
            p.requires_grad_(f)
            p.grad = None
    if stats.count == 0:
        raise ValueError("calibration: LLM-Pruner needs at least one calibration sample")
    return stats


def llm_pruner_scores(model: nn.Module, groups: list[PrunableGroup], batches, opts: Mapping) -> dict[str, torch.Tensor]:
    mode = opts["taylor"]
    stats = gradient_stats(model, groups, batches, second=mode in ("param_second", "param_mix"))
    out = {}
    for g in groups:
        sal = {}
        for sl in g.slices:
            if sl.param == "weight" and sl.name not in sal:
                sal[sl.name] = salience(stats.params[sl.name], stats.mean_grad(sl.name), stats.fisher(sl.name), mode)
        out[g.id] = unit_scores(g, sal, mode, opts["group_reduction"], opts["imp_normalizer"])
    return out


def _method(scope: str):
    def score(model, groups, batches, pc, n_batches):
        from ukmp.prune.methods import ScoreResult

        opts = read_options(pc.options, "llmp", DEFAULTS, CHOICES)
        chosen = eligible_groups(groups, bool(opts["skip_edge_layers"]))
        scores = llm_pruner_scores(model, chosen, batches(0), opts)
        alloc: dict[str, object] = {"scope": scope, "normalization": "none"}
        if scope == "local":
            alloc["local_ratio_mode"] = opts["local_ratio_mode"]
        return ScoreResult(scores, {"llmp": scores}, {"groups_scored": len(chosen)}, alloc)

    score.__name__ = f"score_llm_pruner_{scope}"
    return score


score_llm_pruner_global = _method("global")
score_llm_pruner_local = _method("local")
