"""Sliced ≡ masked for every registered decoder-only family (BLIP-2 OPT / Llama, plain Llama / OPT / Qwen2, Mistral,
a Llama with q/k/v/o and MLP biases): logits in float64 in eager and sdpa, greedy generation through the KV cache,
keep-all plans, and the save → load round trip. The T5 families are covered in ``tests/core/test_slicing.py``."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from ukmp.io import load_pruned, save_pruned
from ukmp.models import adapter_for, count_parameters
from ukmp.models.build import build_model, build_tiny, config_from_dict, shipped_config_path
from ukmp.plan import PruningPlan
from ukmp.testing import make_inputs, random_plan, randomize_biases_

TOL = 1e-5  # float64: a statement about structure, not about summation order
N_NEW = 6  # generated tokens


def _llama_dict(**over) -> dict:
    d = json.loads(shipped_config_path("tiny-llama").read_text())
    d.update(over)
    return d


def _build_config(d: dict, seed: int, impl: str):
    return build_model(config_from_dict(d), seed=seed, attn_implementation=impl), None


# the shipped tiny builds, plus two configs built here: a Mistral (sliding window shorter than the inputs) and a
# Llama with every optional bias; each maps (seed, impl) -> (model, processor or tokenizer or None)
BUILDERS = {
    name: (lambda seed, impl, name=name: build_tiny(name=name, seed=seed, attn_implementation=impl))
    for name in ("tiny-blip2-opt", "tiny-blip2-llama", "tiny-llama", "tiny-opt", "tiny-qwen2")
}
BUILDERS["mistral"] = lambda seed, impl: _build_config(
    _llama_dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=8,
                num_attention_heads=6, num_key_value_heads=3, head_dim=16, hidden_size=96),
    seed, impl)
BUILDERS["llama-biases"] = lambda seed, impl: _build_config(
    _llama_dict(attention_bias=True, mlp_bias=True), seed, impl)
FAMILIES = list(BUILDERS)
BIASED = {"lm_heads": ("tiny-blip2-opt", "tiny-opt", "tiny-qwen2", "llama-biases"),
          "lm_mlp": ("tiny-blip2-opt", "tiny-opt", "llama-biases")}


def _build(family: str, seed: int, impl: str):
    model, proc = BUILDERS[family](seed, impl)
    model = model.double()
    randomize_biases_(model, seed)
    return model, proc


def _inputs(model, seed: int) -> dict:
    inputs = make_inputs(model, seed=seed)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].double()
    return inputs


def _generation_inputs(inputs: dict, impl: str) -> dict:
    """The same batch, left-padded (row 1's two padded positions moved to the front) as decoder-only generation
    expects. Eager attention in float64 turns a fully masked query row (a left pad) into NaN, dense model
    included (transformers' mask, not ukmp), so eager generation runs unpadded."""
    out = dict(inputs)
    if impl == "eager":
        out["attention_mask"] = torch.ones_like(inputs["attention_mask"])
        return out
    for k in ("input_ids", "attention_mask"):
        t = inputs[k].clone()
        t[1] = t[1].roll(2)
        out[k] = t
    assert out["attention_mask"][1, :2].sum() == 0 and out["attention_mask"][1, 2:].all()
    return out


def _plan(adapter, mode: str, seed: int) -> PruningPlan:
    groups = adapter.groups()
    if mode == "keep_all":
        return PruningPlan.keep_all(groups)
    force = {"lm_heads": "one", "vit_heads": "one"} if mode == "one_kv_group" else None
    plan = random_plan(groups, seed=seed, force=force)
    if mode == "mixed":  # layer 0 keeps only its last KV group, layer 1 keeps all of them
        n = next(g.n_units for g in groups if g.id == "lm.layers.0.attn")
        plan.keep["lm.layers.0.attn"] = [n - 1]
        plan.keep["lm.layers.1.attn"] = list(range(n))
    return plan


GEN = dict(max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, suppress_tokens=[0, 1], use_cache=True,
           return_dict_in_generate=True, output_scores=True)


def _scores(out) -> torch.Tensor:
    """[steps, batch, vocab] next-token scores of a generation, pad/eos (-inf) columns dropped."""
    s = torch.stack(out.scores)
    return s[..., 2:]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("mode", ["random", "mixed", "one_kv_group"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sliced_equals_masked_logits_and_cached_generation(family, mode, impl):
    seed = 1 + FAMILIES.index(family)
    model, _ = _build(family, seed, impl)
    adapter = adapter_for(model)
    groups = adapter.groups()
    plan = _plan(adapter, mode, seed)
    kept = {g.id: len(plan.kept(g)) for g in groups}
    lm_heads = [g for g in groups if g.kind == "lm_heads"]
    lm_mlp = [g for g in groups if g.kind == "lm_mlp"]
    if mode == "one_kv_group":
        assert all(kept[g.id] == 1 for g in lm_heads)
    if mode == "mixed":
        assert kept["lm.layers.0.attn"] == 1 and kept["lm.layers.1.attn"] == lm_heads[1].n_units > 1
    assert len({kept[g.id] for g in lm_mlp}) > 1  # non-uniform across layers
    inputs = _inputs(model, seed)
    gen_inputs = _generation_inputs(inputs, impl)
    with torch.no_grad():
        dense = model(**inputs).logits
        dense_tokens = model.generate(**gen_inputs, **GEN)
        with adapter.mask(model, plan):
            masked = model(**inputs).logits
            masked_tokens = model.generate(**gen_inputs, **GEN)
        restored = model(**inputs).logits
        removed = adapter.apply_(model, plan)
        sliced = model(**inputs).logits
        sliced_tokens = model.generate(**gen_inputs, **GEN)
    assert torch.equal(restored, dense)  # the mask context restores every weight exactly
    assert (sliced - masked).abs().max().item() <= TOL
    assert (masked - dense).abs().max().item() > 1e3 * TOL  # not vacuous: pruning changed the output
    # greedy decoding through the KV cache: the same tokens, and the same scores at every step
    assert torch.equal(sliced_tokens.sequences, masked_tokens.sequences)
    assert sliced_tokens.sequences.shape[1] == gen_inputs["input_ids"].shape[1] + N_NEW  # ran the full length
    assert len(sliced_tokens.scores) == N_NEW
    cache = sliced_tokens.cache  # the decoding really went through a cache of the pruned KV heads
    assert cache.get_seq_length() == gen_inputs["input_ids"].shape[1] + N_NEW - 1
    assert [cache.layers[g.layer].keys.shape[1] for g in lm_heads] == [kept[g.id] for g in lm_heads]
    assert (_scores(sliced_tokens) - _scores(masked_tokens)).abs().max().item() <= TOL
    # not vacuous: the cached steps score differently once the plan is applied (random tiny models often repeat
    # one token, so the token ids alone cannot show it)
    assert (_scores(masked_tokens) - _scores(dense_tokens)).abs().max().item() > 1e3 * TOL
    # the model really shrank, and every dependent attribute followed
    assert removed.numel() == plan.removed_params(groups) > 0
    assert adapter.unit_counts(model) == kept
    for g in lm_heads + lm_mlp:  # every bias the model has is sliced with its rows
        first = g.slices[0].module  # q_proj / the first MLP input Linear
        has_bias = model.get_submodule(first).bias is not None
        assert any(s.module == first and s.param == "bias" for s in g.slices) == has_bias
        assert has_bias or family not in BIASED[g.kind]  # not vacuous: these families do have such biases
    for g in lm_heads:
        attn = model.get_submodule(adapter.attention_module(g))
        r = g.slices[0].unit_size // attn.head_dim  # query heads per unit
        assert model.get_submodule(g.slices[0].module).out_features == kept[g.id] * r * attn.head_dim
        assert model.get_submodule(g.slices[1].module).out_features == kept[g.id] * attn.head_dim
        if hasattr(attn, "num_key_value_groups"):
            assert attn.num_key_value_groups == r  # the stock GQA repeat still pairs heads with their KV head
        if hasattr(attn, "num_heads"):
            assert attn.num_heads == kept[g.id] * r


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_is_bit_identical(family):
    model, _ = _build(family, 3, "sdpa")
    adapter = adapter_for(model)
    plan = _plan(adapter, "keep_all", 3)
    inputs = _inputs(model, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n0 = count_parameters(model)
    with torch.no_grad():
        dense = model(**inputs).logits
        with adapter.mask(model, plan):
            masked = model(**inputs).logits
        removed = adapter.apply_(model, plan)
        after = model(**inputs).logits
    assert not removed.slices and count_parameters(model) == n0
    sd = model.state_dict()
    assert before.keys() == sd.keys() and all(torch.equal(before[k], sd[k]) for k in before)
    assert torch.equal(dense, masked) and torch.equal(dense, after)


def _forbid_pickle(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("pickle used while loading")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, tmp_path, monkeypatch):
    model, proc = _build(family, 5, "sdpa")
    adapter = adapter_for(model)
    plan = _plan(adapter, "mixed", 5)
    adapter.apply_(model, plan)
    inputs = _inputs(model, 5)
    with torch.no_grad():
        ref = model(**inputs).logits
    path = save_pruned(model, plan, tmp_path / "p", processor=proc)
    files = [p.name for p in path.rglob("*") if p.is_file()]
    assert {"ukmp.json", "plan.json", "config.json", "model.safetensors"} <= set(files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))]
    _forbid_pickle(monkeypatch)
    again = load_pruned(path)
    assert type(again) is type(model)
    assert adapter_for(again).unit_counts(again) == {g.id: len(plan.kept(g)) for g in adapter.groups()}
    assert count_parameters(again) == count_parameters(model)
    sd, sd_again = model.state_dict(), again.state_dict()
    assert sd.keys() == sd_again.keys() and all(torch.equal(sd[k], sd_again[k]) for k in sd)  # bit-identical
    with torch.no_grad():
        out = again(**inputs).logits
    # identical up to BLAS kernel choice: the loaded tensors are views into one safetensors buffer, whose
    # alignment can select another summation order (cloned, they give bit-identical logits)
    assert out.dtype == torch.float64 and (out - ref).abs().max().item() <= 1e-12


@pytest.mark.parametrize("family", FAMILIES)
def test_removed_slices_reassemble_the_dense_weights(family):
    """``removed_weights`` (read without pruning) == what ``apply_`` returns, and kept + removed rebuild every dense
    weight and bias exactly (recovery's P tensors); the pruned model still trains."""
    model, _ = _build(family, 7, "sdpa")
    adapter = adapter_for(model)
    groups = adapter.groups()
    plan = _plan(adapter, "random", 7)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    n0 = count_parameters(model)
    read = adapter.removed_weights(model, plan)
    assert all(torch.equal(dense[k], v) for k, v in model.state_dict().items())  # untouched
    removed = adapter.apply_(model, plan)
    assert read.slices.keys() == removed.slices.keys() and removed.slices
    assert count_parameters(model) == n0 - removed.numel() == n0 - plan.removed_params(groups)
    for path, sl in removed.slices.items():
        r = read.slices[path]
        assert torch.equal(r.weight, sl.weight) and torch.equal(r.kept, sl.kept) and torch.equal(r.removed, sl.removed)
        lin = model.get_submodule(path)
        rebuilt = torch.empty_like(dense[f"{path}.weight"])
        rebuilt.index_copy_(sl.dim, sl.kept, lin.weight.detach())
        rebuilt.index_copy_(sl.dim, sl.removed, sl.weight)
        assert torch.equal(rebuilt, dense[f"{path}.weight"]), path
        assert (sl.bias is None) == (r.bias is None) == (sl.dim == 1 or lin.bias is None)
        if sl.bias is not None:
            assert torch.equal(sl.bias, r.bias) and torch.equal(dense[f"{path}.bias"][sl.removed], sl.bias)
            assert torch.equal(dense[f"{path}.bias"][sl.kept], lin.bias.detach())
    inputs = _inputs(model, 7)
    model.train()
    model(**inputs).logits.square().mean().backward()
    lm_linears = [m for g in groups if g.kind in ("lm_heads", "lm_mlp") for m in g.linear_modules()]
    assert all(model.get_submodule(m).weight.grad.abs().sum() > 0 for m in lm_linears)
