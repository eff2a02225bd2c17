"""P1 / P3 / P4 and the ratio conversion (BASELINES.md §1.2, §1.4, §3.7, §4.8)."""

from __future__ import annotations

import math

import pytest
import torch

from ukmp.baselines.primitives import (
    balance_kept, prunable_ratio, read_options, uniform_local, water_fill, weighted_threshold)
from ukmp.groups import PrunableGroup
from ukmp.prune.allocate import AllocationConfig, allocate

G = [PrunableGroup("vision.layers.0.attn", "vit_heads", "heads", "vision", 0, 16, 495_792),
     PrunableGroup("vision.layers.0.mlp", "vit_mlp", "channels", "vision", 0, 6144, 2_817),
     PrunableGroup("text_enc.block.0.attn", "enc_heads", "heads", "language", 0, 32, 524_288),
     PrunableGroup("text_enc.block.0.ffn", "enc_ffn", "channels", "language", 0, 5120, 6_144)]


def rand_scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {x.id: torch.rand(x.n_units, generator=g) for x in G}


def test_ratio_conversion_matches_spec():
    assert prunable_ratio(0.2, 3_944, 3_702) == pytest.approx(0.2131, abs=1e-4)
    assert prunable_ratio(0.5, 3_944, 3_702) == pytest.approx(0.5327, abs=1e-4)
    with pytest.raises(ValueError, match="prune.ratio"):
        prunable_ratio(0.95, 3_944, 3_702)


def test_p1_worked_example_and_shared_allocator_agree():
    plan = uniform_local(rand_scores(), G, 0.5327)
    removed = {g.id: g.n_units - len(plan.kept(g)) for g in G}
    assert removed == {"vision.layers.0.attn": 8, "vision.layers.0.mlp": 3272, "text_enc.block.0.attn": 17,
                       "text_enc.block.0.ffn": 2727}
    prunable = sum(g.total_params for g in G)
    shared = allocate(rand_scores(), G, prunable, AllocationConfig(target_ratio=0.5327, scope="local",
                                                                     normalization="none"))
    assert shared.keep == plan.keep


def test_p1_ties_lower_index_first_and_lowest_scores_go():
    g = [G[0]]
    plan = uniform_local({g[0].id: torch.zeros(16)}, g, 0.25)
    assert plan.removed(g[0]) == [0, 1, 2, 3]
    s = torch.arange(16.0).flip(0)
    assert uniform_local({g[0].id: s}, g, 0.25).removed(g[0]) == [12, 13, 14, 15]


def test_p1_carry_rounding_hits_parameter_budget():
    r = 0.2131
    plan = uniform_local(rand_scores(), G, r, rounding="carry")
    want = r * sum(g.total_params for g in G)
    got = sum(len(plan.removed(g)) * g.params_per_unit for g in G)
    floor = uniform_local(rand_scores(), G, r)
    got_floor = sum(len(floor.removed(g)) * g.params_per_unit for g in G)
    assert abs(got - want) <= 6_144 / 2, "carry rounding: within half a T5 channel"
    assert abs(got_floor - want) > 6_144, "floor rounding misses by more (the check is not vacuous)"


def test_p3_flap_budget_and_llama_reproduction():
    g = torch.Generator().manual_seed(1)
    heads, chans = 32 * 4, 11008 * 4  # four LLaMA layers: 32 heads and 11008 channels each
    score = torch.randn(heads + chans, generator=g, dtype=torch.float64)
    w = torch.cat([torch.full((heads,), 512 / 3, dtype=torch.float64), torch.ones(chans, dtype=torch.float64)])
    thr = weighted_threshold(score, w, 1 - 0.2)
    s_sorted, idx = torch.sort(score, descending=True)  # FLAP: argmin |cumsum − W·(1 − ratio)| on the sorted list
    ref = s_sorted[torch.argmin(torch.abs(torch.cumsum(w[idx], 0) - w.sum() * (1 - 0.2)))]
    assert thr == float(ref)
    kept = float(w[score > thr].sum())
    assert abs(kept - 0.8 * float(w.sum())) <= 1.5 * 512 / 3, "kept mass within 1.5·max N_u of the target"


