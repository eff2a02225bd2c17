"""``ukmp export --format hf``: the zero-padded stock checkpoint gives the pruned model's logits (float64: bit for
bit; float32: within 1e-5) and loads, with its tokenizer, in a fresh Python where ukmp cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from ukmp.cli import main
from ukmp.export import export
from ukmp.export.hf import snap_kv_groups
from ukmp.export.tables import CAUSAL_LM_EXPORTS
from ukmp.models import adapter_for
from ukmp.models.build import build_model, load_config
from ukmp.testing import make_inputs

CASES = ["llama", "qwen2", "llama_snap", "mistral", "llama_uniform", "llava"]  # built by conftest.py
LMS = CASES[:-1]
F32_TOL = 1e-5  # float32: padded matmuls sum in another order; 1e-5 on logits of magnitude ~1
TEXT = "a photo of a cat sitting on a red couch"

# Runs in a fresh interpreter (-I: no PYTHONPATH, no user site) after every sys.path entry holding a ukmp package
# is removed; proves ukmp is not importable there, then loads each export with transformers alone. The tokenizer
# is read from its tokenizer.json: AutoTokenizer on a qwen2 checkpoint picks Qwen2Tokenizer whatever the files say
# (transformers 5.24), which the tiny builds' T5-style tokenizer is not (a real Qwen2's tokenizer is).
FRESH = r"""
import json, os, sys
sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or os.getcwd(), "ukmp"))]
try:
    import ukmp
except ImportError:
    pass
else:
    raise SystemExit("ukmp is importable in the fresh process")
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedTokenizerFast
jobs, inputs, out = json.loads(sys.argv[1]), load_file(sys.argv[2]), {}
for name, path in jobs.items():
    llava = AutoConfig.from_pretrained(path).model_type == "llava"
    auto = AutoModelForImageTextToText if llava else AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=torch.float64).eval()
    with torch.no_grad():
        out[name] = model(**{k.split(".", 1)[1]: v for k, v in inputs.items() if k.startswith(name + ".")}).logits
    out[name + ".text_ids"] = torch.tensor(PreTrainedTokenizerFast.from_pretrained(path)(sys.argv[4])["input_ids"])
    out[name + ".class"] = torch.tensor([ord(c) for c in type(model).__name__])
