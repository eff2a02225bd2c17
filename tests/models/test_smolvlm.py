"""SmolVLM (SigLIP vision tower + pixel-shuffle connector + Llama GQA language model): sliced ≡ masked in float64
(eager and sdpa) with identical greedy generations, keep-all plans bit-identical, save → load identical, the last
vision layer read (nothing to drop), one image per sample as 4-D or 5-D pixel values, Idefics3 under the same
adapter, and the tiny processor's prompt layout."""

from __future__ import annotations

import json

import pytest
import torch

from ukmp.models import adapter_for, count_parameters
from ukmp.models.build import build_model, config_from_dict, shipped_config_path
from ukmp.plan import PlanError, PruningPlan
from ukmp.testing import (check_keep_all_bit_identical, check_save_load_identical, float64_tiny, random_plan,
                          unpadded)

TOL = 1e-8  # float64, seen 0.0; vision "heads" of half the width (straddling two real heads) give 1.3e-4
N_NEW = 5
GEN = dict(max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, suppress_tokens=[0, 1],
           return_dict_in_generate=True, output_scores=True)


def _build(seed: int, impl: str = "sdpa"):
    return float64_tiny("tiny-smolvlm", seed, impl)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_sliced_equals_masked_and_generations(impl):
    model, _, inputs = _build(21, impl)
    adapter = adapter_for(model)
    assert [g.kind for g in adapter.groups()] == ["vit_heads", "vit_mlp"] * 2 + ["lm_heads", "lm_mlp"] * 2
    plan = random_plan(adapter.groups(), seed=21, force={"vit_heads": "one"})
    n0 = count_parameters(model)
    bridge = adapter.parameter_breakdown(model)["bridge"]
    gen_inputs = unpadded(inputs)
    with torch.no_grad():
        dense = model(**inputs).logits
        dense_gen = model.generate(**gen_inputs, **GEN)
        with adapter.mask(model, plan):
            masked = model(**inputs).logits
            masked_gen = model.generate(**gen_inputs, **GEN)
        removed = adapter.apply_(model, plan)
        sliced = model(**inputs).logits
        sliced_gen = model.generate(**gen_inputs, **GEN)
    assert (sliced - masked).abs().max().item() <= TOL
    assert (masked - dense).abs().max().item() > 1e-3  # not vacuous
    assert torch.equal(sliced_gen.sequences, masked_gen.sequences) and len(sliced_gen.scores) == N_NEW
    s, m, d = (torch.stack(o.scores)[..., 2:] for o in (sliced_gen, masked_gen, dense_gen))
    assert (s - m).abs().max().item() <= TOL and (m - d).abs().max().item() > 1e-3
    # the model shrank by exactly the removed units; the connector (the bridge) is untouched
    assert count_parameters(model) == n0 - removed.numel() and removed.numel() == plan.removed_params(
        adapter.groups()) > 0
    assert adapter.parameter_breakdown(model)["bridge"] == bridge == 64 * 4 * 64  # pixel shuffle 2x2, no bias
    fresh = adapter_for(model)
    assert fresh.unit_counts(model) == {g.id: len(plan.kept(g)) for g in fresh.groups()}


def test_keep_all_is_bit_identical():
    model, _, inputs = _build(3)
    check_keep_all_bit_identical(model, inputs)


def test_save_load_round_trip(tmp_path):
    model, proc, inputs = _build(5)
    adapter = adapter_for(model)
    plan = random_plan(adapter.groups(), seed=5)
    adapter.apply_(model, plan)
    path, _ = check_save_load_identical(model, plan, proc, tmp_path / "p", [inputs], unpadded(inputs), GEN)
    from transformers import AutoProcessor

    loaded = AutoProcessor.from_pretrained(path)
    assert loaded.image_seq_len == 4 and not loaded.image_processor.do_image_splitting


def test_last_vision_layer_is_read_and_nothing_is_dropped():
    """The connector reads the tower's last hidden state: no unused layer, a plan that drops one is refused, and
    the last layer's weights reach the logits (so there is nothing that could be dropped for free)."""
    model, _, inputs = _build(7)
    adapter = adapter_for(model)
    assert adapter.unused_vision_layers() == [] and adapter.drop_unused(model) == {}
    with torch.no_grad():
        dense = model(**inputs).logits
        model.model.vision_model.encoder.layers[1].mlp.fc2.weight.mul_(100.0)
        assert (model(**inputs).logits - dense).abs().max().item() > 1e-3
    with pytest.raises(PlanError, match="no layers to drop"):
        adapter.apply_(model, PruningPlan(keep={}, drop_layers={"vision": {"keep": 1, "params": 1}}))
    assert len(model.model.vision_model.encoder.layers) == 2


def test_one_image_per_sample_4d_equals_5d_and_the_processor_layout():
    """4-D pixel values (ukmp's batches) give the stock model's 5-D result bit for bit; the tiny processor writes
    ``<fake><global-img>`` + 4 image tokens + ``<fake>`` for one image without tiling, and the model reads it."""
    import numpy as np
    from PIL import Image

    model, proc, inputs = _build(9)
    with torch.no_grad():
        four = model(**inputs).logits
        five = model(**{**inputs, "pixel_values": inputs["pixel_values"].unsqueeze(1)}).logits
        text = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    assert torch.equal(four, five) and (four - text).abs().max().item() > 1e-3  # images matter
    img = Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype("uint8"))
    b = proc(images=[img], text=["<image>what is it?"], return_tensors="pt")
    toks = proc.tokenizer.convert_ids_to_tokens(b["input_ids"][0])
    assert toks[:7] == ["<fake_token_around_image>", "<global-img>"] + ["<image>"] * 4 + ["<fake_token_around_image>"]
    assert tuple(b["pixel_values"].shape) == (1, 1, 3, 32, 32)
    assert adapter_for(model).batch_layout().image_tokens == 4  # (32 / 8)^2 patches, 2 x 2 shuffled into one
    with torch.no_grad():
        assert model(**{k: (v.double() if v.is_floating_point() else v) for k, v in b.items()}).logits.shape[1] == len(
            toks)


