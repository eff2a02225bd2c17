"""``ukmp run`` and ``ukmp compare`` on every family beyond BLIP-2-T5 (tiny BLIP-2-OPT, BLIP-2 with a GQA Llama, a
plain Llama, InstructBLIP with T5 and Llama, LLaVA, SmolVLM, Qwen2.5-VL), through the CLI entry point: every stage runs, the
pruned and recovered models reload, cached scores re-plan to the same plan, a second run skips every stage, and the
comparison tabulates each method. Sizes are cut to the bone (2 evaluation samples, one recovery step per sub-stage,
one unit per allocation step); the demo-size runs of the T5 pipeline live in tests/core/test_pipeline.py. LLaVA's
unused last vision layer is dropped by the prune stage and counted in the ratio."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from ukmp.cli import main
from ukmp.io import load_pruned, read_plan
from ukmp.models import adapter_for
from ukmp.models.build import load_config
from ukmp.prune.reuse import replan

FAMILIES = {
    "tiny-blip2-opt": ["data.calibration=sample:cc595k", "eval.after_prune=[okvqa]", "eval.after_finetune=[nocaps]"],
    "tiny-blip2-llama": ["data.calibration=sample:cc595k", "eval.after_prune=[gqa]", "eval.after_finetune=[okvqa]"],
    "tiny-llama": ["data.calibration=sample:text", "data.finetune=sample:text", "eval.after_prune=[perplexity]",
                   "eval.after_finetune=[perplexity]"],
    "tiny-instructblip-t5": ["data.calibration=sample:cc595k", "eval.after_prune=[okvqa]", "eval.after_finetune=[gqa]"],
    "tiny-instructblip-llama": ["data.calibration=sample:cc595k", "eval.after_prune=[gqa]",
                                "eval.after_finetune=[okvqa]"],
    "tiny-llava": ["data.calibration=sample:cc595k", "eval.after_prune=[okvqa]", "eval.after_finetune=[gqa]"],
    "tiny-smolvlm": ["data.calibration=sample:cc595k", "eval.after_prune=[gqa]", "eval.after_finetune=[okvqa]"],
    "tiny-llava-onevision": ["data.calibration=sample:cc595k", "eval.after_prune=[okvqa]",
                             "eval.after_finetune=[gqa]"],
    "tiny-qwen2.5-vl": ["data.calibration=sample:cc595k", "eval.after_prune=[okvqa]", "eval.after_finetune=[gqa]"],
}

SMALL = ["prune.num_samples=8", "prune.units_per_step=1", "prune.fine_units_per_step=1", "eval.max_samples=2",
         "eval.num_beams=1", "eval.batch_size=2", "eval.dense=true", "finetune.max_steps_per_stage=1",
         "finetune.checkpoint_every=100", "prune.options={upop: {steps: 2}}"]


def demo_yaml() -> str:
    return str(resources.files("ukmp") / "configs" / "demo.yaml")


@pytest.mark.parametrize("family", FAMILIES)
def test_run_every_stage_then_skip(family, tmp_path, caplog):
    args = ["run", demo_yaml(), f"output_dir={tmp_path}", f"name={family}", f"model.source={family}", *SMALL,
            *FAMILIES[family]]
    assert main(args) == 0
    root = tmp_path / family
    results = json.loads((root / "results.json").read_text())
    for state in ("dense", "pruned", "recovered"):
        assert results["metrics"][state], f"{family}: no {state} metrics"
    summary = json.loads((root / "prune" / "summary.json").read_text())
    # one unit per step: the overshoot is at most the last unit removed (a tiny Llama's KV group is 4.5 % of it)
    biggest = max(g.params_per_unit for g in adapter_for(load_config(family)).groups())
    total = summary["parameters"]["total_before"]
    assert 0.5 - 0.005 <= summary["achieved_ratio"] <= 0.5 + biggest / total + 1e-9
    plan = read_plan(root / "prune" / "model")
    assert bool(plan.drop_layers) == (family == "tiny-llava")  # only LLaVA has a layer that never counts
    again = replan(root / "prune" / "scores.safetensors", 0.5)  # cached scores: the same plan, drop included
    assert again.digest() == plan.digest() and again.drop_layers == plan.drop_layers
    for stage in ("prune", "finetune"):
        model = load_pruned(root / stage / "model")
        assert sum(p.numel() for p in model.parameters()) == summary["parameters"]["total_after"]
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(args) == 0
    skipped = [r.getMessage() for r in caplog.records if "up to date" in r.getMessage()]
    assert len(skipped) == 5, f"{family}: a second run re-ran a stage ({skipped})"


@pytest.mark.parametrize("family", FAMILIES)
def test_compare(family, tmp_path):
    args = ["compare", demo_yaml(), f"output_dir={tmp_path}", f"name={family}", f"model.source={family}", *SMALL,
            *FAMILIES[family], "finetune.enabled=false",
            "--ratio", "0.3", "--methods", "ukmp,llm_pruner_local,flap,random"]
    assert main(args) == 0
    rows = json.loads(next(tmp_path.glob("*/comparison.json")).read_text())["methods"]
    assert set(rows) == {"ukmp", "llm_pruner_local", "flap", "random"}
    for m, r in rows.items():
        assert 0.2 < r["achieved_ratio"] < 0.4, f"{family}/{m}: {r['achieved_ratio']}"


@pytest.mark.parametrize("family, source", [("llava", "llava-hf/llava-1.5-7b-hf"),
                                            ("instructblip", "Salesforce/instructblip-vicuna-7b"),
                                            ("llava_onevision", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf")])
def test_shipped_run_configs_parse(family, source):
    from pathlib import Path

    from ukmp.config import load_config as load_run_config

    root = Path(__file__).resolve().parents[2]
    cfg = load_run_config(root / "configs" / family / f"{family}_ukmp_0.2.yaml")
    got = (cfg.model.source, cfg.prune.ratio, cfg.finetune.lr, cfg.prune.drop_unused_layers)
    assert got == (source, 0.2, 1e-5, True)
    assert (root / "scripts" / family / "ukmp_0.2.py").read_text().count(f'"{family}_ukmp_0.2.yaml"') == 1
