"""Iterative pruning (``prune.iterations``) and parameter-cost-aware ranking (``prune.rank_by``), issue 28 item 2.

On tiny-llama (3 layers; per layer 2 KV groups of 6,144 parameters and 128 MLP channels of 192; 135,616 in all):

* one round is the one-shot plan (same digest), and round 1 of k scores exactly the one-shot scores;
* magnitude scores do not change when other units are removed, so two rounds of it must give the one-shot plan:
  that proves the rounds compose in the original unit indices;
* two rounds of UKMP re-score (the kept units' scores move) and give another plan, landing on the ratio; the
  masked model a round scores gives the scores of the sliced model;
* a scores file of an iterative run re-allocates as one-shot; the options fail in one line where they cannot apply;
* ``rank_by: per_param`` on hand-built scores removes the KV group worth more per unit but less per parameter, where
  the default removes MLP channels; both land on the ratio.
"""

from __future__ import annotations

import json
from dataclasses import replace
from importlib import resources

import pytest
import torch
from safetensors.torch import load_file

from ukmp.config import ConfigError, load_config
from ukmp.prune.allocate import AllocationConfig, allocate

RATIO = 0.3
ONE_UNIT = 192 / 135616  # tiny-llama's smallest unit, as a fraction of the model


def config(root, sample_data, *extra):
    demo = str(resources.files("ukmp") / "configs" / "demo.yaml")
    return load_config([demo], [f"output_dir={root}", "model.source=tiny-llama", "model.device=cpu",
                                f"data.calibration={sample_data['text']}", "prune.num_samples=4",
                                "prune.batch_size=4", f"prune.ratio={RATIO}", *extra])


