"""The BLIP-2 (ViT + Q-Former + T5 encoder-decoder) adapter: all architecture knowledge of the project lives here.

Prunable groups are derived from ``model.config`` alone. Group ids::

    vision.layers.{i}.attn          ViT heads   (fused qkv rows of q, k, v thirds + projection columns)
    vision.layers.{i}.mlp           ViT MLP channels (fc1 row + bias, fc2 column)
    text_enc.block.{i}.attn         T5 encoder self-attention heads (q, k, v rows + o columns)
    text_enc.block.{i}.ffn          T5 encoder FFN channels (wi_0, wi_1 rows + wo column)
    text_dec.block.{i}.self_attn    T5 decoder self-attention heads
    text_dec.block.{i}.cross_attn   T5 decoder cross-attention heads
    text_dec.block.{i}.ffn          T5 decoder FFN channels

Never pruned: the Q-Former, query tokens, embeddings, ``language_projection``, layer norms, ``lm_head`` and the
relative-attention-bias tables (which keep every original head column; pruned layers select theirs).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ukmp.groups import ParamSlice, PrunableGroup, groups_by_id
from ukmp.models.attention import (
    KEPT_HEADS,
    HeadPrunedBlip2Attention,
    head_aware_implementation,
    register_attention_functions,
)
from ukmp.plan import PlanError, PruningPlan

VISION = "vision_model.encoder.layers"
T5_ENC = "language_model.encoder.block"
T5_DEC = "language_model.decoder.block"

GROUP_KINDS = ("vit_heads", "vit_mlp", "enc_heads", "enc_ffn", "dec_self_heads", "dec_cross_heads", "dec_ffn")


@dataclass
class RemovedSlice:
    """What :func:`Blip2T5Adapter.apply_` cut out of one Linear: the rows (``dim=0``) or columns (``dim=1``)."""

    module: str
    dim: int
    kept: torch.Tensor  # original indices kept along ``dim`` (sorted)
    removed: torch.Tensor  # original indices removed along ``dim`` (sorted)
    weight: torch.Tensor  # the removed slice of the dense weight (rows: [n_removed, in], cols: [out, n_removed])
    bias: torch.Tensor | None = None  # removed bias entries (rows only)


@dataclass
class RemovedWeights:
    slices: dict[str, RemovedSlice] = field(default_factory=dict)

    def __contains__(self, module: str) -> bool:
        return module in self.slices

    def __getitem__(self, module: str) -> RemovedSlice:
        return self.slices[module]

    def numel(self) -> int:
        return sum(s.weight.numel() + (0 if s.bias is None else s.bias.numel()) for s in self.slices.values())


def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def _guard_attn_switch(model: nn.Module) -> None:
    """Keep head-pruned T5 stacks on the head-aware attention after ``model.set_attn_implementation(...)``.

    transformers would set the plain ``eager``/``sdpa`` name on every sub-config, and the plain functions add the
    full-size position bias to the pruned heads. The instance's method is wrapped: it switches as asked, then maps
    the T5 stacks' names back to ``ukmp_eager``/``ukmp_sdpa`` (other implementations raise, naming the value)."""
    if getattr(model, "_ukmp_attn_guard", False) or not hasattr(model, "set_attn_implementation"):
        return
    original = model.set_attn_implementation
    stacks = [m for n, m in model.named_modules() if n in ("language_model.encoder", "language_model.decoder")]

    def set_attn_implementation(attn_implementation, *args, **kwargs):
        requested = attn_implementation if isinstance(attn_implementation, str) else None
        if requested is not None:
            head_aware_implementation(requested)  # raise before changing anything
        out = original(attn_implementation, *args, **kwargs)
        for stack in stacks:
            stack.config._attn_implementation = head_aware_implementation(stack.config._attn_implementation)
        return out

    model.set_attn_implementation = set_attn_implementation
    model._ukmp_attn_guard = True


