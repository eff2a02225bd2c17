"""Shared selection primitives of the baselines (docs/BASELINES.md §1.2, §1.4) and small shared helpers.

* :func:`prunable_ratio` — ρ' = ρ·N_total/N_prunable, the unit budget that gives whole-model ratio ρ.
* :func:`uniform_local` — **P1**: every module loses ⌊r·n_m⌋ of its lowest-scoring units (ties: lower index first).
* :func:`weighted_threshold` — **P3**: FLAP's / UPop's weighted-cumsum threshold.
* :func:`water_fill` — **P4**: ECoFLaP's block-budget water-filling with the corrected trimming.
* :func:`read_options` — a method's knobs from ``PruneConfig.options[namespace]`` with defaults; unknown keys fail.
* :func:`lm_loss` — the language-model loss in fp32 (mean CE over the valid target tokens).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ukmp.groups import PrunableGroup
from ukmp.nll import IGNORE_INDEX, token_nll
from ukmp.plan import PruningPlan

# ------------------------------------------------------------------------------------------------ options
def read_options(options: Mapping[str, Any] | None, namespace: str, defaults: Mapping[str, Any],
                 choices: Mapping[str, Sequence[Any]] | None = None) -> dict[str, Any]:
    """``defaults`` updated with ``options[namespace]``; one-line ``ValueError`` for unknown keys or values."""
    given = dict((options or {}).get(namespace) or {})
    for k in given:
        if k not in defaults:
            raise ValueError(f"prune.options.{namespace}: unknown key {k!r} (known: {', '.join(sorted(defaults))})")
    out = {**defaults, **given}
    for k, allowed in (choices or {}).items():
        if out[k] not in allowed:
            raise ValueError(f"prune.options.{namespace}.{k}: {out[k]!r} is not one of {list(allowed)}")
    return out


# ------------------------------------------------------------------------------------------------ ratio
def prunable_ratio(ratio: float, total_params: int, prunable_params: int) -> float:
    """ρ' = ρ · N_total / N_prunable (§1.2); raises when the target cannot be reached with the prunable units."""
    if prunable_params <= 0:
        raise ValueError("prunable_params: no prunable parameters")
    r = float(ratio) * int(total_params) / int(prunable_params)
    if not 0.0 <= r < 1.0:
        raise ValueError(f"prune.ratio: {ratio} needs {r:.4f} of the prunable units (must be < 1)")
    return r


def total_prunable(groups: Sequence[PrunableGroup]) -> int:
    return int(sum(g.total_params for g in groups))


