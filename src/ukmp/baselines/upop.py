"""UPop: unified progressive pruning with learnable head/channel gates (docs/BASELINES.md §5).

Gates ζ (one per head of every attention module, one per channel of every MLP/FFN) live outside the model and act
through hooks only: forward hooks scale the q/k/v outputs per head (ViT: the fused ``qkv`` output; T5: ``q``, ``k``,
``v``; ``head_gate=output`` instead scales the head's context at the ``projection``/``o`` input), and forward pre-hooks
scale the MLP input of ``fc2``/``wo`` per channel. ζ starts at 1 and is never optimised.

Search: L_t = L_task + w_attn·Σ|ζ_attn| + w_mlp·Σ|ζ_mlp| with the weights trained by AdamW (``weights=full``) or by
hook-based LoRA adapters merged at the end (``weights=lora``, label results "UPop-LoRA"). The ζ-gradients accumulate
over steps (A_u = Σ_τ ∂L_τ/∂ζ_u; ``accumulate=current`` keeps the last step only). Every ``update_every`` steps and
at the last step: π_t = p·√((1 − cos(π(t+1)/T))/2); Â = z-score of A per class (attention, MLP) over all modules;
P3 on [Â_attn, Â_mlp] (descending, weights N_u, pruned mass π_t·W); a unit is kept if Â ≤ threshold or it is its
module's minimum, kept ζ = 1, others ζ = 1 − π_t/p. At t = T−1, π = p so masks are binary at the target budget.

The plan keeps the units with ζ = 1; the model's weights are the search-trained ones. Retraining the compressed model
is the shared recovery stage's job (UPop's own retrain: AdamW, cosine from ``lr`` to 0, as long as the search).

Knobs (``prune.options.upop``): steps=20, update_every=50, lr=1e-5, weight_decay=0.05, w_attn=3.2e-2, w_mlp=1e-3,
weights=full, lora_r=8, lora_alpha=16, head_gate=qkv, accumulate=cumulative, seed=0, prune_qformer=false (the only supported value),
exact_budget=true.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ukmp.baselines.magnitude import output_slice
from ukmp.baselines.primitives import (
    balance_kept, lm_loss, plan_meta, prunable_ratio, read_options, to_device, total_prunable, weighted_threshold)
from ukmp.groups import PrunableGroup
from ukmp.plan import PruningPlan

DEFAULTS = {"steps": 20, "update_every": 50, "lr": 1e-5, "weight_decay": 0.05, "w_attn": 3.2e-2, "w_mlp": 1e-3,
            "weights": "full", "lora_r": 8, "lora_alpha": 16, "head_gate": "qkv", "accumulate": "cumulative",
            "seed": 0, "prune_qformer": False, "exact_budget": True}
CHOICES = {"weights": ("full", "lora"), "head_gate": ("qkv", "output"), "accumulate": ("cumulative", "current"),
           "prune_qformer": (False,), "exact_budget": (True, False)}


# ------------------------------------------------------------------------------------------------ pure parts
def pi_schedule(t: int, total_steps: int, p: float) -> float:
    """π_t = p·√((1 − cos(π(t+1)/T))/2): rises from ≈0 to exactly p at t = T−1."""
    if t >= total_steps - 1:
        return float(p)
    return float(p) * math.sqrt((1.0 - math.cos(math.pi * (t + 1) / total_steps)) / 2.0)


def zscore(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    sd = x.std(unbiased=True) if x.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
    return (x - x.mean()) / (sd if sd > 0 else 1.0)


def select_gates(acc: Mapping[str, torch.Tensor], groups: list[PrunableGroup], pi: float, p: float,
                 exact_budget: bool = True) -> dict:
    """One progressive update: {group id: ζ tensor} with ζ ∈ {1, 1 − π/p} (kept = 1). ``exact_budget`` **[infer]**
    (final update only): marginal units are toggled so the pruned mass lands on p·ΣN_u (``balance_kept``)."""
    attn = [g for g in groups if g.unit_type == "heads"]
    mlp = [g for g in groups if g.unit_type != "heads"]
    parts = {}
    for cls in (attn, mlp):
        if cls:
            z = zscore(torch.cat([acc[g.id].double().reshape(-1) for g in cls]))
            start = 0
            for g in cls:
                parts[g.id] = z[start: start + g.n_units]
                start += g.n_units
    score = torch.cat([parts[g.id] for g in groups])
    weight = torch.cat([torch.full((g.n_units,), float(g.params_per_unit), dtype=torch.float64) for g in groups])
    thr = weighted_threshold(score, weight, pi)
    keep = torch.cat([(parts[g.id] <= thr) | (parts[g.id] == parts[g.id].min()) for g in groups])
    if exact_budget and pi >= p:
        module = torch.cat([torch.full((g.n_units,), i, dtype=torch.long) for i, g in enumerate(groups)])
        keep = balance_kept(keep, -score, weight, module, (1.0 - pi) * float(weight.sum()))
    low = 1.0 - pi / p if p > 0 else 1.0
    out, start = {}, 0
    for g in groups:
        k = keep[start: start + g.n_units]
        out[g.id] = torch.where(k, torch.ones(g.n_units), torch.full((g.n_units,), low)).float()
        start += g.n_units
    return out


# ------------------------------------------------------------------------------------------------ hooks
class Gates:
    """Hooks that apply per-unit gates ζ (tensors, ``requires_grad`` for the search) to a BLIP-2 model."""

    def __init__(self, model: nn.Module, groups: list[PrunableGroup], head_gate: str = "qkv"):
        self.groups = groups
        dev = next(model.parameters()).device
        self.zeta = {g.id: torch.ones(g.n_units, device=dev, requires_grad=True) for g in groups}
        self.handles = []
        for g in groups:
            z = self.zeta[g.id]
            out = output_slice(g)
            if g.unit_type != "heads":
                self._pre(model, out.module, z, out.unit_size)
            elif head_gate == "output":
                self._pre(model, out.module, z, out.unit_size)
            elif g.slices[0].module == g.slices[1].module:  # fused qkv (the BLIP-2 ViT; CLIP's are separate)
                self.handles.append(model.get_submodule(g.slices[0].module).register_forward_hook(
                    self._fused_qkv(z, out.unit_size)))
            else:
                for sl in g.slices[:3]:  # q, k, v rows
                    self.handles.append(model.get_submodule(sl.module).register_forward_hook(
                        self._scale_out(z, sl.unit_size)))

    def _pre(self, model, path, z, size):
        def hook(_m, args):
            x = args[0]
            return (x * z.repeat_interleave(size).to(x.dtype),) + tuple(args[1:])
        self.handles.append(model.get_submodule(path).register_forward_pre_hook(hook))

    @staticmethod
    def _scale_out(z, size):
        def hook(_m, _args, y):
            return y * z.repeat_interleave(size).to(y.dtype)
        return hook

    @staticmethod
    def _fused_qkv(z, size):
        def hook(_m, _args, y):
            return y * z.repeat_interleave(size).repeat(3).to(y.dtype)
        return hook

    def set_(self, values: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for gid, v in values.items():
                self.zeta[gid].copy_(v.to(self.zeta[gid].device))

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class HookLoRA:
    """LoRA through forward hooks: y += (α/r)·x Aᵀ Bᵀ on each target Linear; :meth:`merge_` folds it into W."""

    def __init__(self, model: nn.Module, paths: list[str], r: int, alpha: float, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.scale = alpha / r
        self.mods = {p: model.get_submodule(p) for p in paths}
        self.ab = {}
        self.handles = []
        for p, lin in self.mods.items():
            a = (torch.randn(r, lin.in_features, generator=gen) / math.sqrt(lin.in_features))
            a = a.to(lin.weight.device).requires_grad_(True)
            b = torch.zeros(lin.out_features, r, device=lin.weight.device, requires_grad=True)
            self.ab[p] = (a, b)
            self.handles.append(lin.register_forward_hook(self._hook(a, b)))

    def _hook(self, a, b):
        def hook(_m, args, y):
            x = args[0]
            return y + (x.float() @ a.t() @ b.t() * self.scale).to(y.dtype)
        return hook

    def parameters(self) -> list[torch.Tensor]:
        return [t for ab in self.ab.values() for t in ab]

    def merge_(self) -> None:
        self.close()
        with torch.no_grad():
            for p, (a, b) in self.ab.items():
                w = self.mods[p].weight
                w.add_((b @ a * self.scale).to(w.dtype))

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


# ------------------------------------------------------------------------------------------------ search
def upop_search(model: nn.Module, groups: list[PrunableGroup], batches, p: float, opts: Mapping) -> tuple:
    """Run the search; returns (final ζ per group, accumulated gradients, history of (t, π_t))."""
    from ukmp.models import adapter_for

    steps, every = int(opts["steps"]), int(opts["update_every"])
    if steps < 1 or every < 1:
        raise ValueError("prune.options.upop: steps and update_every must be >= 1")
    torch.manual_seed(int(opts["seed"]))
    flags = {id(q): (q, q.requires_grad) for q in model.parameters()}
    lora = None
    if opts["weights"] == "lora":
        for q in model.parameters():
            q.requires_grad_(False)
        lora = HookLoRA(model, adapter_for(model.config).lora_targets(), int(opts["lora_r"]),
                        float(opts["lora_alpha"]), int(opts["seed"]))
        trainable = lora.parameters()
    else:
        for q in model.parameters():
            q.requires_grad_(True)
        trainable = [q for q in model.parameters()]
    gates = Gates(model, groups, opts["head_gate"])  # after LoRA so the gates also scale the LoRA path
    opt = torch.optim.AdamW(trainable, lr=float(opts["lr"]), weight_decay=float(opts["weight_decay"]))
    acc = {g.id: torch.zeros(g.n_units, dtype=torch.float64) for g in groups}
    attn_ids = {g.id for g in groups if g.unit_type == "heads"}
    history = []
    was_training = model.training
    model.train()
    bar = tqdm(total=steps, desc="UPop search", unit="step", leave=False, dynamic_ncols=True)
    try:
        t, epoch = 0, 0
        while t < steps:
            got = False
            for batch in batches(epoch):
                got = True
                b = to_device(batch, model)
                loss = lm_loss(model, b)
                sp_attn = sum(gates.zeta[i].abs().sum() for i in attn_ids) if attn_ids else 0.0
                sp_mlp = sum(gates.zeta[g.id].abs().sum() for g in groups if g.id not in attn_ids)
                (loss + float(opts["w_attn"]) * sp_attn + float(opts["w_mlp"]) * sp_mlp).backward()
                for g in groups:
                    grad = gates.zeta[g.id].grad
                    step_grad = grad.detach().double().cpu() if grad is not None else 0.0
                    acc[g.id] = acc[g.id] + step_grad if opts["accumulate"] == "cumulative" else step_grad * 1.0
                    gates.zeta[g.id].grad = None
                opt.step()
                opt.zero_grad(set_to_none=True)
                if (t + 1) % every == 0 or t == steps - 1:
                    pi = pi_schedule(t, steps, p)
                    gates.set_(select_gates(acc, groups, pi, p, bool(opts["exact_budget"])))
                    history.append((t, pi))
                t += 1
                bar.update(1)
                if t >= steps:
                    break
            if not got:
                raise ValueError("calibration: UPop needs at least one calibration batch")
            epoch += 1
    finally:
        bar.close()
        gates.close()
        if lora is not None:
            lora.merge_()
        for q, f in flags.values():
            q.requires_grad_(f)
            q.grad = None
        model.train(was_training)
    return {gid: z.detach().cpu() for gid, z in gates.zeta.items()}, acc, history


def score_upop(model, groups, batches, pc, n_batches):
    from ukmp.models import count_parameters
    from ukmp.prune.methods import ScoreResult

    opts = read_options(pc.options, "upop", DEFAULTS, CHOICES)
    total = count_parameters(model)
    p = prunable_ratio(pc.ratio, total, total_prunable(groups))
    zeta, acc, history = upop_search(model, groups, batches, p, opts)
    bad = [gid for gid, z in zeta.items() if not bool(((z == 0) | (z == 1)).all())]
    if bad:
        raise RuntimeError(f"upop: gates of {bad[0]!r} are not binary after the final update")
    plan = PruningPlan(keep={g.id: (zeta[g.id] == 1).nonzero().flatten().tolist() for g in groups},
                       units={g.id: g.n_units for g in groups}, meta={"allocator": "P3 progressive"})
    plan = plan_meta(plan, groups, total, method="upop" + ("-lora" if opts["weights"] == "lora" else ""),
                     unit_ratio=p, search_steps=int(opts["steps"]), updates=[list(h) for h in history])
    scores = {gid: -a.float() for gid, a in acc.items()}  # higher = more important
    return ScoreResult(scores, {"upop_acc_grad": {k: v.float() for k, v in acc.items()}},
                       {"search_steps": int(opts["steps"]), "updates": len(history)}, plan=plan)