def test_p3_upop_weighting_prunes_heads_first():
    w = torch.tensor([100.0] * 4 + [1.0] * 100, dtype=torch.float64)
    a = torch.cat([1.0 + 0.01 * torch.arange(4.0), -1.0 - 0.001 * torch.arange(100.0)]).double()
    for pi in (0.3, 0.5, 0.7, 0.9, 0.96):
        pruned = a > weighted_threshold(a, w, pi)  # UPop prunes the units above the threshold
        mass = float(w[pruned].sum())
        assert abs(mass - pi * 500) <= 1.5 * 100, f"pruned mass {mass} vs π·W {pi * 500}"
        if bool(pruned[4:].any()):
            assert bool(pruned[:4].all()), "a channel is pruned only after every head"
    assert bool((a > weighted_threshold(a, w, 0.96))[4:].any()), "the last case reaches the channels"


def test_balance_kept_moves_to_target_and_keeps_one_per_module():
    keep = torch.ones(6, dtype=torch.bool)
    s = torch.tensor([5.0, 1.0, 2.0, 3.0, 4.0, 0.5])
    w = torch.tensor([10.0, 10.0, 1.0, 1.0, 1.0, 1.0])
    mod = torch.tensor([0, 0, 1, 1, 1, 2])
    out = balance_kept(keep, s, w, mod, 12.0)
    assert float(w[out].sum()) == 12.0 and bool(out[5])  # module 2's last unit stays


def test_p4_budget_cap_uniform_and_proportional():
    sizes = [1_000_000] * 5
    K = int(0.5 * sum(sizes))
    kappa = water_fill([1.0] * 5, sizes, K, cap=0.6)
    assert sum(kappa) == K
    assert all(abs((1 - k / n) - 0.5) <= 5 / n for k, n in zip(kappa, sizes)), "uniform case: s_g = ρ'"
    kappa = water_fill([3.0, 1.0, 1.0, 1.0, 1.0], sizes, K, cap=0.9)
    floor = math.ceil(0.1 * 1_000_000)
    above = [k - floor for k in kappa]
    assert sum(kappa) == K
    assert above[0] == pytest.approx(3 * above[1], rel=1e-5), "3x score -> 3x kept above the floor"
    kappa = water_fill([100.0, 1.0, 1.0, 1.0, 1.0], [1000, 1000, 1000, 1000, 1000], 3000, cap=0.6)
    assert sum(kappa) == 3000 and all(0 <= 1 - k / 1000 <= 0.6 + 1e-12 for k in kappa)
    assert kappa[0] == 1000, "a saturated block keeps everything and leaves the water level"


def test_p4_random_budgets_exact():
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        n = int(torch.randint(2, 30, (1,), generator=g))
        sizes = torch.randint(10, 5000, (n,), generator=g).tolist()
        scores = (torch.rand(n, generator=g) * 10).tolist()
        cap = 0.3 + 0.6 * float(torch.rand(1, generator=g))
        lo = sum(math.ceil((1 - cap) * s - 1e-9) for s in sizes)
        K = int(lo + (sum(sizes) - lo) * float(torch.rand(1, generator=g)))
        kappa = water_fill(scores, sizes, K, cap)
        assert sum(kappa) == K
        assert all(0.0 <= 1 - k / s <= cap + 1e-9 for k, s in zip(kappa, sizes))


def test_read_options_rejects_unknown_keys_and_values():
    assert read_options({"x": {"a": 2}}, "x", {"a": 1, "b": 0}) == {"a": 2, "b": 0}
    with pytest.raises(ValueError, match=r"prune.options.x: unknown key 'c'"):
        read_options({"x": {"c": 2}}, "x", {"a": 1})
    with pytest.raises(ValueError, match=r"prune.options.x.a"):
        read_options({"x": {"a": 3}}, "x", {"a": 1}, {"a": (1, 2)})