assert not any(m == "ukmp" or m.startswith("ukmp.") for m in sys.modules)
save_file(out, sys.argv[3])
"""


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _inputs(model, seed: int = 0) -> dict:
    inputs = make_inputs(model, seed=seed)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


@pytest.fixture(scope="module")
def exported(pruned_lms, tmp_path_factory):
    """{case: (report, export dir)} and the fresh process's outputs."""
    root = tmp_path_factory.mktemp("hf")
    reports = {case: export(d, "hf", root / case) for case, (_, _, d, _) in pruned_lms.items()}
    inputs = {case: _inputs(pruned_lms[case][0]) for case in reports}
    save_file({f"{case}.{k}": v.contiguous() for case, d in inputs.items() for k, v in d.items()},
              str(root / "inputs.safetensors"))
    proc = subprocess.run(
        [sys.executable, "-I", "-c", FRESH, json.dumps({c: r["out"] for c, r in reports.items()}),
         str(root / "inputs.safetensors"), str(root / "fresh.safetensors"), TEXT],
        cwd=root, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return reports, inputs, load_file(str(root / "fresh.safetensors"))


@pytest.mark.parametrize("case", list(CASES))
def test_hf_export_is_bit_exact_in_float64_in_a_process_without_ukmp(pruned_lms, exported, case):
    model, tok, _, dense = pruned_lms[case]
    reports, inputs, fresh = exported
    inputs = inputs[case]
    expected = _logits(model, inputs)
    assert torch.equal(fresh[case], expected)  # float64: identical, not merely close
    # not vacuous: the dense model (what a plan that pruned nothing would give) differs by far more
    assert (_logits(dense, inputs) - expected).abs().max() > 1e-3
    assert bytes(fresh[case + ".class"].tolist()).decode() == type(model).__name__
    assert fresh[case + ".text_ids"].tolist() == getattr(tok, "tokenizer", tok)(TEXT)["input_ids"]


def test_llava_vision_heads_stay_and_mlp_pads(pruned_lms, exported):
    """CLIP derives head_dim = hidden / heads, so the vision tower keeps every head (zero ones where pruned); its MLP
    and the language model pad to their widest kept layer; the dropped vision layer stays dropped."""
    model = pruned_lms["llava"][0]
    counts = adapter_for(model).unit_counts(model)
    with open(os.path.join(exported[0]["llava"]["out"], "config.json")) as f:
        cfg = json.load(f)
    v, t = cfg["vision_config"], cfg["text_config"]
    assert v["num_attention_heads"] == 4 and v["num_hidden_layers"] == 1
    assert v["intermediate_size"] == counts["vision.layers.0.mlp"]
    assert t["intermediate_size"] == max(counts[f"lm.layers.{i}.mlp"] for i in range(2))
    assert 0.0 < exported[0]["llava"]["saving_kept"]["params"] < 1.0


def test_hf_widths_are_the_widest_kept_and_snapped(pruned_lms, exported):
    reports = exported[0]
    for case in LMS:
        model = pruned_lms[case][0]
        adapter = adapter_for(model)
        counts = adapter.unit_counts(model)
        kv = max(n for g, n in counts.items() if g.endswith(".attn"))
        mlp = max(n for g, n in counts.items() if g.endswith(".mlp"))
        w = reports[case]["widths"]
        r = model.config.num_attention_heads // model.config.num_key_value_heads
        assert w["language.intermediate_size"] == mlp
        # 5 kept heads in 96 channels: 6 for Llama
        assert w["language.num_key_value_heads"] == (6 if case == "llama_snap" else kv)
        if case == "llama_snap":  # why: LlamaConfig refuses 5 heads in 96 channels, head_dim or not
            with pytest.raises(Exception, match="multiple of the number of attention heads"):
                type(model.config)(hidden_size=96, num_attention_heads=5, num_key_value_heads=5, head_dim=16)
        if case == "mistral":
            assert kv == 5
        assert w["language.num_attention_heads"] == w["language.num_key_value_heads"] * r
        with open(os.path.join(reports[case]["out"], "config.json")) as f:
            cfg = json.load(f)
        assert (cfg["num_key_value_heads"], cfg["intermediate_size"]) == (w["language.num_key_value_heads"], mlp)
        assert reports[case]["padded"] == (case != "llama_uniform")
        kept = reports[case]["saving_kept"]
        if case == "llama_uniform":  # nothing padded: the stock shape keeps the whole saving
            assert kept == {"params": 1.0, "flops_per_token": 1.0}
        else:
            assert 0.0 < kept["params"] < 1.0 and 0.0 < kept["flops_per_token"] < 1.0


@pytest.mark.parametrize("case", ["llama", "qwen2"])
def test_hf_export_float32_within_tolerance(make_pruned, tmp_path, case):
    model, _, path, dense = make_pruned(tmp_path, case, dtype=torch.float32)
    export(path, "hf", tmp_path / "hf")
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert served.config.dtype == torch.float32
    inputs = make_inputs(model, seed=1)
    diff = (_logits(served, inputs) - _logits(model, inputs)).abs().max().item()
    assert diff <= F32_TOL
    assert (_logits(dense, inputs) - _logits(model, inputs)).abs().max() > 1e-3  # the tolerance tells models apart


def test_snapped_kv_groups_on_a_llama_3_8b_shape():
    """32 query heads in 4096 channels, 4 per KV group: 5 kept groups (20 heads, which does not divide 4096) snap
    to 8; 3 to 4 (12 -> 16 heads); 2 stays 2."""
    part = adapter_for(build_model(load_config("llama-3-8b"), device="meta", seed=None)).lm
    keys = CAUSAL_LM_EXPORTS["llama"][0]
    assert [snap_kv_groups(k, part, keys) for k in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_output_biases_of_flap_compensation(tmp_path, name):
    """A plan's out_bias gives o_proj / down_proj a bias the dense config lacks: Llama states it with its
    attention_bias / mlp_bias flags (the other biases they add are zero) and stays exact; Qwen2's config has no such
    flag, so the export is refused rather than written without them (transformers would drop them on load)."""
    from ukmp.io import save_pruned
    from ukmp.models.build import build_tiny
    from ukmp.testing import random_plan

    model, tok = build_tiny(name=name, seed=1)
    model = model.double()
    adapter = adapter_for(model)
    plan = random_plan(adapter.groups(), seed=3)
    plan.out_bias = ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    adapter.apply_(model, plan)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.bias.normal_()
        model.model.layers[1].mlp.down_proj.bias.normal_()
    save_pruned(model, plan, tmp_path / "p", processor=tok)
    if name == "tiny-qwen2":
        with pytest.raises(ValueError, match="o_proj.bias: the stock qwen2 config cannot state"):
            export(tmp_path / "p", "hf", tmp_path / "hf")
        assert not (tmp_path / "hf").exists()
        return
    export(tmp_path / "p", "hf", tmp_path / "hf")
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float64).eval()
    assert served.config.attention_bias and served.config.mlp_bias
    assert not served.model.layers[2].self_attn.q_proj.bias.any()  # the flags' other biases are zero
    inputs = _inputs(model)
    assert torch.equal(_logits(served, inputs), _logits(model, inputs))


# ---------------------------------------------------------------------------------------------------- command line
def test_cli_export_hf_prints_the_saving_kept(pruned_lms, tmp_path, capsys):
    rc = main(["export", str(pruned_lms["qwen2"][2]), "--format", "hf", "--out", str(tmp_path / "q")])
    out = capsys.readouterr().out
    assert rc == 0 and "of the saving" in out and "intermediate_size" in out
    assert (tmp_path / "q" / "config.json").is_file()


def _refused(argv, capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    return err


def test_cli_refuses_bad_input_and_writes_nothing(pruned_lms, tmp_path, capsys, tiny):
    src = str(pruned_lms["llama"][2])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert "already exists" in _refused(["export", src, "--format", "hf", "--out", str(tmp_path / "taken")], capsys)
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    (tmp_path / "plain").mkdir()
    err = _refused(["export", str(tmp_path / "plain"), "--format", "hf", "--out", str(tmp_path / "o1")], capsys)
    assert "ukmp.json" in err
    # a BLIP-2 with a T5 language model: no format holds it yet
    from ukmp.io import save_pruned
    from ukmp.plan import PruningPlan

    model, proc = tiny
    save_pruned(model, PruningPlan.keep_all(adapter_for(model).groups()), tmp_path / "t5", processor=proc)
    for fmt in ("hf", "gguf"):
        err = _refused(["export", str(tmp_path / "t5"), "--format", fmt, "--out", str(tmp_path / "o2")], capsys)
        assert "blip-2" in err and "none yet" in err and "llama" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "t5", "taken"]
