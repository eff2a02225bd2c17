"""Physically sliced model == masked (zeroed) model; the masked model differs from the dense one."""

import pytest
import torch

from ukmp.models import adapter_for
from ukmp.models.blip2 import count_parameters
from ukmp.models.build import build_tiny
from ukmp.plan import PruningPlan

from ukmp.testing import make_inputs, random_plan

PLANS = [
    ("random", 1, None),
    ("random", 2, None),
    ("keep_one_head", 3, {"vit_heads": "one", "enc_heads": "one", "dec_self_heads": "one", "dec_cross_heads": "one"}),
    ("keep_all_heads", 4, {"vit_heads": "all", "enc_heads": "all", "dec_self_heads": "all", "dec_cross_heads": "all"}),
    ("keep_one_channel", 5, {"vit_mlp": "one", "enc_ffn": "one", "dec_ffn": "one"}),
]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name, seed, force", PLANS, ids=[p[0] + str(p[1]) for p in PLANS])
def test_sliced_equals_masked(impl, name, seed, force):
    # float64 so that 1e-5 is a statement about structure, not about summation order
    model, _ = build_tiny(seed=seed, attn_implementation=impl)
    model = model.double()
    adapter = adapter_for(model)
    plan = random_plan(adapter.groups(), seed=seed, force=force)
    inputs = make_inputs(model, seed=seed)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    with torch.no_grad():
        dense = model(**inputs).logits
        with adapter.mask(model, plan):
            masked = model(**inputs).logits
        restored = model(**inputs).logits
        adapter.apply_(model, plan)
        sliced = model(**inputs).logits
    tol = 1e-5
    assert torch.equal(restored, dense)  # the mask context restores every weight exactly
    assert (sliced - masked).abs().max().item() <= tol
    assert (masked - dense).abs().max().item() > 1e3 * tol  # not vacuous: pruning changed the output


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_sliced_equals_masked_fp32_and_greedy_tokens(impl):
    model, _ = build_tiny(seed=7, attn_implementation=impl)
    adapter = adapter_for(model)
    plan = random_plan(adapter.groups(), seed=7)
    inputs = make_inputs(model, seed=7)
    gen_inputs = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    # forbid pad and eos so that greedy decoding runs the full length through the decoder cache
    gen = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, suppress_tokens=[0, 1])
    with torch.no_grad():
        dense_tokens = model.generate(**gen_inputs, **gen)
        with adapter.mask(model, plan):
            masked = model(**inputs).logits
            masked_tokens = model.generate(**gen_inputs, **gen)
        adapter.apply_(model, plan)
        sliced = model(**inputs).logits
        sliced_tokens = model.generate(**gen_inputs, **gen)
    scale = masked.abs().max().item()
    assert (sliced - masked).abs().max().item() <= 1e-5 * max(1.0, scale)  # fp32: relative to the logit scale
    assert torch.equal(sliced_tokens, masked_tokens)
    assert sliced_tokens.shape[1] == 9
    assert not torch.equal(dense_tokens, masked_tokens)  # not vacuous: the plan changes what is generated


