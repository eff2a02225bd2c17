"""``ukmp inspect`` on the shipped full-size decoder configs: unit counts from the config, a note saying what one
unit is, and parameter totals equal to the model transformers builds (on the meta device, no weights)."""

from __future__ import annotations

import pytest

from ukmp.inspect import format_inspect, inspect_model
from ukmp.io import save_pruned
from ukmp.models import adapter_for, count_parameters
from ukmp.models.build import build_model, build_tiny, load_config
from ukmp.testing import random_plan

# name -> {kind: (layers, units per layer, params per unit, unit note)}, params per unit by hand:
#   a KV group of r query heads (head dim hd, width E): q rows + o columns 2*E*r*hd, k and v rows 2*E*hd;
#   a gated MLP channel (gate, up rows + down column) 3*E; ViT head 4*E*hd + 3*hd (q/k/v biases);
#   OPT head 4*E*hd + 3*hd; ViT / OPT MLP channel 2*E + 1 (fc1 bias)
EXPECTED = {
    "llama-3-8b": {
        "lm_heads": (32, 8, 2 * 4096 * 4 * 128 + 2 * 4096 * 128, "KV group of 4 query heads"),
        "lm_mlp": (32, 14336, 3 * 4096, None),
    },
    "blip2-opt-2.7b": {
        "vit_heads": (39, 16, 4 * 1408 * 88 + 3 * 88, None),
        "vit_mlp": (39, 6144, 2 * 1408 + 1, None),
        "lm_heads": (32, 32, 4 * 2560 * 80 + 3 * 80, "one head (q, k, v rows and o columns)"),
        "lm_mlp": (32, 10240, 2 * 2560 + 1, None),
    },
    "smollm2-135m": {
        "lm_heads": (30, 3, 2 * 576 * 3 * 64 + 2 * 576 * 64, "KV group of 3 query heads"),
        "lm_mlp": (30, 1536, 3 * 576, None),
    },
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_inspect_full_size_decoder_configs(name):
    r = inspect_model(name)
    kinds = r["group_kinds"]
    assert list(kinds) == list(EXPECTED[name])
    for kind, (layers, units, per_unit, note) in EXPECTED[name].items():
        k = kinds[kind]
        assert (k["layers"], k["units_per_layer"], k["params_per_unit"]) == (layers, units, per_unit), kind
        assert k["units_total"] == k["units_kept"] == layers * units
        assert k["prunable_params"] == layers * units * per_unit
        assert k["unit_note"] == note
    model = build_model(load_config(name), device="meta", seed=None)
    p = r["parameters"]
    assert p["total"] == sum(t.numel() for t in model.parameters()) == sum(p["by_modality"].values())
    assert p["prunable"] == p["prunable_dense"] == sum(k["prunable_params"] for k in kinds.values())
    assert p["removed"] == 0 and not r["pruned"]
    text = format_inspect(r)
    for kind, (_, _, _, note) in EXPECTED[name].items():
        assert (f"{kind}: one unit = {note}" in text) == (note is not None)


def test_smollm2_totals_match_the_published_model():
    """SmolLM2-135M (tied embeddings): 134,515,008 parameters, 106,203,456 outside the 49,152 x 576 embeddings,
    of which all but the RMSNorm weights (2 per layer + the final one, 576 each) are prunable."""
    p = inspect_model("smollm2-135m")["parameters"]
    assert p["total"] == 134_515_008
    assert p["total"] - 49_152 * 576 == 106_203_456
    assert p["prunable"] == 106_203_456 - (2 * 30 + 1) * 576
    assert p["by_modality"]["language"] == p["total"]


def test_llama_3_8b_total():
    """Meta-Llama-3-8B: 8,030,261,248 parameters (untied 128,256 x 4096 embeddings and lm_head)."""
    p = inspect_model("llama-3-8b")["parameters"]
    assert p["total"] == 8_030_261_248
    assert p["not_prunable"] == 2 * 128_256 * 4096 + (2 * 32 + 1) * 4096


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-blip2-opt"])
def test_inspect_pruned_decoder_directory(name, tmp_path):
    model, _ = build_tiny(name=name, seed=4)
    adapter = adapter_for(model)
    groups = adapter.groups()
    plan = random_plan(groups, seed=4, force={"lm_heads": "one"})
    dense_total = count_parameters(model)
    adapter.apply_(model, plan)
    r = inspect_model(save_pruned(model, plan, tmp_path / "p"))
    k = r["group_kinds"]["lm_heads"]
    assert r["pruned"] and k["units_kept"] == k["layers"] < k["units_total"]  # one KV group / head per layer
    p = r["parameters"]
    assert p["total"] == count_parameters(model) and p["dense_total"] == dense_total
    assert p["removed"] == plan.removed_params(groups) == dense_total - p["total"] > 0


@pytest.mark.parametrize("name", ["blip2-flan-t5-xl", "blip2-opt-2.7b", "instructblip-flan-t5-xl",
                                  "instructblip-vicuna-7b", "llava-1.5-7b"])
def test_full_size_vlm_configs_place_their_image_tokens(name):
    """transformers 5 puts the query / patch features where ``input_ids == image_token_index``: every shipped
    full-size VLM config names that id, inside its language model's vocabulary (InstructBLIP-Vicuna-7B's config
    once had none: its first calibration batch failed at real width)."""
    config = load_config(name)
    image_id = getattr(config, "image_token_index", None)
    assert isinstance(image_id, int) and 0 <= image_id < config.text_config.vocab_size
