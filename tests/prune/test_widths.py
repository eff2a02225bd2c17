"""Engine-friendly widths (``prune.width_multiple``, ``prune.scope=uniform``; :mod:`ukmp.prune.widths`).

* the default allocation is bit for bit the plan it was before the options existed (digests of a fixed score set);
* ``width_multiple``: every kept channel width is a multiple of N or the full width, heads are free, the ratio lands
  within one block of the target (global and local scope, params and units budgets), the plan differs from the
  default;
* ``uniform``: every layer of a kind keeps the same count, the units a layer keeps are its best-scored ones, the
  ratio lands within one block; combined with ``width_multiple`` both hold;
* bad values and methods that make their own plan fail in one line;
* through the prune stage on tiny-llama: the pruned model saves, loads and runs, and ``ukmp plan`` re-allocates its
  cached scores with the options to the same plan.
"""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

from ukmp.config import ConfigError, PruneConfig, load_config
from ukmp.groups import PrunableGroup
from ukmp.prune.allocate import AllocationConfig, allocate

pytestmark = pytest.mark.unit


def make_groups() -> list[PrunableGroup]:
    """Two towers: 4 vision layers (8 heads, 96 channels) and 5 language layers (4 KV groups, 200 channels, which
    is no multiple of 32: a first block of 8)."""
    out = []
    for i in range(4):
        out += [PrunableGroup(f"v.layers.{i}.attn", "vit_heads", "heads", "vision", i, 8, 500),
                PrunableGroup(f"v.layers.{i}.mlp", "vit_mlp", "channels", "vision", i, 96, 30)]
    for i in range(5):
        out += [PrunableGroup(f"lm.layers.{i}.attn", "lm_heads", "heads", "language", i, 4, 900),
                PrunableGroup(f"lm.layers.{i}.mlp", "lm_mlp", "channels", "language", i, 200, 40)]
    return out


GROUPS = make_groups()
TOTAL = sum(g.total_params for g in GROUPS) + 30_000


