"""LLM-Pruner (BASELINES.md §2.8): hand computations, Fisher accumulation, local and global allocation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ukmp.baselines.llm_pruner import (
    GradStats, edge_layer_skips, line_scores, llm_pruner_scores, salience, unit_scores)
from ukmp.groups import ParamSlice, PrunableGroup
from ukmp.prune.allocate import AllocationConfig, allocate

# H=2, hd=2, d=4: q/k/v rows and o columns
TOY = PrunableGroup("text_enc.block.0.attn", "enc_heads", "heads", "language", 0, 2, 32,
                    tuple(ParamSlice(f"a.{n}", "weight", 0, 2) for n in "qkv") + (ParamSlice("a.o", "weight", 1, 2),))


def toy_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"a.{n}.weight": torch.randn(4, 4, generator=g) for n in "qkvo"}


def scores_for(ws, grads, fisher, mode):
    sal = {n: salience(ws[n], grads[n], None if fisher is None else fisher[n], mode) for n in ws}
    return unit_scores(TOY, sal, mode)


def test_param_first_with_unit_gradient_is_l1_of_the_slices():
    ws = toy_weights()
    ones = {n: torch.ones(4, 4) for n in ws}
    got = scores_for(ws, ones, None, "param_first")
    want = sum(ws[f"a.{n}.weight"][0:2].abs().sum() for n in "qkv") + ws["a.o.weight"][:, 0:2].abs().sum()
    assert torch.allclose(got[0], want, rtol=1e-6)
    assert not torch.allclose(got[1], want, rtol=1e-6)  # head 1 owns other weights


def test_vectorize_bounded_by_param_first_with_equality_for_one_sign():
    ws, g = toy_weights(1), toy_weights(2)
    first, vec = scores_for(ws, g, None, "param_first"), scores_for(ws, g, None, "vectorize")
    assert bool((vec <= first + 1e-6).all()) and bool((vec < first - 1e-6).any())
    same = {n: ws[n].abs() for n in ws}
    pos = {n: g[n].abs() for n in g}
    assert torch.allclose(scores_for(same, pos, None, "vectorize"), scores_for(same, pos, None, "param_first"),
                          rtol=1e-6), "all W⊙G of one sign: |Σ| = Σ||"


def test_mix_is_half_second_when_gradient_vanishes():
    ws, f = toy_weights(3), {n: v.abs() for n, v in toy_weights(4).items()}
    zero = {n: torch.zeros(4, 4) for n in ws}
    mix, second = scores_for(ws, zero, f, "param_mix"), scores_for(ws, zero, f, "param_second")
    assert torch.allclose(mix, 0.5 * second, rtol=1e-6) and bool((second > 0).all())


def test_fisher_is_mean_of_squared_per_sample_gradients():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(3, 1, bias=False)
    x, y = torch.randn(10, 3, generator=g), torch.randn(10, generator=g)
    stats = GradStats({"w": lin.weight}, squares=True)
    for n in range(10):
        (0.5 * (lin(x[n]) - y[n]) ** 2).sum().backward()
        stats.collect(1)
    with torch.no_grad():
        r = x @ lin.weight[0] - y
        want = ((r[:, None] ** 2) * x ** 2).mean(0)
    assert torch.allclose(stats.fisher("w")[0], want, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(stats.mean_grad("w")[0] ** 2, want, rtol=1e-2)  # not the squared mean gradient


def test_scaling_the_loss_keeps_the_param_first_ranking():
    ws, g = toy_weights(5), toy_weights(6)
    a = scores_for(ws, g, None, "param_first")
    b = scores_for(ws, {n: 7 * v for n, v in g.items()}, None, "param_first")
    assert torch.equal(torch.argsort(a), torch.argsort(b)) and torch.allclose(b, 7 * a, rtol=1e-5)


def test_line_scores_orders():
    s = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    assert line_scores(s, 0, "param_first").tolist() == [3.0, 7.0]
    assert line_scores(s, 1, "vectorize").tolist() == [4.0, 2.0]


def test_edge_layers_map_llama_rule():
    assert edge_layer_skips(39) == {0, 1, 2, 3, 4, 37, 38}
    assert edge_layer_skips(24) == {0, 1, 2, 23}
    assert edge_layer_skips(32) == {0, 1, 2, 3, 30, 31}


@pytest.fixture(scope="module")
def tiny_scores(base):
    model, _, groups, batches = base
    first = llm_pruner_scores(model, groups, iter(batches), {"taylor": "param_first", "group_reduction": "sum",
                                                             "imp_normalizer": "none"})
    return groups, first


def test_second_order_loop_equals_mean_of_squared_sample_gradients(base):
    from ukmp.baselines.llm_pruner import gradient_stats
    from ukmp.baselines.primitives import lm_loss

    model, _, groups, batches = base
    g = [x for x in groups if x.id == "text_dec.block.1.ffn"]
    stats = gradient_stats(model, g, [batches[0]], second=True)
    name = "language_model.decoder.block.1.layer.2.DenseReluDense.wo.weight"
    p = model.get_parameter(name)
    sq, sm = torch.zeros_like(p), torch.zeros_like(p)
    for i in range(batches[0]["labels"].shape[0]):
        grad, = torch.autograd.grad(lm_loss(model, {k: v[i:i + 1] for k, v in batches[0].items()}), p)
        sq += grad * grad
        sm += grad
    n = batches[0]["labels"].shape[0]
    assert torch.allclose(stats.fisher(name), sq / n, rtol=1e-4, atol=1e-8)
    assert torch.allclose(stats.mean_grad(name), sm / n, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(stats.fisher(name), (sm / n) ** 2, rtol=1e-2)


def test_local_keeps_the_same_heads_per_module(tiny_scores):
    groups, scores = tiny_scores
    total = 328_512
    plan = allocate(scores, groups, total, AllocationConfig(target_ratio=0.4, scope="local", normalization="none"))
    r = 0.4 * total / sum(g.total_params for g in groups)
    for g in groups:
        assert len(plan.kept(g)) == g.n_units - int(r * g.n_units + 1e-9)


def test_global_reaches_target_with_floor(tiny_scores):
    groups, scores = tiny_scores
    total = 328_512
    plan = allocate(scores, groups, total, AllocationConfig(target_ratio=0.4, scope="global", normalization="none",
                                                            units_per_step=1, fine_units_per_step=1))
    assert plan.meta["achieved_ratio"] >= 0.4 and plan.meta["achieved_ratio"] - 0.4 <= 4144 / total
    assert all(len(plan.kept(g)) >= max(1, 0.1 * g.n_units) - 1 for g in groups)
    kinds = {g.unit_type for g in groups if plan.is_pruned(g)}
    assert "channels" in kinds  # raw sums: channels (few weights) go first


@pytest.fixture(scope="module")
def gqa_group():
    """Layer 0's attention of tiny-llama (4 query heads reading 2 KV heads, hd 16) and a random salience per weight."""
    from ukmp.models import adapter_for
    from ukmp.models.build import build_tiny

    model, _ = build_tiny(seed=0, name="tiny-llama")
    group = next(g for g in adapter_for(model).groups() if g.id == "lm.layers.0.attn")
    gen = torch.Generator().manual_seed(7)
    sal = {sl.name: torch.randn(model.get_parameter(sl.name).shape, generator=gen)
           for sl in group.slices if sl.param == "weight"}
    return model.config, group, sal