def test_keep_all_plan_is_bit_identical(tiny):
    model, _ = tiny
    adapter = adapter_for(model)
    groups = adapter.groups()
    inputs = make_inputs(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        dense = model(**inputs).logits
        removed = adapter.apply_(model, PruningPlan.keep_all(groups))
        after = model(**inputs).logits
    assert not removed.slices
    sd = model.state_dict()
    assert before.keys() == sd.keys() and all(torch.equal(before[k], sd[k]) for k in before)
    assert torch.equal(dense, after)


def test_parameter_accounting_and_removed_slices(tiny):
    model, _ = tiny
    adapter = adapter_for(model)
    groups = adapter.groups()
    plan = random_plan(groups, seed=11)
    dense_sd = {k: v.clone() for k, v in model.state_dict().items()}
    n0 = count_parameters(model)
    removed = adapter.apply_(model, plan)
    n1 = count_parameters(model)
    assert n0 - n1 == plan.removed_params(groups) == removed.numel()
    assert n0 - n1 > 0
    # every removed slice + the kept weight reassemble the dense weight exactly
    for path, sl in removed.slices.items():
        dense_w = dense_sd[f"{path}.weight"]
        kept_w = model.get_submodule(path).weight
        rebuilt = torch.empty_like(dense_w)
        rebuilt.index_copy_(sl.dim, sl.kept, kept_w.detach())
        rebuilt.index_copy_(sl.dim, sl.removed, sl.weight)
        assert torch.equal(rebuilt, dense_w), path
        if sl.bias is not None:
            dense_b = dense_sd[f"{path}.bias"]
            assert torch.equal(dense_b[sl.removed], sl.bias)
            assert torch.equal(dense_b[sl.kept], model.get_submodule(path).bias.detach())
    # dependent attributes follow the weights
    for g in groups:
        kept = len(plan.kept(g))
        if g.kind == "vit_heads":
            attn = model.get_submodule(adapter.attention_module(g))
            assert attn.num_heads == kept and attn.qkv.out_features == 3 * kept * attn.head_dim
        elif g.unit_type == "heads":
            attn = model.get_submodule(adapter.attention_module(g))
            assert attn.inner_dim == kept * attn.key_value_proj_dim == attn.q.out_features == attn.o.in_features
    assert adapter.unit_counts(model) == {g.id: len(plan.kept(g)) for g in groups}


def test_pruned_model_trains(tiny):
    """Gradients flow through the sliced modules (needed by recovery)."""
    model, _ = tiny
    adapter = adapter_for(model)
    adapter.apply_(model, random_plan(adapter.groups(), seed=5))
    inputs = make_inputs(model)
    labels = inputs.pop("decoder_input_ids")
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "SelfAttention.q" in n or "self_attn.qkv" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_removed_weights_without_pruning_equals_apply(tiny):
    model, _ = tiny
    adapter = adapter_for(model)
    plan = random_plan(adapter.groups(), seed=21)
    dense_sd = {k: v.clone() for k, v in model.state_dict().items()}
    read = adapter.removed_weights(model, plan)
    assert all(torch.equal(dense_sd[k], v) for k, v in model.state_dict().items())  # untouched
    applied = adapter.apply_(model, plan)
    assert read.slices.keys() == applied.slices.keys() and read.slices
    for k, a in applied.slices.items():
        r = read.slices[k]
        assert r.dim == a.dim and torch.equal(r.kept, a.kept) and torch.equal(r.removed, a.removed)
        assert torch.equal(r.weight, a.weight)
        assert (r.bias is None) == (a.bias is None) and (r.bias is None or torch.equal(r.bias, a.bias))


@pytest.mark.parametrize("switch_to", ["eager", "sdpa"])
def test_switching_attention_after_head_pruning(switch_to):
    """``model.set_attn_implementation`` after pruning keeps the head-aware T5 attention (same logits)."""
    model, _ = build_tiny(seed=3, attn_implementation="sdpa")
    model = model.double()
    adapter = adapter_for(model)
    plan = random_plan(adapter.groups(), seed=3, force={"enc_heads": "one", "dec_self_heads": "one",
                                                         "dec_cross_heads": "one"})
    inputs = make_inputs(model, seed=3)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    adapter.apply_(model, plan)
    with torch.no_grad():
        before = model(**inputs).logits
        model.set_attn_implementation(switch_to)
        after = model(**inputs).logits
    stacks = [model.language_model.encoder, model.language_model.decoder]
    assert all(s.config._attn_implementation == "ukmp_" + switch_to for s in stacks)
    assert (after - before).abs().max().item() <= 1e-8  # float64: same maths, another kernel at most
    with pytest.raises(ValueError, match="flash_attention_2"):
        model.set_attn_implementation("flash_attention_2")
