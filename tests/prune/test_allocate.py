"""Allocation (§2.5): ratio granularity, floors, determinism, normalisation variants, local scope, combine."""

from __future__ import annotations

import math
import random

import pytest
import torch
from safetensors.torch import load_file

from ukmp.groups import PrunableGroup
from ukmp.io import atomic_save_tensors
from ukmp.prune.allocate import AllocationConfig, allocate, combine

pytestmark = pytest.mark.unit


def make_groups() -> list[PrunableGroup]:
    return [
        PrunableGroup("vision.layers.0.attn", "vit_heads", "heads", "vision", 0, 16, 1000),
        PrunableGroup("vision.layers.0.mlp", "vit_mlp", "channels", "vision", 0, 200, 30),
        PrunableGroup("text_enc.block.0.attn", "enc_heads", "heads", "language", 0, 32, 800),
        PrunableGroup("text_enc.block.0.ffn", "enc_ffn", "channels", "language", 0, 300, 40),
        PrunableGroup("text_dec.block.0.ffn", "dec_ffn", "channels", "language", 0, 40, 25),
    ]


GROUPS = make_groups()
PRUNABLE = sum(g.total_params for g in GROUPS)
TOTAL = PRUNABLE + 20_000  # the rest of the model (Q-Former, embeddings, ...) counts in the ratio


