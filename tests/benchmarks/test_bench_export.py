"""benchmarks/bench_export.py in its tiny mode (a tiny random-weight Llama, magnitude plan at 50 %): the exports run in
llama.cpp (and ONNX Runtime when onnxscript is installed) give PyTorch's perplexity, llama.cpp's Q8_0 quantiser keeps
exactly the matrices whose rows are not whole 32-value blocks in F16, and the report is written. No timing is
asserted (speeds of a tiny model mean nothing)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python of the export extra (no wheel; pip builds it from "
                                        "source): pip install 'ukmp[export]'")
pytest.importorskip("gguf", reason="needs the gguf package of the export extra: pip install 'ukmp[export]'")

ROOT = Path(__file__).resolve().parents[2]
REL_TOL = 1e-4  # F32 weights and KV cache: logits within 1e-4 (tests/export), so the mean NLL too


def _has(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _run(root: Path, *extra: str) -> tuple[dict, Path]:
    spec = importlib.util.spec_from_file_location("bench_export", ROOT / "benchmarks" / "bench_export.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--work", str(root / "work"), "--out", str(root / "out"), "--ratios", "0.5",
                       "--reps", "1", "--pp", "16", "--tg", "4", "--ppl-windows", "2", "--window", "64", *extra]) == 0
    return json.loads((root / "out" / "bench_export.json").read_text()), root


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """The run without ONNX (its two dynamo exports cost ~20 s more: the slow test below)."""
    return _run(tmp_path_factory.mktemp("bench_export"), "--no-onnx")


@pytest.mark.integration
def test_engines_give_pytorchs_perplexity(result):
    res, _ = result
    models = res["models"]
    for name, m in models.items():
        ref = m["ppl"]["torch_f32"]["perplexity"]
        assert abs(m["ppl"]["llama_cpp_f32"]["perplexity"] / ref - 1) <= REL_TOL, name  # measured ~1e-8
        q8 = m["ppl"]["llama_cpp_q8_0"]["perplexity"]
        assert 1e-7 < abs(q8 / ref - 1) < 1e-2, name  # quantised (not the f32 file again), but close
    # not vacuous: the pruned model's perplexity is another one, far outside the tolerance
    dense, pruned = (models[n]["ppl"]["torch_f32"]["perplexity"] for n in ("dense", "ukmp@0.5"))
    assert abs(pruned / dense - 1) > 10 * REL_TOL  # measured 3.4e-3 (random weights: both near the vocabulary size)


@pytest.mark.integration
def test_q8_0_fallback_is_exactly_the_unaligned_rows(result):
    from ukmp.io import read_plan

    res, _ = result
    m = res["models"]["ukmp@0.5"]
    plan = read_plan(m["dir"])
    unaligned = sorted(i for i in range(3) if len(plan.keep[f"lm.layers.{i}.mlp"]) % 32)
    assert unaligned, "the magnitude plan kept only 32-aligned MLP widths: the check below would be vacuous"
    assert m["q8_0_types"]["main"] == "Q8_0"
    assert m["q8_0_types"]["other"] == {"ffn_down.weight F16": unaligned}
    assert res["models"]["dense"]["q8_0_types"]["other"] == {}  # 352 = 11 x 32: every row quantised
    # the same model with its MLPs zero-padded to multiples of 32: the same perplexity, every row quantised
    padded = res["models"]["ukmp@0.5+pad32"]
    assert padded["q8_0_types"]["other"] == {}
    ref = m["ppl"]["torch_f32"]["perplexity"]
    for key in ("torch_f32", "llama_cpp_f32"):
        assert abs(padded["ppl"][key]["perplexity"] / ref - 1) <= REL_TOL, key
    assert padded["params"] > m["params"]  # not vacuous: it was padded


@pytest.mark.integration
def test_report_has_the_ideal_speed_and_sizes(result):
    res, root = result
    m, d = res["models"]["ukmp@0.5"], res["models"]["dense"]
    assert m["ideal_speedup"]["tg"] > 1.3 and d["ideal_speedup"]["tg"] == 1.0
    assert m["sizes"]["gguf_f32"] < d["sizes"]["gguf_f32"] and m["sizes"]["gguf_q8_0"] < m["sizes"]["gguf_f32"]
    row = res["speed"]["llama_cpp_f32"]["ukmp@0.5"]
    assert row["tg_tps"] > 0 and row["tg_tps_speedup"] > 0 and len(row["tg_tps_reps"]) == 1
    assert res["machine"]["load_average_at_start"] and res["setup"]["threads"] == 1
    md = (root / "out" / "bench_export.md").read_text()
    assert "ukmp@0.5" in md and "ideal" in md and (root / "out" / "bench_export.png").stat().st_size > 0


@pytest.mark.slow
def test_onnx_runtime_gives_pytorchs_perplexity(tmp_path):
    """With the export extra's ONNX packages: ONNX Runtime's perplexity is PyTorch's. Without them the script
    refuses in one line naming what is missing, before it exports anything."""
    missing = [m for m in ("onnxscript", "onnxruntime") if not _has(m)]
    if missing:
        with pytest.raises(SystemExit, match=f"bench_export.py: {', '.join(missing)}: not installed.*--no-onnx"):
            _run(tmp_path)
        assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()
        return
    res, _ = _run(tmp_path)
    for name in ("dense", "ukmp@0.5"):  # the padded row has no ONNX export
        m = res["models"][name]
        ref = m["ppl"]["torch_f32"]["perplexity"]
        assert abs(m["ppl"]["onnx_runtime"]["perplexity"] / ref - 1) <= REL_TOL, name  # measured ~1e-8
    assert res["speed"]["onnx_runtime"]["ukmp@0.5"]["pp_tps"] > 0
