"""Grouped-query attention: a unit is one KV group, and KV group ``g`` owns query heads ``r*g ... r*g + r - 1``.

transformers repeats each key/value head ``r`` times in place (``repeat_kv``), so query head ``h`` reads KV head
``h // r``. A peer that numbers the group's query heads ``g, g + n_kv, ...`` would prune the wrong query heads; these
tests pin the order on the weights, on transformers' own attention and on the adapter's mask and slices."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ukmp.models import adapter_for
from ukmp.models.build import build_model, build_tiny, config_from_dict, load_config, shipped_config_path
from ukmp.plan import PruningPlan
from ukmp.testing import make_inputs

TOL = 1e-5


def _llama_12_heads(seed: int):
    """A Llama with 4 KV groups of 3 query heads (the strided and the blocked orders differ for every group)."""
    d = json.loads(shipped_config_path("tiny-llama").read_text())
    d.update(hidden_size=96, num_attention_heads=12, num_key_value_heads=4, head_dim=8, num_hidden_layers=2)
    return build_model(config_from_dict(d), seed=seed, attn_implementation="eager")


BUILDERS = {
    "tiny-qwen2": lambda seed: build_tiny(name="tiny-qwen2", seed=seed, attn_implementation="eager")[0],
    "tiny-blip2-llama": lambda seed: build_tiny(name="tiny-blip2-llama", seed=seed, attn_implementation="eager")[0],
    "llama-12h-4kv": _llama_12_heads,
}


def _model(family: str):
    model = BUILDERS[family](2).double()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # random biases (Qwen2 has q/k/v biases, zero-initialised by transformers)
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))
    inputs = make_inputs(model, seed=2)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].double()
    return model, inputs


class _Layer0:
    """Paths of layer 0's attention Linears (read from the adapter's group) and its geometry (from the config)."""

    def __init__(self, model):
        self.adapter = adapter_for(model)
        self.group = next(g for g in self.adapter.groups() if g.id == "lm.layers.0.attn")
        cfg = model.config.get_text_config()
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.r = self.n_heads // self.n_kv
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        q, k, v = (self.group.slices[i].module for i in range(3))
        self.q, self.k, self.v, self.o = q, k, v, self.group.slices[-1].module
        assert len({q, k, v, self.o}) == 4 and self.group.n_units == self.n_kv

    def run(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, the o projection's input as [B, L, heads, head_dim]: every query head's attention output)."""
        seen = []
        h = model.get_submodule(self.o).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
        try:
            with torch.no_grad():
                logits = model(**inputs).logits
        finally:
            h.remove()
        x = seen[0]
        return logits, x.reshape(*x.shape[:-1], -1, self.hd)

    def zero_heads_(self, model, query_heads: list[int], kv_head: int) -> None:
        """Zero by hand the q rows and o columns of ``query_heads`` and the k/v rows (and biases) of ``kv_head``."""
        hd = self.hd
        q_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in query_heads])
        kv_rows = torch.arange(kv_head * hd, (kv_head + 1) * hd)
        with torch.no_grad():
            for path, rows in ((self.q, q_rows), (self.k, kv_rows), (self.v, kv_rows)):
                lin = model.get_submodule(path)
                lin.weight[rows] = 0
                if lin.bias is not None:
                    lin.bias[rows] = 0
            model.get_submodule(self.o).weight[:, q_rows] = 0


