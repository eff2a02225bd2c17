"""Layer ranges (``prune.layers``), the ratio check in every prune stage's summary.json, and every shipped config.

* the range syntax and tower names fail at config load, in one line naming the key;
* the tower names are those of the adapters' group ids (every shipped model config);
* ``skip_edge_layers`` is the shorthand it is documented to be (4:30 on 32 layers, 4:29 on 30);
* the prune stage, for UKMP, a shared-allocator baseline and a method with its own plan, prunes only inside the
  range: the groups outside keep every unit and count as unprunable, and the ratio still lands on the target
  (within one unit); summary.json states target, achieved and overshoot;
* an overshoot beyond ``prune.max_overshoot`` fails before anything is written; ``budget: units`` and the
  ``llm_pruner`` rounding run through the stage;
* every run config under configs/ loads.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import yaml

from ukmp.compare import allocation_label
from ukmp.config import ConfigError, load_config
from ukmp.groups import PrunableGroup
from ukmp.layer_ranges import TOWERS, chosen_layers, parse_range, select_layers

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("spec, want", [("all", slice(None)), ("4:30", slice(4, 30)), (":-2", slice(None, -2)),
                                        ("1::2", slice(1, None, 2)), (" 4 : 28 ", slice(4, 28))])
def test_parse_range(spec, want):
    assert parse_range(spec) == want


@pytest.mark.parametrize("override, message", [
    ("prune.layers.lm=4:30", r"^prune\.layers\.lm: '270' is not 'all' or a Python slice .* as the number 270\)$"),
    ("prune.layers={lm: '4-30'}", r"^prune\.layers\.lm: '4-30' is not"),
    ("prune.layers={lm: '1:9:0'}", r"^prune\.layers\.lm: '1:9:0' has step 0$"),
    ("prune.layers={qformer: all}", r"^prune\.layers\.qformer: unknown tower \(towers: vision, lm, text_enc"),
    ("prune.budget=tokens", r"^prune\.budget: 'tokens' is not one of params, units$"),
    ("prune.local_rounding=round", r"^prune\.local_rounding: 'round' is not one of floor, carry, llm_pruner$"),
    ("prune.max_overshoot=1.5", r"^prune\.max_overshoot: must be in \[0, 1\)"),
])
def test_bad_layer_ranges_and_budgets_fail_at_load_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_skip_edge_layers_and_layers_together_are_refused():
    with pytest.raises(ConfigError, match=r"^prune\.options\.llmp\.skip_edge_layers: a shorthand for prune\.layers"):
        load_config(None, ["prune.layers={lm: '4:28'}", "prune.options={llmp: {skip_edge_layers: true}}"])


def test_towers_are_the_first_component_of_every_adapters_group_ids():
    from ukmp.models import adapter_for
    from ukmp.models.build import SHIPPED_CONFIGS, load_config as model_config

    seen = {g.id.split(".")[0] for name in SHIPPED_CONFIGS for g in adapter_for(model_config(name)).groups()}
    assert seen == set(TOWERS)


def groups_of(n_layers: int, tower: str = "lm") -> list[PrunableGroup]:
    return [PrunableGroup(f"{tower}.layers.{i}.{k}", k, "channels", "language", i, 4, 10)
            for i in range(n_layers) for k in ("attn", "mlp")]


@pytest.mark.parametrize("n, spec", [(32, "4:30"), (30, "4:29"), (24, "3:23"), (39, "5:37")])
def test_skip_edge_layers_is_a_layer_range(n, spec):
    from ukmp.baselines.llm_pruner import edge_layer_ranges, edge_layer_skips, eligible_groups

    groups = groups_of(n)
    assert edge_layer_ranges(groups) == {"lm": spec}
    kept = eligible_groups(groups, True)
    assert kept == select_layers(groups, {"lm": spec})
    assert {g.layer for g in kept} == set(range(n)) - edge_layer_skips(n)


def test_a_listed_tower_is_pruned_in_its_range_and_an_unlisted_one_not_at_all():
    groups = groups_of(6) + groups_of(4, "vision")
    assert chosen_layers(groups, {}) == {"lm": list(range(6)), "vision": list(range(4))}
    assert chosen_layers(groups, {"lm": "-2:"}) == {"lm": [4, 5]}
    assert [g.id for g in select_layers(groups, {"vision": "::3"})] == [
        "vision.layers.0.attn", "vision.layers.0.mlp", "vision.layers.3.attn", "vision.layers.3.mlp"]
    with pytest.raises(ValueError, match=r"^prune\.layers\.text_enc: this model has no such tower \(its towers: lm"):
        select_layers(groups, {"text_enc": "all"})
    with pytest.raises(ValueError, match=r"^prune\.layers\.lm: '8:10' selects none of its 6 layers$"):
        select_layers(groups, {"lm": "8:10"})


# ------------------------------------------------------------------------------------------------ the prune stage
def demo_yaml() -> str:
    return str(resources.files("ukmp") / "configs" / "demo.yaml")


def run_stage(tmp_path, sample_data, *extra):
    from ukmp.prune.stage import run_prune_stage

    cfg = load_config([demo_yaml()], [f"output_dir={tmp_path}", "model.source=tiny-llama", "model.device=cpu",
                                      f"data.calibration={sample_data['text']}", "prune.num_samples=4",
                                      "prune.batch_size=4", *extra])
    out = tmp_path / "prune"
    out.mkdir(parents=True)
    run_prune_stage(cfg, out)
    return json.loads((out / "summary.json").read_text()), json.loads((out / "plan.json").read_text())


@pytest.mark.parametrize("method", ["ukmp", "llm_pruner_global", "flap"])
def test_the_stage_prunes_only_inside_the_layer_range(method, tmp_path, sample_data):
    """tiny-llama (3 layers): layers 1..2 pruned at 0.3 of the whole model, layer 0 whole. Within one unit of the
    target (a KV group of tiny-llama is 4.5 % of it)."""
    summary, plan = run_stage(tmp_path, sample_data, f"prune.method={method}", "prune.ratio=0.3",
                              "prune.layers={lm: '1:'}")
    assert not any(gid.startswith("lm.layers.0.") and len(k) < {"attn": 2, "mlp": 128}[gid.rsplit(".", 1)[1]]
                   for gid, k in plan["keep"].items())
    assert any(gid.startswith("lm.layers.1.") or gid.startswith("lm.layers.2.") for gid in plan["keep"])
    assert summary["layers"] == {"lm": "1..2 (2 of 3 layers)"}
    assert summary["layer_spans"] == {"lm": {"first": 1, "last": 2, "count": 2, "of": 3}}  # what compare reads
    check = summary["ratio_check"]
    assert check["budget"] == "params" and check["target"] == 0.3 and check["max_overshoot"] == 0.005
    assert abs(check["achieved"] - summary["achieved_ratio"]) < 1e-12
    assert -check["largest_unit"] <= check["overshoot"] <= check["largest_unit"]
    label = allocation_label(summary)
    assert label.endswith(", lm 1..2") and label.startswith("own (" if method == "flap" else "global, params budget")


def test_an_overshoot_beyond_max_overshoot_fails_before_anything_is_written(tmp_path, sample_data, monkeypatch,
                                                                           capsys):
    """The stage's guard, with an allocator that overshoots as ukmp's did before (here: it removes 40 % for a 20 %
    target; tiny-llama's largest unit is 4.5 %): exit 2, one line naming prune.max_overshoot, no stage output."""
    from dataclasses import replace

    import ukmp.prune.stage as stage
    from ukmp.cli import main

    real = stage.allocate

    def overshooting(scores, groups, total, cfg):
        plan = real(scores, groups, total, replace(cfg, target_ratio=2 * cfg.target_ratio))
        del plan.meta["ratio_check"]  # judged against the configured ratio, as a method's own plan is
        return plan

    monkeypatch.setattr(stage, "allocate", overshooting)
    args = ["prune", demo_yaml(), f"output_dir={tmp_path}", "model.source=tiny-llama", "model.device=cpu",
            f"data.calibration={sample_data['text']}", "prune.num_samples=4", "prune.method=random",
            "prune.ratio=0.2"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prune.max_overshoot: the plan removes 4" in err[0] and "target 20.00% (+" in err[0]
    assert not list((tmp_path / "demo" / "prune").glob("*.json"))
    assert main([*args, "prune.max_overshoot=0.3"]) == 0  # a looser bound lets it through, with a warning
    summary = json.loads((tmp_path / "demo" / "prune" / "summary.json").read_text())
    assert summary["ratio_check"]["overshoot"] > 0.15 and summary["ratio_check"]["max_overshoot"] == 0.3


def test_unit_budget_and_llm_pruner_rounding_through_the_stage(tmp_path, sample_data):
    """tiny-llama layers 1..2 hold 2 x (2 KV groups + 128 channels) = 260 units: a 0.2 unit budget removes
    260 - int(260 * 0.8) = 52 of them; LLM-Pruner's local rounding removes 128 - int(128 * 0.8) = 26 channels per
    module and no KV group (32 - int(32 * 0.8) = 7 key rows < 16)."""
    summary, plan = run_stage(tmp_path / "g", sample_data, "prune.method=llm_pruner_global", "prune.ratio=0.2",
                              "prune.budget=units", "prune.layers={lm: '1:'}", "prune.max_group_prune_ratio=1.0")
    assert summary["allocation_meta"]["removed_units"] == 52 and summary["ratio_check"]["budget"] == "units"
    assert summary["ratio_check"]["achieved"] == 52 / 260
    assert allocation_label(summary) == "global, units budget, cut at target, lm 1..2"  # ukmp compare's column
    from ukmp.prune.reuse import replan

    again = replan(tmp_path / "g" / "prune" / "scores.safetensors", 0.2)  # scores of the range only re-plan alike
    assert again.keep == plan["keep"] and again.meta["unscored_groups"] == ["lm.layers.0.attn", "lm.layers.0.mlp"]
    summary, plan = run_stage(tmp_path / "l", sample_data, "prune.method=llm_pruner_local", "prune.ratio=0.2",
                              "prune.budget=units", "prune.local_rounding=llm_pruner", "prune.layers={lm: '1:'}")
    removed = {gid: {"attn": 2, "mlp": 128}[gid.rsplit(".", 1)[1]] - len(k) for gid, k in plan["keep"].items()}
    assert removed == {"lm.layers.1.attn": 0, "lm.layers.1.mlp": 26, "lm.layers.2.attn": 0, "lm.layers.2.mlp": 26}
    assert allocation_label(summary) == "local, units budget, llm_pruner rounding, lm 1..2"
    with pytest.raises(ValueError, match=r"^prune\.budget: 'units' is a budget of the shared allocator; flap"):
        run_stage(tmp_path / "f", sample_data, "prune.method=flap", "prune.budget=units")


def run_configs() -> list[Path]:
    """Every YAML under configs/ that is a run config (dataset YAMLs have a ``format`` key)."""
    out = []
    for p in sorted(CONFIGS.rglob("*.yaml")):
        if "format" not in (yaml.safe_load(p.read_text()) or {}):
            out.append(p)
    return out


def test_every_shipped_run_config_loads():
    paths = run_configs()
    assert len(paths) >= 30 and CONFIGS / "compare" / "llm_pruner_local_l4.yaml" in paths
    for p in paths:
        load_config(p)
    local = load_config(CONFIGS / "compare" / "llm_pruner_local_l4.yaml").prune
    glob = load_config(CONFIGS / "compare" / "llm_pruner_global_l4.yaml").prune
    assert (local.method, local.budget, local.local_rounding, local.layers, local.num_samples) == (
        "llm_pruner_local", "units", "llm_pruner", {"lm": "4:28"}, 10)
    assert (glob.method, glob.budget, glob.layers, glob.num_samples, glob.max_group_prune_ratio) == (
        "llm_pruner_global", "units", {"lm": "4:28"}, 10, 1.0)
    window = yaml.safe_load((CONFIGS / "compare" / "llm_pruner_text_64.yaml").read_text())["window"]
    assert window == 64