def run(root, sample_data, name, *extra):
    from ukmp.prune.stage import run_prune_stage

    out = root / name
    out.mkdir(parents=True)
    run_prune_stage(config(root, sample_data, *extra), out)
    return {"dir": out, "summary": json.loads((out / "summary.json").read_text()),
            "plan": json.loads((out / "plan.json").read_text()),
            "scores": load_file(str(out / "scores.safetensors"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_data):
    root = tmp_path_factory.mktemp("iterative")
    return {name: run(root, sample_data, name, *extra) for name, extra in [
        ("ukmp", []), ("ukmp_k2", ["prune.iterations=2"]), ("mag", ["prune.method=magnitude"]),
        ("mag_k2", ["prune.method=magnitude", "prune.iterations=2"]), ("ukmp_pp", ["prune.rank_by=per_param"])]}


def removed(plan: dict, gid: str, n: int) -> set[int]:
    return set(range(n)) - set(plan["keep"][gid])


def n_units(gid: str) -> int:
    return 2 if gid.endswith("attn") else 128


def lands_on_target(summary: dict, target: float = RATIO) -> None:
    check = summary["ratio_check"]  # cut at the unit that reaches the target: over by less than its largest unit
    assert check["target"] == target and 0 <= check["overshoot"] < check["largest_unit"], check


# ------------------------------------------------------------------------------------------------ iterations
def test_one_round_is_the_one_shot_plan(runs, tmp_path, sample_data):
    """prune_in_rounds with k = 1 on the stage's inputs gives the one-shot stage's plan digest; round 1 of the
    two-round run scored exactly the one-shot scores (torch.equal) and allocated what a one-shot allocation of
    them at half the ratio gives."""
    from ukmp.layer_ranges import select_layers
    from ukmp.models import adapter_for, count_parameters
    from ukmp.prune.iterative import prune_in_rounds
    from ukmp.prune.reuse import replan
    from ukmp.prune.scoring import get_method
    from ukmp.prune.stage import allocation_config, calibration_batches
    from ukmp.runtime import load_dense

    cfg = config(tmp_path, sample_data)
    model, processor = load_dense(cfg.model, torch.device("cpu"))
    groups = adapter_for(model).groups()
    chosen = select_layers(groups, cfg.prune.layers)
    batches, n_batches, _ = calibration_batches(cfg, processor, model)
    method = get_method("ukmp")
    rounds = prune_in_rounds(model, groups, count_parameters(model), 1, "ukmp",
                             lambda: method(model, chosen, batches, cfg.prune, n_batches),
                             lambda r: allocation_config(cfg.prune, r.allocation))
    assert rounds.plan.digest() == runs["ukmp"]["summary"]["plan_digest"]
    assert [r["round"] for r in rounds.records] == [1]

    one, two = runs["ukmp"]["scores"], runs["ukmp_k2"]["scores"]
    assert all(torch.equal(one[k], two[k]) for k in one) and set(one) < set(two)
    first = runs["ukmp_k2"]["summary"]["allocation_meta"]["rounds"][0]
    assert replan(runs["ukmp_k2"]["dir"] / "scores.safetensors", RATIO / 2).digest() == first["plan_digest"]


def test_two_rounds_of_magnitude_compose_to_the_one_shot_plan(runs):
    """A unit's magnitude does not depend on the other units, so removing half the target, re-scoring and removing
    the rest must give exactly the one-shot plan (any index shift between rounds would break it). Round 2's stored
    scores equal round 1's on the units it kept (exactly) and are NaN on the ones round 1 removed."""
    one, two = runs["mag"], runs["mag_k2"]
    assert two["summary"]["plan_digest"] == one["summary"]["plan_digest"]
    rounds = two["summary"]["allocation_meta"]["rounds"]
    assert [r["target_ratio"] for r in rounds] == [RATIO / 2, RATIO]
    assert RATIO / 2 <= rounds[0]["achieved_ratio"] < RATIO / 2 + 6144 / 135616 < rounds[1]["achieved_ratio"]
    s = two["scores"]
    gone = {k.split("/", 1)[1]: torch.isnan(v) for k, v in s.items() if k.startswith("round2/")}
    assert sum(int(m.sum()) for m in gone.values()) > 10  # round 1 removed units (not vacuous)
    for gid, nan in gone.items():
        assert torch.equal(s[f"round2/{gid}"][~nan], s[f"scores/{gid}"][~nan])
    lands_on_target(two["summary"])


def test_two_rounds_of_ukmp_rescore_and_land_on_the_ratio(runs):
    """Round 2 scores the model round 1 pruned: the kept units' scores move (by more than 1e-3 relative for some),
    the plan differs from one-shot, it extends round 1's plan (everything round 1 removed stays removed) and lands
    on the target within one unit, as one-shot does."""
    from ukmp.prune.reuse import replan

    k2 = runs["ukmp_k2"]
    assert k2["summary"]["plan_digest"] != runs["ukmp"]["summary"]["plan_digest"]
    lands_on_target(k2["summary"])
    lands_on_target(runs["ukmp"]["summary"])
    first = replan(k2["dir"] / "scores.safetensors", RATIO / 2)
    s = k2["scores"]
    moved = 0.0
    for gid in first.keep:
        gone = removed({"keep": first.keep}, gid, n_units(gid))
        assert gone <= removed(k2["plan"], gid, n_units(gid))
        nan = torch.isnan(s[f"round2/{gid}"])
        assert set(nan.nonzero().flatten().tolist()) == gone
        a, b = s[f"round2/{gid}"][~nan], s[f"scores/{gid}"][~nan]
        moved = max(moved, float(((a - b).abs() / b.abs().clamp(min=1e-12)).max()))
    assert moved > 1e-3
    assert k2["plan"]["meta"]["iterations"] == 2 and len(k2["summary"]["allocation_meta"]["rounds"]) == 2


def test_a_round_scores_what_the_sliced_model_scores(runs, tmp_path, sample_data):
    """The masked model of round 2 and the model sliced by round 1's plan give the same UKMP scores for the kept
    units (tolerance 1e-5 relative: the same sums in another order, 2e-7 seen; they moved by > 1e-3 from round 1)."""
    from ukmp.models import adapter_for
    from ukmp.prune.reuse import replan
    from ukmp.prune.scoring import get_method
    from ukmp.prune.stage import calibration_batches
    from ukmp.runtime import load_dense

    cfg = config(tmp_path, sample_data)
    model, processor = load_dense(cfg.model, torch.device("cpu"))
    adapter = adapter_for(model)
    first = replan(runs["ukmp_k2"]["dir"] / "scores.safetensors", RATIO / 2)
    groups = adapter.groups()
    adapter.apply_(model, first)
    # tiny-llama's q, k, v are separate Linears (every slice at offset 0): the sliced groups are the dense ones
    # with fewer units
    sliced = [replace(g, n_units=len(first.kept(g))) for g in groups]
    batches, n_batches, _ = calibration_batches(cfg, processor, model)
    result = get_method("ukmp")(model, sliced, batches, cfg.prune, n_batches)
    s = runs["ukmp_k2"]["scores"]
    for g in groups:
        kept = torch.tensor(first.kept(g))
        torch.testing.assert_close(result.scores[g.id], s[f"round2/{g.id}"][kept], rtol=1e-5, atol=0)


def test_scores_of_an_iterative_run_reallocate_as_one_shot(runs, tmp_path, sample_data):
    """prune.scores_from an iterative run's file: its ranked scores are round 1's, so the plan is one-shot's."""
    again = run(tmp_path, sample_data, "again", f"prune.scores_from={runs['ukmp_k2']['dir'] / 'scores.safetensors'}")
    assert again["summary"]["plan_digest"] == runs["ukmp"]["summary"]["plan_digest"]


@pytest.mark.parametrize("extra, message", [
    (["prune.iterations=0"], r"^prune\.iterations: must be an integer >= 1, got 0$"),
    (["prune.iterations=2", "prune.method=flap"], r"^prune\.iterations: 2 rounds, but flap makes its own plan;"),
    (["prune.iterations=2", "prune.method=wanda_sp"], r"^prune\.iterations: 2 rounds, but wanda_sp makes its own"),
    (["prune.iterations=3", "prune.scores_from=x.safetensors"], r"^prune\.iterations: 3 rounds, but prune\.scores_"),
    (["prune.iterations=2", "prune.plan_from=plan.json"], r"^prune\.iterations: 2 rounds, but prune\.plan_from"),
    (["prune.rank_by=size"], r"^prune\.rank_by: 'size' is not one of importance, per_param$"),
    (["prune.rank_by=per_param", "prune.scope=local"], r"^prune\.rank_by: must be 'importance' with scope=local"),
])
def test_options_that_cannot_apply_fail_at_load_in_one_line(extra, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, extra)
    assert "\n" not in str(e.value)


def test_a_method_with_its_own_plan_is_refused_by_the_stage(tmp_path, sample_data):
    """Past the config check: a plugin (here FLAP, allowed through as if unknown to it) that returns a plan."""
    import ukmp.config as config_module
    from ukmp.method_traits import MethodTraits
    from ukmp.prune.stage import run_prune_stage

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config_module, "method_traits", lambda name: MethodTraits())
        cfg = config(tmp_path, sample_data, "prune.method=flap", "prune.iterations=2")
    (tmp_path / "f").mkdir()
    with pytest.raises(ValueError, match=r"^prune\.iterations: flap made its own plan; rounds re-allocate"):
        run_prune_stage(cfg, tmp_path / "f")
    cfg = config(tmp_path, sample_data, "prune.method=flap", "prune.rank_by=per_param")
    with pytest.raises(ValueError, match=r"^prune\.rank_by: 'per_param' ranks in the shared allocator; flap"):
        run_prune_stage(cfg, tmp_path / "f")
    assert not list((tmp_path / "f").iterdir())


# ------------------------------------------------------------------------------------------------ rank_by
def test_per_param_removes_the_unit_worth_least_per_parameter():
    """Hand-built scores: KV group 0 of layer 1 (6,144 parameters) scores 2, forty MLP channels of layer 1 (192
    each) score 1, everything else 10. Per unit the channels are worth less, per parameter the KV group
    (2 / 6144 < 1 / 192). At a target of one KV group's parameters the default removes 32 channels and the KV group
    stays; per_param removes the KV group and no channel. Both land exactly on the target (6144 = 32 x 192)."""
    from ukmp.models import adapter_for
    from ukmp.models.build import load_config as model_config

    groups = adapter_for(model_config("tiny-llama")).groups()
    scores = {g.id: torch.full((g.n_units,), 10.0) for g in groups}
    scores["lm.layers.1.attn"][0] = 2.0
    scores["lm.layers.1.mlp"][:40] = 1.0
    total = 135616
    plans = {r: allocate(scores, groups, total, AllocationConfig(target_ratio=6144 / total, rank_by=r))
             for r in ("importance", "per_param")}
    default, per_param = plans["importance"], plans["per_param"]
    assert default.keep["lm.layers.1.attn"] == [0, 1] and default.keep["lm.layers.1.mlp"] == list(range(32, 128))
    assert per_param.keep["lm.layers.1.attn"] == [1] and per_param.keep["lm.layers.1.mlp"] == list(range(128))
    for p in plans.values():
        assert p.meta["removed_params"] == 6144 and p.meta["ratio_check"]["overshoot"] == 0.0
        assert sum(len(k) for k in p.keep.values()) < sum(g.n_units for g in groups)
    assert default.meta["config"]["rank_by"] == "importance" and per_param.meta["config"]["rank_by"] == "per_param"


def test_per_param_through_the_stage_and_ukmp_plan(runs, tmp_path, capsys):
    """The stage's per_param plan differs from the default on the same scores and lands on the ratio; `ukmp plan
    --rank-by per_param` on the default run's scores makes the same plan; compare's allocation column names both
    options."""
    from ukmp.cli import main
    from ukmp.compare import allocation_label

    pp, base = runs["ukmp_pp"]["summary"], runs["ukmp"]["summary"]
    assert pp["allocation"]["rank_by"] == "per_param" and base["allocation"]["rank_by"] == "importance"
    assert pp["plan_digest"] != base["plan_digest"]
    lands_on_target(pp)
    scores = runs["ukmp"]["dir"] / "scores.safetensors"
    assert main(["plan", "--scores", str(scores), "--ratio", str(RATIO), "--rank-by", "per_param",
                 "--out", str(tmp_path / "pp.json")]) == 0
    assert json.loads(capsys.readouterr().out)["digest"] == pp["plan_digest"]
    assert allocation_label(pp) == "global, params budget, cut at target, ranked per param"
    assert allocation_label(runs["ukmp_k2"]["summary"]) == "global, params budget, cut at target, 2 rounds"
    assert allocation_label(base) == "global, params budget, cut at target"


def test_per_param_refuses_what_it_cannot_rank():
    with pytest.raises(ValueError, match=r"^allocation\.rank_by: 'per_param' ranks across groups .*; scope=local"):
        AllocationConfig(rank_by="per_param", scope="local")
    with pytest.raises(ValueError, match=r"^allocation\.rank_by: .*; normalization=standardize makes scores neg"):
        AllocationConfig(rank_by="per_param", normalization="standardize")
    with pytest.raises(ValueError, match=r"^allocation\.rank_by: 'per_param' needs non-negative normalised scores"):
        from ukmp.groups import PrunableGroup

        gs = [PrunableGroup("lm.layers.0.mlp", "lm_mlp", "channels", "language", 0, 4, 10)]
        allocate({"lm.layers.0.mlp": torch.tensor([1.0, -1.0, 2.0, 3.0])}, gs, 40,
                 AllocationConfig(target_ratio=0.25, rank_by="per_param", normalization="none"))


def test_new_fields_keep_the_stage_hashes_of_existing_runs():
    """At their defaults, iterations and rank_by stay out of the prune stage's hash (finished stages stay valid)."""
    from ukmp.config import PruneConfig, hashed_section

    d = hashed_section("prune", PruneConfig())
    assert "iterations" not in d and "rank_by" not in d
    assert hashed_section("prune", PruneConfig(iterations=2))["iterations"] == 2


def test_compare_shares_no_scores_between_iterative_runs(tmp_path):
    """ukmp compare lets llm_pruner_local re-allocate llm_pruner_global's scores, except with prune.iterations > 1
    (each round re-scores: prune.scores_from is refused there)."""
    from ukmp.compare import shared_scores

    methods = ("llm_pruner_global", "llm_pruner_local")
    scores = tmp_path / "llm_pruner_global" / "prune" / "scores.safetensors"
    scores.parent.mkdir(parents=True)
    scores.write_bytes(b"")
    assert shared_scores("llm_pruner_local", methods, tmp_path)[0] == f"prune.scores_from={scores}"
    assert shared_scores("llm_pruner_local", methods, tmp_path, iterations=2) == []
    assert shared_scores("llm_pruner_global", methods, tmp_path) == []