def make_scores(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {grp.id: torch.rand(grp.n_units, generator=g, dtype=torch.float64).float()
            * (50.0 if grp.modality == "language" else 1.0) for grp in GROUPS}


def remaining(plan, g):
    return len(plan.kept(g))


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("norm", ["mean_iterative", "mean_once", "none", "minmax", "standardize"])
def test_ratio_within_one_step(target, norm):
    cfg = AllocationConfig(target_ratio=target, normalization=norm, units_per_step=40, fine_units_per_step=4)
    plan = allocate(make_scores(), GROUPS, TOTAL, cfg)
    plan.validate(GROUPS)
    m = plan.meta
    achieved = plan.removed_params(GROUPS) / TOTAL
    assert abs(m["achieved_ratio"] - achieved) <= 1e-12 and m["removed_params"] == plan.removed_params(GROUPS)
    assert m["reached_target"] and achieved >= target
    # overshoot is at most the last step's worth of parameters; that step removed at most its k units (no
    # ties)
    assert achieved - target <= m["last_step_removed_params"] / TOTAL + 1e-12
    before = [0.0] + [h[2] for h in m["history"][:-1]]  # ratio when each step started
    assert [h[0] for h in m["history"]] == [4 if (target <= 0.2 or r > 0.9 * target) else 40 for r in before]
    assert all(0 < h[1] <= h[0] for h in m["history"])
    assert m["last_step_removed_params"] <= m["history"][-1][0] * max(g.params_per_unit for g in GROUPS)
    assert m["steps"] == len(m["history"]) >= 2
    assert sum(m["removed_params_by_modality"].values()) == m["removed_params"]
    if target <= 0.2:
        assert all(h[0] == 4 for h in m["history"])  # fine steps from the start
    else:
        assert m["history"][0][0] == 40


def test_floors_hold_with_single_unit_steps():
    cfg = AllocationConfig(target_ratio=0.99, units_per_step=1, fine_units_per_step=1)
    plan = allocate(make_scores(), GROUPS, TOTAL, cfg)
    assert not plan.meta["reached_target"]
    for g in GROUPS:
        # a group leaves the ranking at the first count below 10% of its units (or at 1 unit)
        expected = max(math.ceil(round(0.1 * g.n_units, 9)) - 1, 1)
        assert remaining(plan, g) == expected, (g.id, remaining(plan, g), expected)
    # not vacuous: a looser cap leaves fewer units
    loose = allocate(make_scores(), GROUPS, TOTAL, AllocationConfig(target_ratio=0.99, units_per_step=1,
                                                                    fine_units_per_step=1,
                                                                    max_group_prune_ratio=0.99))
    assert sum(remaining(loose, g) for g in GROUPS) < sum(remaining(plan, g) for g in GROUPS)


def test_min_units_per_group_survives_a_coarse_step():
    scores = make_scores()
    worst = GROUPS[2]  # 32 heads, every one less important than anything else
    scores[worst.id] = torch.linspace(1e-6, 2e-6, worst.n_units)
    cfg = AllocationConfig(target_ratio=0.3, units_per_step=400, fine_units_per_step=400)
    plan = allocate(scores, GROUPS, TOTAL, cfg)
    assert plan.kept(worst) == [worst.n_units - 1]  # the best unit of the group is kept
    two = allocate(scores, GROUPS, TOTAL, AllocationConfig(target_ratio=0.3, units_per_step=400,
                                                           fine_units_per_step=400, min_units_per_group=2))
    assert two.kept(worst) == [worst.n_units - 2, worst.n_units - 1]


def test_same_input_same_plan_and_reallocation_from_saved_scores(tmp_path):
    cfg = AllocationConfig(target_ratio=0.4, units_per_step=30, fine_units_per_step=3)
    scores = make_scores()
    a = allocate(scores, GROUPS, TOTAL, cfg)
    b = allocate({k: v.clone() for k, v in scores.items()}, GROUPS, TOTAL, cfg)
    assert a.keep == b.keep and a.meta == b.meta and a.digest() == b.digest()
    items = list(scores.items())
    random.Random(0).shuffle(items)
    assert allocate(dict(items), GROUPS, TOTAL, cfg).digest() == a.digest()  # dict order is irrelevant
    atomic_save_tensors(tmp_path / "scores.safetensors", scores)
    a.save(tmp_path / "plan.json")
    again = allocate(load_file(str(tmp_path / "scores.safetensors")), GROUPS, TOTAL, cfg)
    assert again.keep == type(a).load(tmp_path / "plan.json").keep
    # not vacuous: other scores give another plan
    assert allocate(make_scores(1), GROUPS, TOTAL, cfg).digest() != a.digest()


def test_ties_are_broken_by_group_order_then_unit_index():
    groups = [PrunableGroup("a", "vit_mlp", "channels", "vision", 0, 6, 1),
              PrunableGroup("b", "vit_mlp", "channels", "vision", 1, 6, 1)]
    scores = {"a": torch.ones(6), "b": torch.ones(6)}
    local = allocate(scores, groups, 12, AllocationConfig(target_ratio=0.5, scope="local"))
    assert local.keep == {"a": [3, 4, 5], "b": [3, 4, 5]}
    # global: all tied units are <= theta; the min-unit guard keeps the last-ranked (highest index) one
    cfg = AllocationConfig(target_ratio=0.9, units_per_step=1, fine_units_per_step=1,
                           max_group_prune_ratio=1.0)
    glob = allocate(scores, groups, 12, cfg)
    assert glob.keep == {"a": [5], "b": [5]}


def test_mean_iterative_differs_from_mean_once_on_crafted_case():
    V = PrunableGroup("v", "vit_mlp", "channels", "vision", 0, 20, 1)
    L = PrunableGroup("l", "enc_ffn", "channels", "language", 0, 20, 1)
    scores = {"v": torch.cat([torch.ones(10), torch.linspace(5, 15, 10)]), "l": torch.linspace(0.5, 2, 20)}

    def run(norm):
        cfg = AllocationConfig(target_ratio=0.5, normalization=norm, units_per_step=10,
                               fine_units_per_step=10, max_group_prune_ratio=0.95)
        return allocate(scores, [V, L], 40, cfg)

    it, once = run("mean_iterative"), run("mean_once")
    # step 1 (both): means 5.5 / 1.25 -> the ten vision 1.0s (1/5.5) go first.
    # step 2, iterative: vision mean is now 10, so 5.0, 6.1, 7.2 (-> 0.5, 0.61, 0.72) undercut language
    # 0.78...
    assert it.removed(V) == list(range(13)) and it.removed(L) == list(range(7))
    # step 2, once: vision keeps mean 5.5, only 5.0 (-> 0.909) enters between language 0.905 and 0.968
    assert once.removed(V) == list(range(11)) and once.removed(L) == list(range(9))
    assert it.meta["steps"] == once.meta["steps"] == 2


def test_local_scope_removes_the_same_fraction_everywhere():
    scores = make_scores()
    cfg = AllocationConfig(target_ratio=0.3, scope="local")
    plan = allocate(scores, GROUPS, TOTAL, cfg)
    r = 0.3 * TOTAL / PRUNABLE
    assert abs(plan.meta["local_unit_ratio"] - r) <= 1e-12
    for g in GROUPS:
        n_rm = math.floor(r * g.n_units)
        lowest = torch.sort(scores[g.id].double(), stable=True).indices[:n_rm].sort().values.tolist()
        assert plan.removed(g) == lowest, g.id
    achieved = plan.meta["achieved_ratio"]
    assert achieved <= 0.3 and 0.3 - achieved <= sum(g.params_per_unit for g in GROUPS) / TOTAL
    raw = allocate(scores, GROUPS, TOTAL, AllocationConfig(target_ratio=0.3, scope="local",
                                                           local_ratio_mode="per_module_raw"))
    assert raw.meta["achieved_ratio"] < achieved  # per-module raw under-shoots the whole-model ratio


def test_combine_product_for_language_only():
    g = torch.Generator().manual_seed(0)
    T = {grp.id: torch.rand(grp.n_units, generator=g) for grp in GROUPS}
    H = {grp.id: torch.rand(grp.n_units, generator=g) + 1.0 for grp in GROUPS if grp.modality == "language"}
    out = combine(T, H, GROUPS)
    for grp in GROUPS:
        expected = T[grp.id] * H[grp.id] if grp.modality == "language" else T[grp.id]
        assert torch.allclose(out[grp.id], expected, rtol=0, atol=0)
    assert not torch.equal(out[GROUPS[2].id], T[GROUPS[2].id])  # not vacuous
    assert all(torch.equal(v, T[k]) for k, v in combine(T, None, GROUPS, mode="taylor_only").items())
    with pytest.raises(ValueError, match="text_enc.block.0.attn"):
        combine(T, {k: v for k, v in H.items() if k != "text_enc.block.0.attn"}, GROUPS)


def test_bad_input_fails_with_the_field_name():
    s = make_scores()
    with pytest.raises(ValueError, match="unknown group 'nope'"):
        allocate({**s, "nope": torch.ones(3)}, GROUPS, TOTAL, AllocationConfig())
    with pytest.raises(ValueError, match="vision.layers.0.attn"):
        allocate({**s, "vision.layers.0.attn": torch.ones(3)}, GROUPS, TOTAL, AllocationConfig())
    bad = dict(s)
    bad["text_dec.block.0.ffn"] = bad["text_dec.block.0.ffn"].clone()
    bad["text_dec.block.0.ffn"][0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        allocate(bad, GROUPS, TOTAL, AllocationConfig())
    with pytest.raises(ValueError, match="total_params"):
        allocate(s, GROUPS, PRUNABLE - 1, AllocationConfig())
    with pytest.raises(ValueError, match="target_ratio"):
        AllocationConfig(target_ratio=1.0)
    with pytest.raises(ValueError, match="normalization"):
        AllocationConfig(normalization="zscore")
    with pytest.raises(ValueError, match="unknown key 'ratio'"):
        AllocationConfig.from_dict({"ratio": 0.5})
    assert AllocationConfig.from_dict({"target_ratio": 0.2}).target_ratio == 0.2


@pytest.mark.integration
def test_tiny_blip2_plan_applies_and_counts_match():
    from ukmp.models.blip2 import Blip2T5Adapter, count_parameters
    from ukmp.models.build import build_tiny

    model, _ = build_tiny(seed=0)
    adapter = Blip2T5Adapter(model.config)
    groups = adapter.groups()
    total = count_parameters(model)
    g = torch.Generator().manual_seed(0)
    scores = {grp.id: torch.rand(grp.n_units, generator=g) for grp in groups}
    cfg = AllocationConfig(target_ratio=0.3, units_per_step=20, fine_units_per_step=2)
    plan = allocate(scores, groups, total, cfg)
    assert plan.meta["reached_target"] and plan.meta["achieved_ratio"] >= 0.3
    adapter.apply_(model, plan)
    assert total - count_parameters(model) == plan.meta["removed_params"]  # params_per_unit is the real cost
    by_mod = plan.meta["removed_params_by_modality"]
    assert by_mod["vision"] > 0 and by_mod["language"] > 0


def heads_groups():
    groups = [PrunableGroup(f"g{i}", "enc_heads", "heads", "language", i, 10, 1000) for i in range(4)]
    scores = {g.id: torch.arange(10, dtype=torch.float32) + 10 * k for k, g in enumerate(groups)}
    return groups, scores


def test_a_coarse_last_step_is_cut_at_the_unit_that_reaches_the_target():
    """One 20-unit step would remove 50 % for a 30 % target (the reference overshoots by the rest of its step;
    ukmp before this change did too): the step stops at the 12th unit, exactly 30 %."""
    groups, scores = heads_groups()
    plan = allocate(scores, groups, 40_000, AllocationConfig(target_ratio=0.3, units_per_step=20,
                                                             fine_units_per_step=20, normalization="none"))
    assert plan.meta["achieved_ratio"] == 0.3 and plan.meta["removed_units"] == 12
    removed = {gid: set(range(10)) - set(k) for gid, k in plan.keep.items()}
    assert removed["g0"] == set(range(9)) and removed["g1"] == {0, 1, 2}  # lowest first, a group keeps one unit
    check = plan.meta["ratio_check"]
    assert check == {"budget": "params", "target": 0.3, "achieved": 0.3, "overshoot": 0.0,
                     "one_unit": 1000 / 40_000, "largest_unit": 1000 / 40_000}


def mixed_groups():
    """Heads of 1000 parameters and channels of 10; the heads rank lowest."""
    groups = [PrunableGroup("h", "enc_heads", "heads", "language", 0, 10, 1000),
              PrunableGroup("c", "enc_ffn", "channels", "language", 0, 200, 10)]
    scores = {"h": torch.arange(10, dtype=torch.float32), "c": 100 + torch.arange(200, dtype=torch.float32)}
    return groups, scores, 20_000


def test_exact_stop_never_overshoots_and_fills_the_gap_with_smaller_units():
    """Target 4,550 of 20,000 parameters: 4 heads (4,000), then the 5th head would overshoot by 450; exact_stop
    skips it and takes 55 channels (550): exactly on target. Without exact_stop the 5th head is taken (+450, within
    that one unit). The old exact_stop took the 5th head too (``removed + step > target`` cut at the crossing)."""
    groups, scores, total = mixed_groups()
    cfg = dict(target_ratio=4550 / total, units_per_step=100, fine_units_per_step=100, normalization="none",
               max_group_prune_ratio=1.0)
    exact = allocate(scores, groups, total, AllocationConfig(**cfg, exact_stop=True))
    assert exact.meta["removed_params"] == 4550 and exact.meta["reached_target"]
    assert exact.keep["h"] == list(range(4, 10)) and exact.keep["c"] == list(range(55, 200))
    cut = allocate(scores, groups, total, AllocationConfig(**cfg))
    assert cut.meta["removed_params"] == 5000 and cut.keep["c"] == list(range(200))
    odd = allocate(scores, groups, total, AllocationConfig(**{**cfg, "target_ratio": 4555 / total}, exact_stop=True))
    assert 4555 - 10 < odd.meta["removed_params"] <= 4555  # below by less than the smallest unit left


@pytest.mark.parametrize("name, ratio", [("tiny-llama", 0.5), ("tiny", 0.3)])
def test_tiny_models_land_within_one_unit_with_the_default_steps(name, ratio):
    """The default steps (1000 units, 100 when fine) on tiny models: before, tiny-llama removed 63 % for 50 % and
    the demo's tiny BLIP-2 70 % for 30 % (one coarse step took everything down to the floors). Now the last step is
    cut: the plan lands within its largest unit of the target."""
    from ukmp.models import adapter_for, count_parameters
    from ukmp.models.build import build_tiny
    from ukmp.prune.budget import overshoot_problem

    model, _ = build_tiny(seed=0, name=name)
    groups, total = adapter_for(model).groups(), count_parameters(model)
    g = torch.Generator().manual_seed(0)
    scores = {grp.id: torch.rand(grp.n_units, generator=g) for grp in groups}
    plan = allocate(scores, groups, total, AllocationConfig(target_ratio=ratio))
    over = plan.meta["achieved_ratio"] - ratio
    assert 0 <= over < max(grp.params_per_unit for grp in groups) / total
    exact = allocate(scores, groups, total, AllocationConfig(target_ratio=ratio, exact_stop=True))
    check = exact.meta["ratio_check"]
    assert -check["one_unit"] <= check["overshoot"] <= 0 and overshoot_problem(check, 0.005) == (None, False)


def test_unit_budget_removes_llm_pruners_count_of_units():
    """budget=units: N - int(N * (1 - r)) of the N scored units, whatever their size (LLM-Pruner's global count):
    210 units of 20,000 parameters at 0.2 -> 42 units."""
    groups, scores, total = mixed_groups()
    scores["h"] = scores["h"] + 150  # heads now rank after channel 49
    plan = allocate(scores, groups, total, AllocationConfig(target_ratio=0.2, budget="units", normalization="none",
                                                            units_per_step=7, fine_units_per_step=7))
    assert plan.meta["removed_units"] == 210 - int(210 * 0.8) == 42 and plan.meta["target_units"] == 42
    assert plan.keep["h"] == list(range(10)) and plan.meta["removed_params"] == 420  # 42 channels
    check = plan.meta["ratio_check"]
    assert check["budget"] == "units" and check["achieved"] == 42 / 210 and check["one_unit"] == 1 / 210
    params = allocate(scores, groups, total, AllocationConfig(target_ratio=0.2, normalization="none"))
    assert params.meta["removed_params"] >= 4000  # the parameter budget removes 20 % of the whole model instead


def smollm2_like():
    """SmolLM2-135M's layer shapes: 3 KV groups (its k rows: 64 per group) and 1,536 MLP channels."""
    from ukmp.groups import ParamSlice

    attn = PrunableGroup("lm.layers.0.attn", "lm_heads", "heads", "language", 0, 3, 294_912,
                         (ParamSlice("q", "weight", 0, 192), ParamSlice("k", "weight", 0, 64),
                          ParamSlice("v", "weight", 0, 64), ParamSlice("o", "weight", 1, 192)))
    mlp = PrunableGroup("lm.layers.0.mlp", "lm_mlp", "channels", "language", 0, 1536, 1728,
                        (ParamSlice("g", "weight", 0, 1), ParamSlice("u", "weight", 0, 1),
                         ParamSlice("d", "weight", 1, 1)))
    return [attn, mlp]


@pytest.mark.parametrize("ratio, heads, channels", [(0.2, 0, 308), (0.4, 1, 615), (0.5, 1, 768)])
def test_llm_pruner_local_rounding(ratio, heads, channels):
    """LLM-Pruner's local rule on its root channels: 1536 - int(1536 * 0.8) = 308 MLP channels at 0.2 (floor: 307);
    a KV group goes only once 192 - int(192 * (1 - r)) reaches 64 k rows: none at 0.2 (39 rows), one at 0.4 (77)."""
    groups = smollm2_like()
    g = torch.Generator().manual_seed(0)
    scores = {grp.id: torch.rand(grp.n_units, generator=g) for grp in groups}
    total = sum(grp.total_params for grp in groups)

    def removed(rounding, budget="params"):
        plan = allocate(scores, groups, total, AllocationConfig(target_ratio=ratio, scope="local", budget=budget,
                                                                local_rounding=rounding,
                                                                local_ratio_mode="per_module_raw"))
        return [len(plan.removed(grp)) for grp in groups]

    assert removed("llm_pruner") == [heads, channels]
    assert removed("llm_pruner", budget="units") == [heads, channels]  # a unit budget is per module when local
    assert removed("floor")[1] == math.floor(ratio * 1536 + 1e-9)
    if ratio == 0.2:
        assert removed("floor") == [0, 307]


def test_overshoot_problem_thresholds():
    from ukmp.prune.budget import overshoot_problem

    check = {"budget": "params", "target": 0.3, "achieved": 0.3, "overshoot": 0.0, "one_unit": 0.001,
             "largest_unit": 0.004}
    assert overshoot_problem(check, 0.005) == (None, False)
    assert overshoot_problem({**check, "achieved": 0.301, "overshoot": 0.001}, 0.005) == (None, False)
    msg, err = overshoot_problem({**check, "achieved": 0.303, "overshoot": 0.003}, 0.005)
    assert not err and msg == ("the plan removes 30.30% of the parameters of the whole model, target 30.00% "
                               "(+0.30 points; one unit is 0.100 points)")
    assert overshoot_problem({**check, "achieved": 0.31, "overshoot": 0.01}, 0.005)[1]
    assert not overshoot_problem({**check, "achieved": 0.31, "overshoot": 0.01}, 0.02)[1]
    # a tiny model: one unit is more than max_overshoot; a plan within its largest unit warns, beyond it fails
    assert not overshoot_problem({**check, "achieved": 0.34, "overshoot": 0.04, "largest_unit": 0.045}, 0.005)[1]
    assert overshoot_problem({**check, "achieved": 0.35, "overshoot": 0.05, "largest_unit": 0.045}, 0.005)[1]
    msg, err = overshoot_problem({**check, "achieved": 0.29, "overshoot": -0.01}, 0.005)
    assert not err and "-1.00 points" in msg  # a shortfall warns, never an error here (check_shortfall's job)
    # a full-size model (BLIP-2 FlanT5-XL at 0.5): units of thousandths of a point are written with digits, not 0.00
    msg, _ = overshoot_problem({**check, "target": 0.5, "achieved": 0.500037, "overshoot": 3.7e-5,
                                "one_unit": 7.1e-7, "largest_unit": 1.3e-4}, 0.005)
    assert "(+0.0037 points; one unit is 7.1e-05 points)" in msg
