"""Smoke: every method on the tiny model through the comparison tool (one table, one chart, cached runs)."""

import json
from importlib import resources
from pathlib import Path

from ukmp.cli import main
from ukmp.compare import DEFAULT_METHODS
from ukmp.io import load_pruned

METHODS_DIR = Path(__file__).resolve().parents[2] / "configs" / "methods"


def test_compare_all_methods_on_the_tiny_model(tmp_path, capsys):
    demo = str(resources.files("ukmp") / "configs" / "demo.yaml")
    args = ["compare", demo, f"output_dir={tmp_path}", "prune.options.upop.steps=4", "--ratio", "0.4",
            "--methods-dir", str(METHODS_DIR)]
    assert main(args) == 0
    root = tmp_path / "demo_compare_0.4"
    result = json.loads((root / "comparison.json").read_text())
    assert list(result["methods"]) == list(DEFAULT_METHODS)
    for m, r in result["methods"].items():
        # one ViT/T5 head of the tiny model is ~1.3 % of all parameters and the demo allocates 16 units per
        # step: 2.5 percentage points covers one coarse step, and is far from 0.4 if a method ignored the target
        assert abs(r["achieved_ratio"] - 0.4) <= 0.025, m
        assert set(r["pruned"]) == {"okvqa", "gqa"}
        model = load_pruned(root / m / "prune" / "model")  # every plan reloads
        assert model.config.model_type == "blip-2"
    assert result["methods"]["llm_pruner_local"]["scores_from"].endswith("llm_pruner_global/prune/scores.safetensors")
    # the same method re-allocating its own scores at another ratio keeps the allocation it imposes (raw sums)
    scores = root / "llm_pruner_global" / "prune" / "scores.safetensors"
    assert main(["compare", demo, f"output_dir={tmp_path}", f"prune.scores_from={scores}", "--ratio", "0.3",
                 "--methods", "llm_pruner_global", "--methods-dir", str(METHODS_DIR)]) == 0
    again = json.loads((tmp_path / "demo_compare_0.3" / "llm_pruner_global" / "prune" / "summary.json").read_text())
    first = json.loads((root / "llm_pruner_global" / "prune" / "summary.json").read_text())
    assert first["allocation"]["normalization"] == again["allocation"]["normalization"] == "none"
    assert again["prune_config"]["normalization"] != "none"  # the config alone would have normalised
    table = (root / "comparison.md").read_text()
    assert all(f"| {m} |" in table for m in DEFAULT_METHODS) and "| dense |" in table
    assert (root / "comparison.png").stat().st_size > 5000
    capsys.readouterr()
    assert main(args) == 0  # second call: everything cached
    stages = [json.loads(p.read_text()) for p in root.glob("*/prune/stage.json")]
    assert len(stages) == len(DEFAULT_METHODS)