def hand_kv_scores(config, sal, how):
    """Dim d of KV group g: q rows and o columns of query heads r*g .. r*g+r-1 (HF's grouping), its k and v rows
    once, reduced with ``how``; the unit sums its dims. Plain Python over float64 line sums."""
    a = "model.layers.0.self_attn"
    hd = config.hidden_size // config.num_attention_heads
    r = config.num_attention_heads // config.num_key_value_heads
    q, k, v = (sal[f"{a}.{n}_proj.weight"].double().abs().sum(1).tolist() for n in "qkv")
    o = sal[f"{a}.o_proj.weight"].double().abs().sum(0).tolist()
    reduce = {"sum": sum, "mean": lambda e: sum(e) / len(e), "max": max, "prod": math.prod}[how]
    out = []
    for g in range(config.num_key_value_heads):
        heads = range(r * g, r * g + r)
        out.append(sum(reduce([q[h * hd + d] for h in heads] + [k[g * hd + d], v[g * hd + d]]
                              + [o[h * hd + d] for h in heads]) for d in range(hd)))
    return out


@pytest.mark.parametrize("how", ["sum", "mean", "max", "prod"])
def test_kv_group_counts_each_channel_once(gqa_group, how):
    """Tolerance 1e-5 relative (fp32 line sums against float64). The old scores tiled k and v once per query head
    (2x on this model under sum) and reduced 4 entries per query-head dim: every reduction here fails on them."""
    config, group, sal = gqa_group
    got = unit_scores(group, sal, "param_first", how).double()
    want = torch.tensor(hand_kv_scores(config, sal, how), dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-5, atol=0)
    q_first = sal["model.layers.0.self_attn.q_proj.weight"].abs().sum(1).view(2, -1).sum(1)
    assert torch.allclose(unit_scores(group, sal, "param_first", "first"), q_first, rtol=1e-6)