def make_scores(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {g.id: torch.rand(g.n_units, generator=gen, dtype=torch.float64).float()
            * (20.0 if g.modality == "language" else 1.0) for g in GROUPS}


STEPS = dict(units_per_step=50, fine_units_per_step=5)
# plan digests of these configurations on make_scores(0), computed with the allocator as it was before the width
# options existed (commit eacae8e): the default path must still give exactly these plans
BEFORE = {
    "07c7dd8f50fc300b": dict(target_ratio=0.3, **STEPS),
    "87a816c939400f7d": dict(target_ratio=0.5, exact_stop=True, **STEPS),
    "9bef08dc8c46a0fd": dict(target_ratio=0.4, normalization="none", budget="units"),
    "5970f590f1f7943f": dict(target_ratio=0.3, scope="local"),
    "1635ecddfc75d9f2": dict(target_ratio=0.5, scope="local", local_rounding="llm_pruner",
                             local_ratio_mode="per_module_raw"),
}


@pytest.mark.parametrize("digest", list(BEFORE))
def test_defaults_give_the_plans_they_gave_before(digest):
    assert allocate(make_scores(), GROUPS, TOTAL, AllocationConfig(**BEFORE[digest])).digest() == digest
    # width_multiple=1 is the default, spelled out
    assert allocate(make_scores(), GROUPS, TOTAL, AllocationConfig(width_multiple=1, **BEFORE[digest])).digest() \
        == digest


def widths(plan) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for g in GROUPS:
        out.setdefault(g.kind, []).append(len(plan.kept(g)))
    return out


def within_one_block(plan, exact: bool) -> None:
    """The ratio lands within one block of the target: at or below it (by < one block) with ``exact_stop``, above it
    (by < the largest block) without; blocks: ratio_check's ``one_unit`` / ``largest_unit``."""
    c = plan.meta["ratio_check"]
    assert abs(c["achieved"] - plan.meta["achieved_ratio"]) < 1e-12 or c["budget"] == "units"
    if exact:
        assert -c["largest_unit"] - 1e-12 <= c["overshoot"] <= 1e-12, c
    else:
        assert -1e-12 <= c["overshoot"] <= c["largest_unit"] + 1e-12, c


@pytest.mark.parametrize("multiple", [8, 32, 64])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
@pytest.mark.parametrize("extra", [{}, {"exact_stop": True}, {"budget": "units", "normalization": "none"}])
def test_width_multiple_global(multiple, ratio, extra):
    cfg = AllocationConfig(target_ratio=ratio, width_multiple=multiple, **STEPS, **extra)
    plan = allocate(make_scores(), GROUPS, TOTAL, cfg)
    plan.validate(GROUPS)
    for g in GROUPS:
        if g.unit_type == "channels":
            assert len(plan.kept(g)) % multiple == 0 or len(plan.kept(g)) == g.n_units, (g.id, len(plan.kept(g)))
    assert plan.meta["reached_target"]
    within_one_block(plan, extra.get("exact_stop", False))
    # some channel group is cut to a width the default would not keep
    default = allocate(make_scores(), GROUPS, TOTAL, AllocationConfig(target_ratio=ratio, **STEPS, **extra))
    assert any(len(default.kept(g)) % multiple for g in GROUPS if g.unit_type == "channels")
    assert plan.digest() != default.digest()
    # heads are not rounded: some head group keeps a count that is no multiple (and not all its heads)
    assert any(0 < len(plan.kept(g)) < g.n_units and len(plan.kept(g)) % multiple for g in GROUPS
               if g.unit_type == "heads")
    # the channels a group keeps are its best-scored ones
    scores = make_scores()
    for g in GROUPS:
        kept = plan.kept(g)
        if g.unit_type == "channels" and len(kept) < g.n_units:
            assert set(kept) == set(torch.sort(scores[g.id], stable=True).indices[g.n_units - len(kept):].tolist())


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_width_multiple_local(ratio):
    cfg = AllocationConfig(target_ratio=ratio, scope="local", width_multiple=32)
    plan = allocate(make_scores(), GROUPS, TOTAL, cfg)
    for g in GROUPS:
        if g.unit_type == "channels":
            assert len(plan.kept(g)) % 32 == 0 or len(plan.kept(g)) == g.n_units
    # carry rounding: below the target by less than one 32-channel block per channel kind (heads keep their count)
    c = plan.meta["ratio_check"]
    blocks = sum(32 * g.params_per_unit for g in (GROUPS[1], GROUPS[9])) / TOTAL
    default = allocate(make_scores(), GROUPS, TOTAL, AllocationConfig(target_ratio=ratio, scope="local"))
    assert -blocks - 1e-12 <= c["achieved"] - default.meta["achieved_ratio"] <= 1e-12
    assert plan.digest() != default.digest()


@pytest.mark.parametrize("multiple", [1, 32])
@pytest.mark.parametrize("ratio", [0.2, 0.35, 0.5])
@pytest.mark.parametrize("exact", [False, True])
def test_uniform_scope(multiple, ratio, exact):
    cfg = AllocationConfig(target_ratio=ratio, scope="uniform", width_multiple=multiple, exact_stop=exact, **STEPS)
    plan = allocate(make_scores(), GROUPS, TOTAL, cfg)
    plan.validate(GROUPS)
    w = widths(plan)
    assert all(len(set(v)) == 1 for v in w.values()), w
    assert plan.meta["uniform_kept"] == {k: v[0] for k, v in w.items()}
    assert any(v[0] < n for v, n in zip(w.values(), (8, 96, 4, 200)))  # something is pruned in every case
    if multiple > 1:
        assert all(v[0] % multiple == 0 or v[0] == n for v, n in zip((w["vit_mlp"], w["lm_mlp"]), (96, 200)))
    within_one_block(plan, exact)
    default = allocate(make_scores(), GROUPS, TOTAL, AllocationConfig(target_ratio=ratio, exact_stop=exact, **STEPS))
    assert any(len(set(v)) > 1 for v in widths(default).values())  # the default is not uniform on these scores
    scores = make_scores()
    for g in GROUPS:  # each layer keeps its own best-scored units
        k = len(plan.kept(g))
        assert set(plan.kept(g)) == set(torch.sort(scores[g.id], stable=True).indices[g.n_units - k:].tolist())


def test_uniform_counts_follow_the_scores():
    """Without normalisation, both towers' scores in [0, 1): raising the language scores threefold moves the cut
    from the language MLP to the vision MLP."""
    scores = {k: v / (20.0 if k.startswith("lm.") else 1.0) for k, v in make_scores().items()}
    cfg = AllocationConfig(target_ratio=0.3, scope="uniform", normalization="none", **STEPS)
    low = allocate(scores, GROUPS, TOTAL, cfg).meta["uniform_kept"]
    high = allocate({k: v * (3.0 if k.startswith("lm.") else 1.0) for k, v in scores.items()}, GROUPS, TOTAL,
                    cfg).meta["uniform_kept"]
    assert high["lm_mlp"] > low["lm_mlp"] and high["vit_mlp"] < low["vit_mlp"], (low, high)


def test_bad_values_fail_in_one_line():
    with pytest.raises(ValueError, match=r"^allocation\.width_multiple: must be >= 1, got 0$"):
        AllocationConfig(width_multiple=0)
    with pytest.raises(ConfigError, match=r"^prune\.width_multiple: must be >= 1 \(1: any width\), got -32$"):
        load_config(None, ["prune.width_multiple=-32"])
    with pytest.raises(ConfigError, match=r"^prune\.scope: 'flat' is not one of global, local, uniform$"):
        load_config(None, ["prune.scope=flat"])
    with pytest.raises(ConfigError, match=r"^prune\.plan_from: a given plan is applied as is"):
        load_config(None, ["prune.plan_from=plan.json", "prune.width_multiple=32"])
    for opt in ("prune.width_multiple=32", "prune.scope=uniform"):  # rounds extend a plan unit by unit
        with pytest.raises(ConfigError, match=r"^prune\.iterations: 2 rounds, but prune\.width_multiple / scope "
                                              r"uniform allocate blocks of units"):
            load_config(None, ["prune.iterations=2", opt])
    assert load_config(None, ["prune.iterations=2"]).prune.iterations == 2  # the refusal is the options' alone
    with pytest.raises(ValueError, match=r"^allocation: scope uniform / width_multiple 1 cannot extend"):
        allocate(make_scores(), GROUPS, TOTAL, AllocationConfig(scope="uniform", target_ratio=0.2),
                 start=allocate(make_scores(), GROUPS, TOTAL, AllocationConfig(target_ratio=0.1)))
    odd = [*GROUPS, PrunableGroup("lm.layers.5.mlp", "lm_mlp", "channels", "language", 5, 100, 40)]
    scores = {**make_scores(), "lm.layers.5.mlp": torch.rand(100)}
    with pytest.raises(ValueError, match=r"^prune\.scope: uniform needs every lm_mlp group to have 200 units "
                                         r"\(lm\.layers\.5\.mlp has 100\)$"):
        allocate(scores, odd, TOTAL + 4000, AllocationConfig(scope="uniform"))


def test_methods_that_cannot_take_the_options_are_refused():
    from ukmp.prune.stage import allocation_config, check_width_options

    uni = PruneConfig(method="llm_pruner_local", scope="uniform")
    with pytest.raises(ValueError, match=r"^prune\.scope: uniform ranks across layers, and llm_pruner_local "
                                         r"allocates within each module \(scope local\)"):
        allocation_config(uni, {"scope": "local", "normalization": "none"})
    # a method that imposes the global scope takes uniform as its uniform form
    assert allocation_config(PruneConfig(scope="uniform"), {"scope": "global"}).scope == "uniform"
    with pytest.raises(ValueError, match=r"^prune\.width_multiple: flap makes its own plan; engine-friendly"):
        check_width_options(PruneConfig(method="flap", width_multiple=32), True)
    check_width_options(PruneConfig(method="flap"), True)  # no option set: nothing to refuse


@pytest.mark.integration
def test_stage_save_load_forward_and_replan(tmp_path, sample_data):
    """tiny-llama (3 layers, 2 KV groups, 128 channels) pruned by UKMP with uniform + width_multiple 32: equal
    widths, multiples of 32, the saved model loads and runs (finite logits that differ from the dense model's by
    more than 1e-3), and ``replan`` of the stage's scores with the same options gives the same plan."""
    from ukmp.io import load_pruned
    from ukmp.prune.reuse import replan
    from ukmp.prune.stage import run_prune_stage

    demo = str(resources.files("ukmp") / "configs" / "demo.yaml")
    cfg = load_config([demo], [f"output_dir={tmp_path}", "model.source=tiny-llama", "model.device=cpu",
                               f"data.calibration={sample_data['text']}", "prune.num_samples=4", "prune.batch_size=4",
                               "prune.ratio=0.3", "prune.scope=uniform", "prune.width_multiple=32",
                               "prune.exact_stop=true"])
    out = tmp_path / "prune"
    out.mkdir()
    run_prune_stage(cfg, out)
    plan = json.loads((out / "plan.json").read_text())
    mlp = [len(plan["keep"].get(f"lm.layers.{i}.mlp", range(128))) for i in range(3)]
    assert len(set(mlp)) == 1 and mlp[0] % 32 == 0 and mlp[0] < 128, mlp
    summary = json.loads((out / "summary.json").read_text())
    assert summary["allocation"]["width_multiple"] == 32 and summary["allocation"]["scope"] == "uniform"
    model = load_pruned(out / "model").eval()
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    from ukmp.runtime import load_dense

    dense = load_dense(cfg.model, torch.device("cpu"))[0].eval()
    with torch.no_grad():
        assert (dense(input_ids=ids).logits - logits).abs().max() > 1e-3  # the pruning changed the output
    again = replan(out / "scores.safetensors", 0.3)  # the options come back with the scores file
    from ukmp.plan import PruningPlan

    assert again.digest() == PruningPlan.load(out / "plan.json").digest()
    other = replan(out / "scores.safetensors", 0.3, scope="global", width_multiple=1)
    assert other.digest() != again.digest()


def test_a_method_with_its_own_plan_is_refused_before_the_model_loads(tmp_path):
    from ukmp.prune.stage import run_prune_stage

    demo = str(resources.files("ukmp") / "configs" / "demo.yaml")
    cfg = load_config([demo], [f"output_dir={tmp_path}", "model.source=/nonexistent/model", "prune.method=flap",
                               "prune.scope=uniform"])
    with pytest.raises(ValueError, match=r"^prune\.scope=uniform: flap makes its own plan"):
        run_prune_stage(cfg, tmp_path)
    assert list(tmp_path.iterdir()) == []
