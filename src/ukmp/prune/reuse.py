"""Re-using a prune stage: the scores file it writes (``scores.safetensors``: per-unit scores, their parts, the
scored model's config and size, the method's own allocation) and what reads it back without a model or data --
re-allocation at another ratio (:func:`replan`, ``ukmp plan``; :func:`cached_scores`, ``prune.scores_from``) -- and
a plan applied as is (:func:`planned`, ``prune.plan_from`` / ``--plan``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ukmp.config import PruneConfig
from ukmp.groups import PrunableGroup
from ukmp.io import atomic_save_tensors
from ukmp.method_traits import method_traits
from ukmp.models import adapter_for
from ukmp.plan import PruningPlan
from ukmp.prune.allocate import AllocationConfig, allocate
from ukmp.prune.methods import ScoreResult

SCORES_FORMAT = "ukmp.scores"


def save_scores(path: Path, result: ScoreResult, config, total_params: int, acfg: AllocationConfig,
                method: str, drop_layers: dict[str, dict[str, int]] | None = None) -> None:
    """``total_params`` and ``config`` are those of the scored model: after ``drop_layers`` (recorded, so that a
    re-allocation drops them too and counts them in the whole-model ratio)."""
    tensors = {f"scores/{k}": v.float().cpu().clone() for k, v in result.scores.items()}
    for part, d in result.parts.items():
        tensors.update({f"{part}/{k}": v.float().cpu().clone() for k, v in d.items()})
    meta = {"format": SCORES_FORMAT, "version": "1", "method": method, "total_params": str(total_params),
            "allocation": json.dumps(acfg.to_dict()), "model_config": json.dumps(config.to_dict(), default=str),
            "stats": json.dumps(result.stats), "method_allocation": json.dumps(result.allocation, default=str),
            "own_plan": "true" if result.plan is not None else "false",
            "scored_groups": json.dumps(list(result.scores))}  # groups outside prune.layers have no scores
    if drop_layers:
        meta["drop_layers"] = json.dumps(drop_layers)
    atomic_save_tensors(path, tensors, metadata=meta)


def load_scores(path: str | Path):
    """(scores, parts, groups, total_params, allocation dict, metadata) from ``scores.safetensors``."""
    from ukmp.models.build import config_from_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: scores file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != SCORES_FORMAT:
                raise ValueError(f"{path}: metadata 'format' is not {SCORES_FORMAT!r} (not a ukmp scores file)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        config = config_from_dict(json.loads(meta["model_config"]), f"{path}: model_config")
        total, alloc = int(meta["total_params"]), json.loads(meta["allocation"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable scores file ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None
    groups = adapter_for(config).groups()
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        part, gid = k.split("/", 1) if "/" in k else ("?", k)
        parts.setdefault(part, {})[gid] = v
    scores = parts.pop("scores", {})
    scored = set(json.loads(meta["scored_groups"])) if "scored_groups" in meta else {g.id for g in groups}
    missing = [g.id for g in groups if g.id in scored and g.id not in scores]
    if missing:
        raise ValueError(f"{path}: no scores for group {missing[0]!r} ({len(missing)} of {len(scored)} missing)")
    return scores, parts, groups, total, alloc, meta


def allocates_itself(meta: dict[str, str]) -> bool:
    """Whether the scores' method made its plan itself (FLAP's AL-AM with bias compensation, UPop's search,
    ECoFLaP's block sparsities, Wanda-sp's per-module P1): re-allocating its scores would be another method."""
    if "own_plan" in meta:
        return meta["own_plan"] == "true"
    # a scores file written before ``own_plan`` was recorded: the method's declared plan (wanda_sp's floor-rounded
    # variant, whose plan is the allocator's, recorded allocation overrides instead)
    return (method_traits(meta.get("method", "")).plan != "shared"
            and not json.loads(meta.get("method_allocation", "{}")))


def in_layers(scores: dict[str, torch.Tensor], chosen: list[PrunableGroup], pc: PruneConfig):
    """Cached scores restricted to the groups inside ``prune.layers`` (each of which must have one)."""
    if not pc.layers:
        return scores
    missing = [g.id for g in chosen if g.id not in scores]
    if missing:
        raise ValueError(f"prune.scores_from: {pc.scores_from} has no scores for {missing[0]!r} (inside prune.layers)")
    return {g.id: scores[g.id] for g in chosen}


def replan(scores_path: str | Path, ratio: float, **overrides: Any) -> PruningPlan:
    """Re-allocate from cached scores at another ratio (no model, no data). Scores of a method that allocates
    itself are refused: its plan cannot be made again without the model and its calibration pass."""
    scores, _parts, groups, total, alloc, meta = load_scores(scores_path)
    if allocates_itself(meta):
        m = meta.get("method")
        raise ValueError(f"--scores: {scores_path} holds {m} scores, and {m} makes its own plan (not a re-allocation "
                         f"of its scores); run `ukmp prune CONFIG prune.method={m} prune.ratio={ratio}` instead")
    alloc.update({k: v for k, v in overrides.items() if v is not None})
    drop = json.loads(meta.get("drop_layers", "{}"))
    dropped = sum(d["params"] for d in drop.values())  # ``ratio`` is of the whole dense model, dropped layers included
    alloc["target_ratio"] = max(0.0, (ratio * (total + dropped) - dropped) / total) if dropped else ratio
    plan = allocate(scores, groups, total, AllocationConfig.from_dict(alloc))
    plan.drop_layers = drop
    plan.meta["method"] = meta.get("method")
    plan.meta["scores_file"] = str(scores_path)
    plan.meta["model_type"] = json.loads(meta["model_config"]).get("model_type")
    plan.meta["whole_model_ratio"] = ratio  # what --ratio asked for (``target_ratio`` is of the scored model)
    return plan


def cached_scores(path: str | Path, groups: list[PrunableGroup], total: int, method: str | None = None) -> ScoreResult:
    """Scores of an earlier prune stage for the same model structure (re-allocation needs no calibration). When
    they were computed by ``method`` itself, the allocation settings that method imposes (LLM-Pruner's raw sums:
    ``normalization: none``) come back with them, as if it had scored again; a method that makes its own plan
    (:func:`allocates_itself`) is refused its own scores: UKMP's allocator on them would be another method."""
    scores, parts, cached_groups, cached_total, _alloc, meta = load_scores(path)
    if [(g.id, g.n_units) for g in cached_groups] != [(g.id, g.n_units) for g in groups] or cached_total != total:
        raise ValueError(f"prune.scores_from: {path} was computed for a different model structure")
    if method and meta.get("method") == method and allocates_itself(meta):  # as `ukmp plan --scores` refuses them
        raise ValueError(f"prune.scores_from: {path} holds {method} scores, and {method} makes its own plan (not a "
                         f"re-allocation of its scores); drop prune.scores_from to run {method} itself")
    own = json.loads(meta.get("method_allocation", "{}")) if method and meta.get("method") == method else {}
    return ScoreResult(scores, parts, {"scores_from": str(path), "scores_method": meta.get("method")}, own)


def planned(path: str | Path, groups: list[PrunableGroup], total: int | None = None,
            model_type: str | None = None) -> ScoreResult:
    """A plan written by ``ukmp plan`` (or an earlier prune stage), applied as is: no scoring, no allocation. A plan
    recording another model size than ``total`` (the dense model's parameters) is refused."""
    plan = PruningPlan.load(path)
    if plan.out_bias:
        raise ValueError(f"prune.plan_from: {path} adds output biases (FLAP compensation), which only a prune stage "
                         "with its calibration pass can compute")
    plan.validate(groups)
    if total is not None:
        plan.check_model(total, model_type, f"prune.plan_from: {path}")
    return ScoreResult({}, stats={"plan_from": str(path)}, plan=plan)


def plan_ratio(plan: PruningPlan) -> float | None:
    """The whole-model ratio a given plan was made for (None for a plan that records none)."""
    r = plan.meta.get("whole_model_ratio", plan.meta.get("target_ratio"))
    return float(r) if isinstance(r, (int, float)) and not isinstance(r, bool) else None