def test_idefics3_shares_the_adapter():
    """An Idefics3 config of the same sizes builds a model with the same state-dict keys and shapes and the same
    groups; a Gemma language model is refused in one line."""
    d = json.loads(shipped_config_path("tiny-smolvlm").read_text())
    smol = build_model(config_from_dict(d), device="meta", seed=None)
    d["model_type"], d["vision_config"]["model_type"] = "idefics3", "idefics3_vision"
    ide = build_model(config_from_dict(d), device="meta", seed=None)
    assert type(ide).__name__ == "Idefics3SingleImage"
    shapes = {k: tuple(v.shape) for k, v in smol.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ide.state_dict().items()}
    assert adapter_for(ide).groups() == adapter_for(smol).groups()
    d["text_config"] = {"model_type": "gemma", "vocab_size": 192, "hidden_size": 64, "num_attention_heads": 4}
    with pytest.raises(ValueError) as e:
        config_from_dict(d, "cfg.json")
    assert "idefics3 with language model type 'gemma' is not supported" in str(e.value) and "\n" not in str(e.value)


# name -> (vision: layers, heads, head dim, width, MLP channels; LM: layers, KV groups, query heads per group, width,
#          channels; image tokens per image; total parameters of the meta build; the connector's projection)
FULL = {
    "smolvlm-256m": ((12, 12, 64, 768, 3072), (30, 3, 3, 576, 1536), 64, 256_484_928, 768 * 16 * 576),
    "smolvlm-2.2b": ((27, 16, 72, 1152, 4304), (24, 32, 1, 2048, 8192), 81, 2_246_784_880, 1152 * 9 * 2048),
}


@pytest.mark.parametrize("name", list(FULL))
def test_inspect_full_size_configs(name, capsys):
    """SmolVLM-256M (SigLIP-B/16 at 512 px + SmolLM2-135M, an Idefics3 checkpoint; untied lm_head) and
    SmolVLM2-2.2B (SigLIP so400m/14 at 384 px + SmolLM2-1.7B): units per kind from the config, ``ukmp inspect --json``
    totals equal to the meta build, the connector the whole bridge."""
    from ukmp.cli import main
    from ukmp.models.build import load_config

    (vl, vh, vhd, ve, vm), (ll, kv, r, le, lm), tokens, total, bridge = FULL[name]
    assert main(["inspect", name, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    k = rep["group_kinds"]
    assert (k["vit_heads"]["layers"], k["vit_heads"]["units_per_layer"], k["vit_heads"]["params_per_unit"]) == (
        vl, vh, 4 * ve * vhd + 3 * vhd)
    assert (k["vit_mlp"]["layers"], k["vit_mlp"]["units_per_layer"], k["vit_mlp"]["params_per_unit"]) == (
        vl, vm, 2 * ve + 1)
    assert (k["lm_heads"]["layers"], k["lm_heads"]["units_per_layer"], k["lm_heads"]["params_per_unit"]) == (
        ll, kv, 2 * le * r * 64 + 2 * le * 64)
    assert (k["lm_mlp"]["layers"], k["lm_mlp"]["units_per_layer"], k["lm_mlp"]["params_per_unit"]) == (
        ll, lm, 3 * le)
    assert rep["unused_layers"] == {"vision": []}  # the connector reads the last layer (LLaVA-1.5: [23])
    model = build_model(load_config(name), device="meta", seed=None)
    p = rep["parameters"]
    assert p["total"] == sum(t.numel() for t in model.parameters()) == sum(p["by_modality"].values()) == total
    assert p["by_modality"]["bridge"] == bridge
    assert adapter_for(model).batch_layout().image_tokens == tokens


def test_tiled_processor_batches_run_sliced_as_masked():
    """Image splitting on (the hub processors' default): the processor cuts each image into tiles plus the global
    image (here 2 x 2 tiles of 32 px for a 60 x 40 image, fewer for a 30 x 64 one, padded with
    ``pixel_attention_mask``) and writes the tile markers; the pruned model reads such a batch exactly as the masked
    dense model does (float64, ``TOL``), and the tiles matter (masked differs from dense by > 1e-3). ukmp's own
    batches use the untiled global image (``BatchLayout``), a mode the same processor supports."""
    import numpy as np
    from PIL import Image

    model, proc, _ = _build(11, "eager")
    ip = proc.image_processor
    ip.do_image_splitting, ip.size = True, {"longest_edge": 64}
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray((rng.random(s) * 255).astype("uint8")) for s in ((60, 40, 3), (30, 64, 3))]
    b = proc(images=[[imgs[0]], [imgs[1]]], text=["<image>what is it?", "<image>and this?"], return_tensors="pt",
             padding=True)
    assert tuple(b["pixel_values"].shape) == (2, 5, 3, 32, 32) and "pixel_attention_mask" in b  # 4 tiles + global
    b = {k: (v.double() if v.is_floating_point() else v) for k, v in b.items()}
    adapter = adapter_for(model)
    plan = random_plan(adapter.groups(), seed=11)
    with torch.no_grad():
        dense = model(**b).logits
        with adapter.mask(model, plan):
            masked = model(**b).logits
        adapter.apply_(model, plan)
        sliced = model(**b).logits
    assert (sliced - masked).abs().max().item() <= TOL
    assert (masked - dense).abs().max().item() > 1e-3  # not vacuous