class Blip2T5Adapter:
    """Structure of a ``Blip2ForConditionalGeneration`` with an encoder-decoder T5 language model."""

    name = "blip2-t5"

    def __init__(self, config):
        if getattr(config, "use_decoder_only_language_model", False):
            raise ValueError("model config: only T5 (encoder-decoder) language models are supported by blip2-t5")
        self.config = config
        vc, tc = config.vision_config, config.text_config
        self.v_layers = vc.num_hidden_layers
        self.v_width = vc.hidden_size
        self.v_heads = vc.num_attention_heads
        self.v_head_dim = vc.hidden_size // vc.num_attention_heads
        self.v_inter = vc.intermediate_size
        self.v_qkv_bias = bool(vc.qkv_bias)
        self.t_enc_layers = tc.num_layers
        self.t_dec_layers = tc.num_decoder_layers if tc.num_decoder_layers is not None else tc.num_layers
        self.t_width = tc.d_model
        self.t_heads = tc.num_heads
        self.t_dkv = tc.d_kv
        self.t_ff = tc.d_ff
        self.t_gated = bool(getattr(tc, "is_gated_act", False))

    # ------------------------------------------------------------------ group enumeration
    def _vit_groups(self, i: int) -> list[PrunableGroup]:
        p = f"{VISION}.{i}"
        E, hd = self.v_width, self.v_head_dim
        head_slices = [ParamSlice(f"{p}.self_attn.qkv", "weight", 0, hd, off) for off in (0, E, 2 * E)]
        if self.v_qkv_bias:
            head_slices += [ParamSlice(f"{p}.self_attn.qkv", "bias", 0, hd, off) for off in (0, E, 2 * E)]
        head_slices.append(ParamSlice(f"{p}.self_attn.projection", "weight", 1, hd))
        mlp_slices = (
            ParamSlice(f"{p}.mlp.fc1", "weight", 0, 1),
            ParamSlice(f"{p}.mlp.fc1", "bias", 0, 1),
            ParamSlice(f"{p}.mlp.fc2", "weight", 1, 1),
        )
        return [
            PrunableGroup(f"vision.layers.{i}.attn", "vit_heads", "heads", "vision", i, self.v_heads,
                          4 * E * hd + (3 * hd if self.v_qkv_bias else 0), tuple(head_slices)),
            PrunableGroup(f"vision.layers.{i}.mlp", "vit_mlp", "channels", "vision", i, self.v_inter,
                          2 * E + 1, mlp_slices),
        ]

    def _t5_heads(self, gid: str, kind: str, path: str, i: int) -> PrunableGroup:
        d = self.t_dkv
        slices = tuple(ParamSlice(f"{path}.{n}", "weight", 0, d) for n in ("q", "k", "v")) + (
            ParamSlice(f"{path}.o", "weight", 1, d),
        )
        return PrunableGroup(gid, kind, "heads", "language", i, self.t_heads, 4 * self.t_width * d, slices)

    def _t5_ffn(self, gid: str, kind: str, path: str, i: int) -> PrunableGroup:
        ins = ("wi_0", "wi_1") if self.t_gated else ("wi",)
        slices = tuple(ParamSlice(f"{path}.{n}", "weight", 0, 1) for n in ins) + (
            ParamSlice(f"{path}.wo", "weight", 1, 1),
        )
        return PrunableGroup(gid, kind, "channels", "language", i, self.t_ff, (len(ins) + 1) * self.t_width, slices)

    def groups(self) -> list[PrunableGroup]:
        out: list[PrunableGroup] = []
        for i in range(self.v_layers):
            out += self._vit_groups(i)
        for i in range(self.t_enc_layers):
            b = f"{T5_ENC}.{i}.layer"
            out.append(self._t5_heads(f"text_enc.block.{i}.attn", "enc_heads", f"{b}.0.SelfAttention", i))
            out.append(self._t5_ffn(f"text_enc.block.{i}.ffn", "enc_ffn", f"{b}.1.DenseReluDense", i))
        for i in range(self.t_dec_layers):
            b = f"{T5_DEC}.{i}.layer"
            out.append(self._t5_heads(f"text_dec.block.{i}.self_attn", "dec_self_heads", f"{b}.0.SelfAttention", i))
            out.append(self._t5_heads(f"text_dec.block.{i}.cross_attn", "dec_cross_heads", f"{b}.1.EncDecAttention", i))
            out.append(self._t5_ffn(f"text_dec.block.{i}.ffn", "dec_ffn", f"{b}.2.DenseReluDense", i))
        return out

    def lora_targets(self) -> list[str]:
        """Every Linear of the ViT and T5 blocks (the Q-Former and ``language_projection`` stay frozen)."""
        return [m for g in self.groups() for m in g.linear_modules()]

    @staticmethod
    def attention_module(group: PrunableGroup) -> str | None:
        """Path of the attention module that owns a head group (``None`` for channel groups)."""
        if group.unit_type != "heads":
            return None
        return group.slices[-1].module.rsplit(".", 1)[0]

    # ------------------------------------------------------------------ checks
    def _check_dense(self, model: nn.Module, groups: list[PrunableGroup], plan: PruningPlan) -> None:
        for g in groups:
            if g.id not in plan.keep:
                continue
            for s in g.slices:
                t = getattr(_get(model, s.module), s.param)
                expected = s.offset + g.n_units * s.unit_size
                if t is None or t.shape[s.dim] < expected:
                    raise PlanError(
                        f"model: {s.name} has shape {tuple(t.shape) if t is not None else None}; group {g.id!r} "
                        f"expects the dense width (is the model already pruned?)"
                    )

    # ------------------------------------------------------------------ index bookkeeping
    def _param_keep(self, model: nn.Module, groups: list[PrunableGroup], plan: PruningPlan):
        """{(module, param): (dim, kept_idx, removed_idx)} for every parameter touched by a pruned group."""
        out: dict[tuple[str, str], tuple[int, torch.Tensor, torch.Tensor]] = {}
        for g in groups:
            if g.id not in plan.keep or not plan.is_pruned(g):
                continue
            kept_u = torch.tensor(sorted(plan.kept(g)), dtype=torch.long)
            rem_u = torch.tensor(plan.removed(g), dtype=torch.long)
            per_param: dict[tuple[str, str], list] = {}
            for s in g.slices:
                key = (s.module, s.param)
                entry = per_param.setdefault(key, [s.dim, [], []])
                entry[1].append(s.indices(kept_u))
                entry[2].append(s.indices(rem_u))
            for key, (dim, ks, rs) in per_param.items():
                size = getattr(_get(model, key[0]), key[1]).shape[dim]
                rem = torch.cat(rs).sort().values
                keep_mask = torch.ones(size, dtype=torch.bool)
                keep_mask[rem] = False
                out[key] = (dim, keep_mask.nonzero().squeeze(1), rem)
        return out

    # ------------------------------------------------------------------ pruning
    def apply_(self, model: nn.Module, plan: PruningPlan) -> RemovedWeights:
        """Slice every coupled weight and update every dependent attribute; return what was removed.

        Validation happens before anything is touched, so a bad plan leaves the model unchanged. Works on meta
        tensors too (structure only), which is how :func:`ukmp.io.load_pruned` rebuilds a pruned model.
        """
        groups = self.groups()
        plan.validate(groups)
        self._check_dense(model, groups, plan)
        keep = self._param_keep(model, groups, plan)
        self.add_out_biases_(model, plan.out_bias)
        removed = RemovedWeights()
        with torch.no_grad():
            for (mod_path, pname), (dim, kept, rem) in keep.items():
                lin = _get(model, mod_path)
                t = getattr(lin, pname)
                dev_kept, dev_rem = kept.to(t.device), rem.to(t.device)
                entry = removed.slices.get(mod_path)
                if pname == "weight":
                    w_rem = t.index_select(dim, dev_rem).detach().clone()
                    if entry is None:
                        removed.slices[mod_path] = RemovedSlice(mod_path, dim, kept, rem, w_rem)
                    else:
                        entry.weight = w_rem
                    if dim == 0:
                        lin.out_features = len(kept)
                    else:
                        lin.in_features = len(kept)
                else:
                    b_rem = t.index_select(0, dev_rem).detach().clone()
                    if entry is None:
                        removed.slices[mod_path] = RemovedSlice(mod_path, dim, kept, rem, torch.empty(0), b_rem)
                    else:
                        entry.bias = b_rem
                new = nn.Parameter(t.index_select(dim, dev_kept).clone(), requires_grad=t.requires_grad)
                setattr(lin, pname, new)
        register_attention_functions()
        for g in groups:
            if g.id in plan.keep and plan.is_pruned(g) and g.unit_type == "heads":
                self._update_attention_(model, g, sorted(plan.kept(g)))
        return removed

    @staticmethod
    def add_out_biases_(model: nn.Module, modules: list[str]) -> None:
        """Give each named output projection a zero bias if it has none (T5 ``o``/``wo`` for FLAP compensation)."""
        for path in modules:
            lin = _get(model, path)
            if lin.bias is None:
                w = lin.weight
                dev = w.device
                lin.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=dev),
                                        requires_grad=w.requires_grad)

    def removed_weights(self, model: nn.Module, plan: PruningPlan) -> RemovedWeights:
        """What :meth:`apply_` would return, read from a dense model without changing it (recovery's P tensors)."""
        groups = self.groups()
        plan.validate(groups)
        self._check_dense(model, groups, plan)
        removed = RemovedWeights()
        with torch.no_grad():
            for (mod_path, pname), (dim, kept, rem) in self._param_keep(model, groups, plan).items():
                t = getattr(_get(model, mod_path), pname)
                part = t.index_select(dim if pname == "weight" else 0, rem.to(t.device)).detach().clone()
                entry = removed.slices.setdefault(mod_path, RemovedSlice(mod_path, dim, kept, rem, torch.empty(0)))
                if pname == "weight":
                    entry.weight = part
                else:
                    entry.bias = part
        return removed

    def _update_attention_(self, model: nn.Module, g: PrunableGroup, kept: list[int]) -> None:
        path = self.attention_module(g)
        attn = _get(model, path)
        if g.kind == "vit_heads":
            new = HeadPrunedBlip2Attention(attn.config, num_heads=len(kept), head_dim=self.v_head_dim)
            new.qkv, new.projection = attn.qkv, attn.projection
            new.train(attn.training)
            parent, child = path.rsplit(".", 1)
            setattr(_get(model, parent), child, new)
            return
        attn.inner_dim = len(kept) * self.t_dkv
        device = attn.q.weight.device if attn.q.weight.device.type != "meta" else "cpu"
        attn.register_buffer(KEPT_HEADS, torch.tensor(kept, dtype=torch.long, device=device), persistent=False)
        stack = _get(model, "language_model.decoder" if path.startswith(T5_DEC) else "language_model.encoder")
        impl = head_aware_implementation(stack.config._attn_implementation)
        stack.config._attn_implementation = impl
        _guard_attn_switch(model)  # keep it head-aware through model.set_attn_implementation (idempotent)

    # ------------------------------------------------------------------ masking oracle
    @contextlib.contextmanager
    def mask(self, model: nn.Module, plan: PruningPlan) -> Iterator[nn.Module]:
        """Zero (without slicing) every weight that :meth:`apply_` would remove; restore on exit."""
        groups = self.groups()
        plan.validate(groups)
        keep = self._param_keep(model, groups, plan)
        saved = []
        with torch.no_grad():
            for (mod_path, pname), (dim, _kept, rem) in keep.items():
                t = getattr(_get(model, mod_path), pname)
                idx = rem.to(t.device)
                saved.append((t, dim, idx, t.index_select(dim, idx).clone()))
                t.index_fill_(dim, idx, 0.0)
        try:
            yield model
        finally:
            with torch.no_grad():
                for t, dim, idx, vals in saved:
                    t.index_copy_(dim, idx, vals)

    # ------------------------------------------------------------------ accounting
    def unit_counts(self, model: nn.Module) -> dict[str, int]:
        """Current number of units per group, read from the (possibly pruned) weights."""
        out = {}
        for g in self.groups():
            s = g.slices[-1]  # o / projection / wo / fc2 column slice: exactly n_units * unit_size wide
            out[g.id] = getattr(_get(model, s.module), s.param).shape[s.dim] // s.unit_size
        return out


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied tensors counted once), meta tensors included."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() already de-duplicates shared Parameter objects
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def modality_of_param(name: str) -> str:
    if name.startswith("vision_model"):
        return "vision"
    if name.startswith("language_model"):
        return "language"
    return "bridge"


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    out = {"vision": 0, "language": 0, "bridge": 0}
    seen: set[int] = set()
    for n, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        out[modality_of_param(n)] += p.numel()
    return out

