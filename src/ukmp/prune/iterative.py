"""Iterative pruning (``prune.iterations: k``): k rounds of score -> remove 1/k of the target -> re-score.

Round ``i`` (1..k) scores the model as rounds 1..i-1 left it and extends their plan until it removes ``i/k`` of the
target, in parameters of the whole model (the last round: the target itself, so the final plan lands as a
one-shot plan does). LLM-Pruner and Minitron prune this way: a unit's importance is measured on the model it will
actually live in, not on the dense one.

**The pruned model of a round is the dense model with the removed units masked to zero**
(:meth:`ukmp.models.base.ModelAdapter.mask`). It computes what the sliced model computes (the project's sliced ≡
masked oracle: a removed head or channel contributes exact zeros), so its scores of the surviving units are those of
the sliced model (``tests/prune/test_iterative.py`` compares them on tiny-llama), and every unit keeps its
**original** index. The plans of the rounds therefore compose by construction: each round's allocation starts from
the previous round's plan (``allocate(..., start=plan)``), whose removed units stay removed, count toward the budget
and the group floors, and take no part in the normalisation; nothing is sliced until the stage applies the final
plan. No index is ever shifted, so none has to be mapped back.

Cost: every round is one full scoring pass at the dense model's size, so k rounds take about k times one-shot's
scoring time (the allocation is cheap). Memory is one-shot's: the masks are in place, restored after each round.

Methods that make their own plan (FLAP, UPop, ECoFLaP-sp, Wanda-sp's default sequential form) are refused: their
plan is not an allocation of scores that a round could extend (``ukmp.config`` refuses the known ones before any
work; a plugin that returns a plan is refused after its first round).

The scores of round 1 are the dense model's, i.e. exactly the one-shot scores; they stay the ranked scores of the
result (what ``scores.safetensors`` stores as ``scores/``), so re-allocating an iterative run's scores file
(``ukmp plan --scores``, ``prune.scores_from``) is a one-shot allocation of them. The later rounds' scores are
stored as parts ``round<i>/<group>``, in original unit indices, NaN for the units removed before that round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ukmp.groups import PrunableGroup
from ukmp.plan import PruningPlan
from ukmp.prune.allocate import AllocationConfig, allocate
from ukmp.prune.methods import ScoreResult

log = logging.getLogger(__name__)


@dataclass
class Rounds:
    """What :func:`prune_in_rounds` returns: round 1's result (its later rounds' scores added as parts), the final
    plan (original unit indices; its ``meta["rounds"]`` lists every round) and the per-round records."""

    result: ScoreResult
    plan: PruningPlan
    records: list[dict[str, Any]]


def round_targets(ratio: float, k: int) -> list[float]:
    """``[ratio * i / k for i in 1..k]``, the last exactly ``ratio`` (``ratio * k / k`` may differ in its last bit)."""
    if k < 1:
        raise ValueError(f"prune.iterations: must be >= 1, got {k}")
    return [ratio * i / k if i < k else ratio for i in range(1, k + 1)]


def _masked_scores(result: ScoreResult, plan: PruningPlan | None, groups: list[PrunableGroup]):
    """``(for the allocator, for the scores file)``: the scores of the units ``plan`` removed replaced by 0 (never
    read: they are not candidates) and by NaN (not scored: removed before this round)."""
    if plan is None:
        return result.scores, result.scores
    clean, stored = {}, {}
    by_id = {g.id: g for g in groups}
    for gid, s in result.scores.items():
        dead = torch.zeros(s.numel(), dtype=torch.bool)
        if gid in plan.keep:
            dead[torch.tensor(plan.removed(by_id[gid]), dtype=torch.long)] = True
        s = s.detach().float().cpu().reshape(-1)
        clean[gid] = torch.where(dead, torch.zeros_like(s), s)
        stored[gid] = torch.where(dead, torch.full_like(s, float("nan")), s)
    return clean, stored


def prune_in_rounds(model: nn.Module, groups: list[PrunableGroup], total: int, k: int, method: str,
                    score: Callable[[], ScoreResult], allocation: Callable[[ScoreResult], AllocationConfig]) -> Rounds:
    """Run ``k`` rounds on ``model`` (left dense: the masks are restored after each round).

    ``groups``: every group of the model (the allocator's; the method scores its own selection); ``total``: the
    parameter count the ratio is of; ``score()``: the method on ``model`` as it stands (masked); ``allocation(r)``:
    the allocation settings for a round's result, at the full target (each round replaces the target by its own).
    Rounds stop early when a plan stops short with every group at its floor (no later round could remove more);
    the stage then judges the shortfall as for a one-shot plan.
    """
    from ukmp.models import adapter_for

    adapter = adapter_for(model)
    plan: PruningPlan | None = None
    first: ScoreResult | None = None
    records: list[dict[str, Any]] = []
    targets = None
    for i in range(1, k + 1):
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)  # every round starts as a fresh model would
        if plan is None:
            result = score()
        else:
            with adapter.mask(model, plan):
                result = score()
        if result.plan is not None:
            raise ValueError(f"prune.iterations: {method} made its own plan; rounds re-allocate with the shared "
                             f"allocator (use prune.iterations=1)")
        t1 = time.perf_counter()
        acfg = allocation(result)
        targets = targets or round_targets(acfg.target_ratio, k)
        clean, stored = _masked_scores(result, plan, groups)
        plan = allocate(clean, groups, total, replace(acfg, target_ratio=targets[i - 1]), start=plan)
        m = plan.meta
        records.append({"round": i, "target_ratio": targets[i - 1], "achieved_ratio": m["achieved_ratio"],
                        "removed_params": m["removed_params"], "removed_units": m["removed_units"],
                        "steps": m["steps"], "reached_target": m["reached_target"], "plan_digest": plan.digest(),
                        "score_seconds": round(t1 - t0, 3), "allocate_seconds": round(time.perf_counter() - t1, 3),
                        "calibration": dict(result.stats)})
        log.info("prune: round %d/%d: %.4f of the parameters removed (target %.4f), scored in %.1f s", i, k,
                 m["achieved_ratio"], targets[i - 1], t1 - t0)
        if first is None:
            first = result
        else:
            first.parts[f"round{i}"] = stored
        if not m["reached_target"] and m.get("floors_hit") and i < k:  # the final target's plan, as one-shot's
            log.warning("prune: round %d stopped short with every group at its floor; no later round can remove "
                        "more", i)
            plan = allocate(clean, groups, total, replace(acfg, target_ratio=targets[-1]), start=plan)
            break
    assert first is not None and plan is not None
    first.stats = {**first.stats, "iterations": k}
    plan.meta.update(iterations=k, rounds=records)
    return Rounds(first, plan, records)