FAMILIES = list(BUILDERS)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-blip2-llama", "smollm2-135m", "llama-3-8b"])
def test_kv_group_slices_own_blocked_query_heads(name):
    """On the configs alone (full size included): unit ``g`` owns q rows and o columns ``[g*r*hd, (g+1)*r*hd)`` and
    k/v rows ``[g*hd, (g+1)*hd)``."""
    cfg = load_config(name).get_text_config()
    r, hd = cfg.num_attention_heads // cfg.num_key_value_heads, getattr(cfg, "head_dim", None)
    hd = hd or cfg.hidden_size // cfg.num_attention_heads
    groups = [g for g in adapter_for(load_config(name)).groups() if g.kind == "lm_heads"]
    assert len(groups) == cfg.num_hidden_layers and r > 1  # every one of these is grouped-query attention
    for grp in (groups[0], groups[-1]):
        assert grp.n_units == cfg.num_key_value_heads
        q, k, v, o = grp.slices[0], grp.slices[1], grp.slices[2], grp.slices[-1]
        assert (q.dim, k.dim, v.dim, o.dim) == (0, 0, 0, 1) and q.module.endswith("q_proj")
        for g in range(grp.n_units):
            u = torch.tensor([g])
            assert torch.equal(q.indices(u), torch.arange(g * r * hd, (g + 1) * r * hd))
            assert torch.equal(o.indices(u), torch.arange(g * r * hd, (g + 1) * r * hd))
            assert torch.equal(k.indices(u), torch.arange(g * hd, (g + 1) * hd))
            assert torch.equal(v.indices(u), torch.arange(g * hd, (g + 1) * hd))


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_query_head_h_reads_kv_head_h_div_r(family):
    """The convention itself, without the adapter: zeroing KV head g's value rows silences exactly query heads
    ``r*g ... r*g + r - 1`` of that layer and leaves the others bit-identical."""
    model, inputs = _model(family)
    L = _Layer0(model)
    _, dense = L.run(model, inputs)
    v = model.get_submodule(L.v)
    for g in range(L.n_kv):
        rows = torch.arange(g * L.hd, (g + 1) * L.hd)
        saved_w, saved_b = v.weight.detach().clone(), None if v.bias is None else v.bias.detach().clone()
        with torch.no_grad():
            v.weight[rows] = 0
            if v.bias is not None:
                v.bias[rows] = 0
        _, out = L.run(model, inputs)
        with torch.no_grad():
            v.weight.copy_(saved_w)
            if saved_b is not None:
                v.bias.copy_(saved_b)
        own = list(range(L.r * g, L.r * (g + 1)))
        others = [h for h in range(L.n_heads) if h not in own]
        assert out[:, :, own].abs().max().item() == 0.0
        assert dense[:, :, own].abs().max().item() > 1e3 * TOL  # not vacuous: those heads had an output
        assert torch.equal(out[:, :, others], dense[:, :, others])


@pytest.mark.parametrize("family", FAMILIES)
def test_masking_a_kv_group_is_zeroing_its_query_heads(family):
    """The adapter's mask of KV group g == zeroing by hand the q rows / o columns of query heads ``r*g ... r*g+r-1``
    and the k/v rows of KV head g; only those heads' attention outputs change. The peer's strided order
    (``g, g + n_kv, ...``) gives other logits, so the comparison can tell the two apart."""
    model, inputs = _model(family)
    L = _Layer0(model)
    dense_logits, dense = L.run(model, inputs)
    dense_sd = {k: v.clone() for k, v in model.state_dict().items()}
    for g in range(L.n_kv):
        plan = PruningPlan(keep={L.group.id: [u for u in range(L.n_kv) if u != g]}, units={L.group.id: L.n_kv})
        with L.adapter.mask(model, plan):
            masked_logits, masked = L.run(model, inputs)
            masked_sd = {k: v.clone() for k, v in model.state_dict().items()}
        own = list(range(L.r * g, L.r * (g + 1)))
        others = [h for h in range(L.n_heads) if h not in own]
        assert masked[:, :, own].abs().max().item() == 0.0
        assert torch.equal(masked[:, :, others], dense[:, :, others])
        assert (masked_logits - dense_logits).abs().max().item() > 1e3 * TOL

        L.zero_heads_(model, own, g)
        by_hand_sd = model.state_dict()
        assert all(torch.equal(masked_sd[k], by_hand_sd[k]) for k in masked_sd)  # the very same weights
        by_hand_logits, _ = L.run(model, inputs)
        assert torch.equal(by_hand_logits, masked_logits)
        model.load_state_dict(dense_sd)

        strided = list(range(g, L.n_heads, L.n_kv))
        assert sorted(strided) != own
        L.zero_heads_(model, strided, g)
        wrong_logits, _ = L.run(model, inputs)
        model.load_state_dict(dense_sd)
        assert (wrong_logits - masked_logits).abs().max().item() > 1e3 * TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_slicing_a_kv_group_keeps_the_other_heads_outputs(family):
    """After ``apply_`` removes KV group g, the layer's remaining query heads compute exactly what the dense heads
    outside ``r*g ... r*g+r-1`` computed (same order), and the stock attention still pairs them with their KV head."""
    for g in range(2):
        model, inputs = _model(family)
        L = _Layer0(model)
        _, dense = L.run(model, inputs)
        plan = PruningPlan(keep={L.group.id: [u for u in range(L.n_kv) if u != g]}, units={L.group.id: L.n_kv})
        L.adapter.apply_(model, plan)
        _, sliced = L.run(model, inputs)
        others = [h for h in range(L.n_heads) if not L.r * g <= h < L.r * (g + 1)]
        assert sliced.shape[2] == L.n_heads - L.r
        assert (sliced - dense[:, :, others]).abs().max().item() <= 1e-12
        attn = model.get_submodule(L.adapter.attention_module(L.group))
        assert attn.num_key_value_groups == L.r