# ------------------------------------------------------------------------------------------------ P1
def _lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` lowest scores, ties broken by lower index first."""
    order = torch.sort(scores.detach().double().cpu(), stable=True).indices
    return sorted(int(i) for i in order[:k])


def uniform_local(scores: Mapping[str, torch.Tensor], groups: Sequence[PrunableGroup],
                  rates: float | Mapping[str, float], rounding: str = "floor") -> PruningPlan:
    """**P1**: each scored group loses ``k = ⌊r·n⌋`` of its lowest-scoring units (at most ``n - 1``).

    ``rates`` is one fraction for every group or a per-group mapping (ECoFLaP's per-block ratios).
    ``rounding="carry"`` **[infer]**: ``k = round(r·n + carry)`` where ``carry`` is the rounding error in parameters
    passed on from the previous groups (head groups first, then channel groups), so the removed parameters match
    ``Σ r·n·N_u`` to within half a channel instead of losing up to one head per module.
    """
    if rounding not in ("floor", "carry"):
        raise ValueError(f"rounding: unknown value {rounding!r} (choose 'floor' or 'carry')")
    scored = [g for g in groups if g.id in scores]
    if rounding == "carry":
        scored = sorted(scored, key=lambda g: g.unit_type != "heads")  # stable: heads first, channels absorb error
    keep: dict[str, list[int]] = {}
    carry = 0.0
    for g in scored:
        r = rates if isinstance(rates, (int, float)) else rates[g.id]
        if not 0.0 <= float(r) <= 1.0:
            raise ValueError(f"rates: group {g.id!r} has ratio {r} outside [0, 1]")
        if rounding == "floor":
            k = math.floor(float(r) * g.n_units + 1e-9)
        else:
            want = float(r) * g.n_units * g.params_per_unit + carry
            k = max(0, min(g.n_units - 1, int(math.floor(want / g.params_per_unit + 0.5))))
            carry = want - k * g.params_per_unit
        k = min(k, g.n_units - 1)
        s = torch.as_tensor(scores[g.id]).reshape(-1)
        if s.numel() != g.n_units:
            raise ValueError(f"scores: group {g.id!r} has {s.numel()} scores for {g.n_units} units")
        gone = set(_lowest(s, k))
        keep[g.id] = [u for u in range(g.n_units) if u not in gone]
    order = {g.id: i for i, g in enumerate(groups)}
    keep = dict(sorted(keep.items(), key=lambda kv: order[kv[0]]))
    return PruningPlan(keep=keep, units={g.id: g.n_units for g in scored}, meta={"allocator": "P1"})


# ------------------------------------------------------------------------------------------------ P3
def weighted_threshold(scores: torch.Tensor, weights: torch.Tensor, fraction: float) -> float:
    """**P3**: sort descending, ``i* = argmin_i |cumsum(w)_i − fraction·Σw|`` (inclusive cumsum, as FLAP/UPop
    write it); return the score at ``i*``.

    FLAP keeps units with score ``>`` threshold (``fraction`` = kept mass 1 − ρ'); UPop prunes units with score ``>``
    threshold (``fraction`` = pruned mass π). Either way the unit at ``i*`` itself falls on the "not selected" side,
    so the selected mass is within ``1.5·max(w)`` of the target (``0.5·max(w)`` when the boundary unit is light).
    """
    s = scores.detach().double().reshape(-1).cpu()
    w = weights.detach().double().reshape(-1).cpu()
    if s.numel() != w.numel() or s.numel() == 0:
        raise ValueError(f"weighted_threshold: {s.numel()} scores and {w.numel()} weights")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"weighted_threshold: fraction {fraction} outside [0, 1]")
    sorted_s, idx = torch.sort(s, descending=True, stable=True)
    csum = torch.cumsum(w[idx], 0)
    i = int(torch.argmin((csum - fraction * w.sum()).abs()))
    return float(sorted_s[i])


def guard_min_one(keep: torch.Tensor, scores: torch.Tensor, module: torch.Tensor, n_modules: int) -> torch.Tensor:
    """Keep each module's best unit when the selection would remove all of them (ties: lower index)."""
    keep = keep.clone()
    for m in range(n_modules):
        members = (module == m).nonzero().flatten()
        if members.numel() and not bool(keep[members].any()):
            best = members[torch.argmax(scores[members])]  # argmax returns the first maximum
            keep[best] = True
    return keep


def balance_kept(keep: torch.Tensor, scores: torch.Tensor, weights: torch.Tensor, module: torch.Tensor,
                 target: float) -> torch.Tensor:
    """Move the kept mass toward ``target`` by toggling marginal units: drop the lowest-scoring kept units (never a
    module's last one) or re-add the highest-scoring dropped ones, each only when it shrinks |kept − target|.
    Used for the min-one guard's charge and **[infer]** the exact-budget correction of P3 on coarse models."""
    keep = keep.clone()
    w = weights.double()
    mass = float(w[keep].sum())
    counts = torch.bincount(module[keep], minlength=int(module.max()) + 1)
    ascending = torch.sort(scores.double(), stable=True).indices.tolist()
    for phase in ("add", "drop") if mass < target else ("drop", "add"):  # a heavy unit may need a light one back
        if phase == "drop":
            for i in ascending:
                if keep[i] and counts[module[i]] > 1 and mass - target >= 0.5 * float(w[i]):
                    keep[i] = False
                    counts[module[i]] -= 1
                    mass -= float(w[i])
        else:
            for i in reversed(ascending):
                if not keep[i] and target - mass >= 0.5 * float(w[i]):
                    keep[i] = True
                    counts[module[i]] += 1
                    mass += float(w[i])
    return keep


# ------------------------------------------------------------------------------------------------ P4
def water_fill(scores: Sequence[float], sizes: Sequence[int], keep_total: int, cap: float) -> list[int]:
    """**P4**: kept parameters κ_g per block (§3.3); blocks keep budget in proportion to their score above the
    floor ``⌈(1 − cap)·N_g⌉``. ``Σ κ_g == keep_total`` exactly (when ``floor ≤ keep_total ≤ Σ N_g``)."""
    n = len(sizes)
    if len(scores) != n or n == 0:
        raise ValueError(f"water_fill: {len(scores)} scores for {n} blocks")
    if not 0.0 <= cap <= 1.0:
        raise ValueError(f"water_fill: cap {cap} outside [0, 1]")
    size = [int(x) for x in sizes]
    S = [max(float(x), 0.0) for x in scores]
    floor = [min(size[g], math.ceil((1.0 - cap) * size[g] - 1e-9)) for g in range(n)]
    if not sum(floor) <= keep_total <= sum(size):
        raise ValueError(f"water_fill: keep_total {keep_total} outside [{sum(floor)}, {sum(size)}] (cap {cap})")
    kappa = list(floor)
    active = [kappa[g] < size[g] for g in range(n)]
    while sum(kappa) < keep_total:
        rem = keep_total - sum(kappa)
        tot = sum(S[g] for g in range(n) if active[g])
        added = 0
        if tot > 0:
            for g in range(n):
                if active[g] and S[g] > 0:
                    add = min(math.ceil(S[g] / tot * rem), size[g] - kappa[g])
                    kappa[g] += add
                    added += add
                    if kappa[g] >= size[g]:
                        active[g], S[g] = False, 0.0
        if added == 0:  # hand what is left to active blocks in index order
            for g in range(n):
                take = min(keep_total - sum(kappa), size[g] - kappa[g])
                kappa[g] += max(take, 0)
            break
    excess = sum(kappa) - keep_total
    for g in sorted(range(n), key=lambda j: (-kappa[j], j)):  # corrected trimming: subtract, largest first
        if excess <= 0:
            break
        take = min(excess, kappa[g] - floor[g])
        kappa[g] -= take
        excess -= take
    return kappa


# ------------------------------------------------------------------------------------------------ helpers
def to_device(batch: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    p = next(model.parameters())
    return {k: (v.to(p.device, p.dtype) if v.is_floating_point() else v.to(p.device)) for k, v in batch.items()}


def lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], per_sample: bool = False) -> torch.Tensor:
    """Teacher-forced CE in fp32 over ``labels != -100``: the batch mean over tokens, or (``per_sample``) the sum
    over samples of each sample's token mean (batch-additive, so one backward equals B batch-1 backwards)."""
    from ukmp.models import forward_batch

    labels = batch["labels"]
    valid = labels != IGNORE_INDEX
    ce = token_nll(forward_batch(model, batch).logits, labels, IGNORE_INDEX)  # classes last, fp32 (ukmp.nll)
    if per_sample:
        return (ce.sum(1) / valid.sum(1).clamp(min=1)).sum()
    return ce.sum() / valid.sum().clamp(min=1)


def block_of(group: PrunableGroup) -> str:
    """ECoFLaP / sequential block id of a group: ``vision.layers.3``, ``text_enc.block.0``, ``text_dec.block.1``."""
    return group.id.rsplit(".", 1)[0]


def plan_meta(plan: PruningPlan, groups: Sequence[PrunableGroup], total_params: int, **extra: Any) -> PruningPlan:
    """Fill the accounting fields every plan carries (achieved whole-model ratio counts removed units only)."""
    removed = plan.removed_params(list(groups))
    plan.meta.update(total_params=int(total_params), removed_params=removed,
                     achieved_ratio=removed / int(total_params), **extra)
    return plan
