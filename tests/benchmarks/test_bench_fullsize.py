"""benchmarks/bench_fullsize.py's pure parts: the truncated configs keep every width, the sizes count every stack,
and the memory model recovers a known law and extrapolates it (the dry runs themselves take an hour: not here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_fullsize", ROOT / "benchmarks" / "bench_fullsize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.unit
def test_truncated_configs_keep_widths_and_cut_every_stack(bench):
    t5 = bench.truncated_config("blip2-flan-t5-xl", 2)
    assert t5["vision_config"]["num_hidden_layers"] == t5["qformer_config"]["num_hidden_layers"] == 2
    assert t5["text_config"]["num_layers"] == t5["text_config"]["num_decoder_layers"] == 2
    assert t5["vision_config"]["hidden_size"] == 1408 and t5["text_config"]["d_ff"] == 5120
    llava = bench.truncated_config("llava-1.5-7b", 1)
    assert llava["vision_config"]["num_hidden_layers"] == 2  # the LM reads layer -2: one layer it reads
    assert llava["text_config"]["num_hidden_layers"] == 1 and llava["text_config"]["hidden_size"] == 4096
    params, layers = bench.size_of(t5)
    full_params, full_layers = bench.size_of("blip2-flan-t5-xl")
    assert layers == 8 and full_layers == 39 + 12 + 24 + 24
    assert full_params == 3_942_446_592 and 0 < params < full_params
    assert bench.size_of("llama-3-8b") == (8_030_261_248, 32)


@pytest.mark.unit
def test_memory_model_recovers_a_known_law(bench):
    a, b, c = 8.0, 3.0e8, 7.0e8  # bytes per parameter, per layer, fixed

    def law(p, n):
        return a * p + b * n + c

    sizes = {"x": [(1e9, 2), (1.5e9, 4), (2.5e9, 8)], "y": [(3e8, 4), (5e8, 8), (9e8, 16)]}
    runs = [{"config": name, "depth": k, "parameters": p, "layers": n,
             "stages": {s: {"exit_code": 0, "peak_rss_bytes": law(p, n)} for s in bench.STAGES}}
            for name, pts in sizes.items() for k, (p, n) in enumerate(pts)]
    full = {"x": (8e9, 32), "y": (4e9, 99)}
    m = bench.fit(runs, full)
    for stage in bench.STAGES:
        got = m[stage]
        assert got["a_bytes_per_parameter"] == pytest.approx(a, rel=1e-6)
        assert got["b_bytes_per_layer"] == pytest.approx(b, rel=1e-6)
        assert got["max_residual_gib"] < 1e-3
        assert got["full_depth"]["x"]["global_gib"] == pytest.approx(law(8e9, 32) / bench.GIB, abs=0.01)
    # not vacuous: a run of another law moves the fit
    runs[0]["stages"]["prune"]["peak_rss_bytes"] *= 2
    assert bench.fit(runs, full)["prune"]["max_residual_gib"] > 0.5
