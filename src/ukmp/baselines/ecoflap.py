"""ECoFLaP_sp (docs/BASELINES.md §3): zeroth-order block scores -> water-filled block ratios -> Wanda-sp inside blocks.

1. **Coarse.** Blocks are the ViT/T5-encoder/T5-decoder layers; a block's tensors are its Linear weights. Per tensor
   W_l and fixed calibration batch b: z ~ N(0, I) (seeded), ĝ = (L(W_l + εz) − L(W_l − εz)) / 2ε with the model in
   eval mode and the loss reduced in fp32; W_l is restored from a saved copy (bit-identical). s_l = Σ_b |ĝ|,
   S_g = Σ_{l∈g} s_l (``_sum`` aggregate). Alternatives: ``score=first`` (s_l = Σ|w|·mean_b|g_b|, backprop) and
   ``score=taylor_units`` (Σ of the block's LLM-Pruner param_first unit scores).
2. **Allocation (P4).** Kept parameters K = N_prunable − ρ·N_total split over blocks by water-filling with cap
   m = min(ρ' + 0.1, 0.95) (``cap_mode=ukmp``: round(1 − ρ + 0.1, 1), the UKMP port).
3. **Fine.** Each module of block g loses the fraction s_g of its units by P1 on Wanda-sp ``group`` scores gathered
   on the dense model (``local_score=taylor``: LLM-Pruner param_first). **[infer]** ``local_rounding=carry`` (the
   default) passes the rounding error of each module on to the next one so the whole-model ratio lands on target;
   ``floor`` is the literal ⌊s_g·n⌋.

Knobs (``prune.options.ecoflap``): score=zeroth, eps=1e-3, zo_samples=32, num_noise=1, seed=0, cap_mode=corrected,
local_score=wanda_group, local_rounding=carry.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ukmp.baselines.primitives import (
    block_of, lm_loss, plan_meta, prunable_ratio, read_options, to_device, total_prunable, uniform_local, water_fill)
from ukmp.groups import PrunableGroup

DEFAULTS = {"score": "zeroth", "eps": 1e-3, "zo_samples": 32, "num_noise": 1, "seed": 0, "cap_mode": "corrected",
            "local_score": "wanda_group", "local_rounding": "carry"}
CHOICES = {"score": ("zeroth", "first", "taylor_units"), "cap_mode": ("corrected", "ukmp"),
           "local_score": ("wanda_group", "taylor"), "local_rounding": ("carry", "floor")}


# ------------------------------------------------------------------------------------------------ zeroth order
@torch.no_grad()
def zeroth_order_scores(params: Mapping[str, torch.Tensor], loss_fn: Callable[[object], float],
                        batches: Sequence[object], eps: float = 1e-3, seed: int = 0,
                        num_noise: int = 1) -> tuple[dict[str, float], dict[str, float]]:
    """s_l = Σ_b Σ_noise |(L(W+εz) − L(W−εz)) / 2ε| per tensor; every tensor is restored from a saved copy."""
    if eps <= 0:
        raise ValueError(f"prune.options.ecoflap.eps: must be > 0, got {eps}")
    out: dict[str, float] = {}
    min_diff = math.inf
    for t, (name, w) in enumerate(tqdm(params.items(), desc="ECoFLaP zeroth-order", unit="tensor", leave=False,
                                       dynamic_ncols=True)):
        saved = w.detach().clone()
        hi = saved.to(torch.promote_types(w.dtype, torch.float32))  # perturb in ≥ fp32, store in the weight dtype
        total = 0.0
        try:
            for b, batch in enumerate(batches):
                for k in range(num_noise):
                    gen = torch.Generator().manual_seed(seed * 1_000_003 + (t * 4099 + b) * 97 + k)
                    z = torch.randn(w.shape, generator=gen, dtype=torch.float32).to(w.device)
                    w.copy_((hi + eps * z).to(w.dtype))
                    lp = float(loss_fn(batch))
                    w.copy_((hi - eps * z).to(w.dtype))
                    lm = float(loss_fn(batch))
                    w.copy_(saved)
                    min_diff = min(min_diff, abs(lp - lm))
                    total += abs(lp - lm) / (2 * eps)
        finally:
            w.copy_(saved)
        out[name] = total
    return out, {"zo_min_abs_loss_diff": min_diff if math.isfinite(min_diff) else 0.0}


def first_order_scores(model: nn.Module, names: Sequence[str], batches: Sequence[dict]) -> dict[str, float]:
    """s_l = Σ |w| · (1/B) Σ_b |g_b(w)| (GradMagAbs_sum)."""
    params = {n: model.get_parameter(n) for n in names}
    acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
    ids = {id(p) for p in params.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    try:
        for batch in batches:
            lm_loss(model, batch).backward()
            for n, p in params.items():
                if p.grad is not None:
                    acc[n].add_(p.grad.float().abs())
                    p.grad = None
    finally:
        for p, f in flags.values():
            p.requires_grad_(f)
            p.grad = None
    return {n: float((params[n].detach().float().abs() * acc[n] / max(len(batches), 1)).sum()) for n in names}


def block_tensors(groups: Sequence[PrunableGroup]) -> dict[str, list[str]]:
    """Block id -> the ``.weight`` names of its Linears (in group order)."""
    out: dict[str, list[str]] = {}
    for g in groups:
        names = out.setdefault(block_of(g), [])
        for m in g.linear_modules():
            if f"{m}.weight" not in names:
                names.append(f"{m}.weight")
    return out


def sparsity_cap(ratio: float, unit_ratio: float, mode: str) -> float:
    cap = min(unit_ratio + 0.1, 0.95) if mode == "corrected" else round(1.0 - ratio + 0.1, 1)
    if cap < unit_ratio:
        raise ValueError(f"prune.options.ecoflap.cap_mode: cap {cap} is below the unit ratio {unit_ratio:.4f}")
    return cap


def _take_samples(batches, n_samples: int, model: nn.Module) -> list[dict]:
    out, seen = [], 0
    for batch in batches:
        if seen >= n_samples:
            break
        out.append(to_device(batch, model))
        seen += int(batch["labels"].shape[0])
    if not out:
        raise ValueError("calibration: ECoFLaP needs at least one calibration batch")
    return out


def score_ecoflap_sp(model, groups, batches, pc, n_batches):
    from ukmp.baselines.llm_pruner import llm_pruner_scores
    from ukmp.baselines.llm_pruner import DEFAULTS as LLMP
    from ukmp.baselines.stats import collect_input_stats
    from ukmp.baselines.wanda import stat_paths, wanda_scores
    from ukmp.models import count_parameters
    from ukmp.prune.methods import ScoreResult

    opts = read_options(pc.options, "ecoflap", DEFAULTS, CHOICES)
    total, prunable = count_parameters(model), total_prunable(groups)
    rate = prunable_ratio(pc.ratio, total, prunable)
    tensors = block_tensors(groups)
    stats: dict[str, float] = {}
    unit_taylor = None
    if opts["score"] == "taylor_units" or opts["local_score"] == "taylor":
        unit_taylor = llm_pruner_scores(model, groups, batches(0), LLMP)
    if opts["score"] == "zeroth":
        fixed = _take_samples(batches(0), int(opts["zo_samples"]), model)
        was_training = model.training
        model.eval()
        names = [n for ns in tensors.values() for n in ns]
        per_tensor, stats = zeroth_order_scores({n: model.get_parameter(n) for n in names},
                                                lambda b: float(lm_loss(model, b)), fixed, float(opts["eps"]),
                                                int(opts["seed"]), int(opts["num_noise"]))
        model.train(was_training)
        block_score = {blk: sum(per_tensor[n] for n in ns) for blk, ns in tensors.items()}
    elif opts["score"] == "first":
        fixed = _take_samples(batches(0), int(opts["zo_samples"]), model)
        per_tensor = first_order_scores(model, [n for ns in tensors.values() for n in ns], fixed)
        block_score = {blk: sum(per_tensor[n] for n in ns) for blk, ns in tensors.items()}
    else:
        block_score = {blk: 0.0 for blk in tensors}
        for g in groups:
            block_score[block_of(g)] += float(unit_taylor[g.id].sum())
    blocks = list(tensors)
    sizes = [sum(g.total_params for g in groups if block_of(g) == blk) for blk in blocks]
    keep_total = int(round(prunable - pc.ratio * total))
    cap = sparsity_cap(pc.ratio, rate, opts["cap_mode"])
    kappa = water_fill([block_score[b] for b in blocks], sizes, keep_total, cap)
    block_sparsity = {b: 1.0 - k / n for b, k, n in zip(blocks, kappa, sizes)}
    if opts["local_score"] == "wanda_group":
        moments = collect_input_stats(model, stat_paths(groups, "group"), batches(0))
        local = wanda_scores(model, groups, moments, "group")
    else:
        local = unit_taylor
    plan = uniform_local(local, groups, {g.id: block_sparsity[block_of(g)] for g in groups},
                         opts["local_rounding"])
    plan = plan_meta(plan, groups, total, method="ecoflap_sp", allocator="P4 + P1", unit_ratio=rate, cap=cap,
                     block_sparsity=block_sparsity)
    stats.update({f"block_score/{b}": float(block_score[b]) for b in blocks})
    return ScoreResult(local, {"ecoflap_local": local}, stats, plan=plan)
