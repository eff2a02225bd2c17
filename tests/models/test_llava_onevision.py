"""LLaVA-OneVision (SigLIP tower + MLP projector + Qwen2 GQA language model, AnyRes tiling): on batches of the
image-and-text processor holding two images of different sizes (two AnyRes grids, 36 and 52 image tokens), sliced ≡
masked in float64 (eager and sdpa) with identical greedy generations; keep-all bit-identical; save → load identical
(the processor too); one tower-size image as 4-D pixels ≡ the processor's 5-D batch; a config that reads an earlier
vision layer drops the later ones as LLaVA-1.5; ``ukmp inspect`` on the full-size configs equals the meta build."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ukmp.models import adapter_for, count_parameters
from ukmp.models.build import build_model, config_from_dict, shipped_config_path
from ukmp.plan import PruningPlan
from ukmp.testing import (check_keep_all_bit_identical, check_save_load_identical, float64_tiny,
                          random_plan)

TOL = 1e-8  # float64: sliced and masked differ only in summation order (seen 0.0 in both)
N_NEW = 5
GEN = dict(max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, suppress_tokens=[0, 1],
           return_dict_in_generate=True, output_scores=True)
# a ChatML-style template (the released processors use Qwen2's ChatML turns with <image> before the text)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
          "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SIZES = ((32, 32), (40, 70))  # (height, width): the 1 x 1 grid of the 32 px tower, and the 1 x 2 grid


def _images(seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in SIZES]


def _batch(proc, seed: int, side: str = "right") -> dict:
    """Two prompts, two images of different sizes, padded on ``side`` (generation needs the left: it appends after
    the last column)."""
    b = proc(images=_images(seed), text=["<image>what is in the picture?", "<image>a photo of"],
             return_tensors="pt", padding=True, padding_side=side)
    out = {k: v for k, v in b.items() if k != "batch_num_images"}
    out["pixel_values"] = out["pixel_values"].double()
    return out


def _build(seed: int, impl: str = "sdpa"):
    model, proc, _ = float64_tiny("tiny-llava-onevision", seed, impl)
    return model, proc, _batch(proc, seed)


def test_processor_tiles_two_sizes_as_the_model_counts():
    """By hand (p = 32 / 8 = 4 patches a side): the 32 x 32 image is its resized copy and one equal tile,
    16 + 16 + 4 row ends = 36 tokens, the batch layout's count; the 40 x 70 one fits the 64 x 64 grid best (2 x 2
    tiles, 8 x 8 features), whose rows outside the image's aspect are cut (int(40 * 8 / 70) = 4 of 8 kept): 16 +
    4 x 8 + 4 row ends = 52. The processor writes these counts and the model places exactly that many features
    (it refuses any other count); the first image's patch axis is zero-padded to the second's 5."""
    model, proc, batch = _build(1)
    image_id = model.config.image_token_id
    counts = (batch["input_ids"] == image_id).sum(1).tolist()
    assert counts == [adapter_for(model).batch_layout().image_tokens, 52] and counts[0] == 36
    assert batch["image_sizes"].tolist() == [list(s) for s in SIZES]
    pv = batch["pixel_values"]
    assert tuple(pv.shape[:2]) == (2, 5) and torch.equal(pv[0, 0], pv[0, 1])  # 1 x 1 grid: tile == whole image
    assert not pv[0, 2:].any() and pv[1].abs().sum((1, 2, 3)).min() > 0
    with torch.no_grad():
        logits = model(**batch).logits
        text = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape[:2] == batch["input_ids"].shape and (logits - text).abs().max().item() > 1e-3


def _generate(model, proc, impl: str):
    """Greedy tokens and scores for both samples: one left-padded batch (sdpa); one sample at a time for eager,
    where transformers 5.24 turns a float64 row with no visible key (a left pad) into NaN (its float32 softmax
    makes float64's mask value -inf)."""
    if impl == "sdpa":
        out = model.generate(**_batch(proc, 21, "left"), **GEN)
        return out.sequences, torch.stack(out.scores)
    seqs, scores = [], []
    for i in range(len(SIZES)):
        one = {k: v[i: i + 1] for k, v in _batch(proc, 21).items()}
        n = int(one["attention_mask"].sum())
        one = {k: (v[:, :n] if k in ("input_ids", "attention_mask") else v) for k, v in one.items()}
        out = model.generate(**one, **GEN)
        seqs.append(out.sequences[0, n:])
        scores.append(torch.stack(out.scores))
    return torch.stack(seqs), torch.cat(scores, dim=1)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_sliced_equals_masked_and_generations(impl):
    model, proc, inputs = _build(21, impl)
    adapter = adapter_for(model)
    assert [g.kind for g in adapter.groups()] == ["vit_heads", "vit_mlp"] * 2 + ["lm_heads", "lm_mlp"] * 2
    assert adapter.unused_vision_layers() == []  # vision_feature_layer -1: the last layer is read
    plan = random_plan(adapter.groups(), seed=21, force={"vit_heads": "one"})
    n0 = count_parameters(model)
    bridge = adapter.parameter_breakdown(model)["bridge"]
    with torch.no_grad():
        dense = model(**inputs).logits
        dense_gen = _generate(model, proc, impl)
        with adapter.mask(model, plan):
            masked = model(**inputs).logits
            masked_gen = _generate(model, proc, impl)
        removed = adapter.apply_(model, plan)
        sliced = model(**inputs).logits
        sliced_gen = _generate(model, proc, impl)
    assert (sliced - masked).abs().max().item() <= TOL
    assert (masked - dense).abs().max().item() > 1e-3  # not vacuous
    assert torch.equal(sliced_gen[0], masked_gen[0]) and sliced_gen[0].shape[-1] >= N_NEW
    s, m, d = (g[1][..., 2:] for g in (sliced_gen, masked_gen, dense_gen))
    assert s.shape[:2] == (N_NEW, 2) and (s - m).abs().max().item() <= TOL and (m - d).abs().max().item() > 1e-3
    # the model shrank by exactly the removed units; the projector and image_newline (the bridge) are untouched
    assert count_parameters(model) == n0 - removed.numel() and removed.numel() == plan.removed_params(
        adapter.groups()) > 0
    assert adapter.parameter_breakdown(model)["bridge"] == bridge == 2 * (64 * 64 + 64) + 64
    fresh = adapter_for(model)
    assert fresh.unit_counts(model) == {g.id: len(plan.kept(g)) for g in fresh.groups()}


def test_keep_all_is_bit_identical():
    model, _, inputs = _build(3)
    check_keep_all_bit_identical(model, inputs)


def test_save_load_round_trip(tmp_path):
    from ukmp.models.llava_onevision import OnevisionImageTextProcessor
    from ukmp.runtime import load_processor

    model, proc, inputs = _build(5)
    adapter = adapter_for(model)
    plan = random_plan(adapter.groups(), seed=5)
    adapter.apply_(model, plan)
    proc.chat_template = CHATML  # a chat template travels with the processor (no video processor needed)
    path, again = check_save_load_identical(model, plan, proc, tmp_path / "p", [inputs], _batch(proc, 5, "left"),
                                            GEN)
    assert again.lm_head.weight is again.model.language_model.embed_tokens.weight  # still tied (Qwen2-0.5B is)
    loaded = load_processor(path)  # the adapter's loader: AutoProcessor wants a video processor (torchvision)
    assert type(loaded) is OnevisionImageTextProcessor
    b2 = _batch(loaded, 5)
    assert all(torch.equal(b2[k], inputs[k]) for k in inputs)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]
    assert loaded.apply_chat_template(conv, add_generation_prompt=True) == (
        "<|im_start|>user\n<image>\nwhat is it?<|im_end|>\n<|im_start|>assistant\n")


def test_one_tower_size_image_4d_equals_the_processor_batch():
    """ukmp's batches (4-D pixels of one 32 x 32 image per sample, no image_sizes) give the processor's 5-D
    batch's logits bit for bit; another size as 4-D pixels is refused in one line."""
    model, proc, _ = _build(9)
    img = _images(9)[0]
    b = proc(images=[img, img], text=["<image>what is it?", "<image>a photo of"], return_tensors="pt",
             padding=True)
    five = {k: v for k, v in b.items() if k != "batch_num_images"}
    five["pixel_values"] = five["pixel_values"].double()
    four = {k: v for k, v in five.items() if k != "image_sizes"}
    four["pixel_values"] = five["pixel_values"][:, 0]
    with torch.no_grad():
        a, c = model(**five).logits, model(**four).logits
    assert torch.equal(a, c)
    bad = {**four, "pixel_values": torch.zeros(2, 3, 40, 40, dtype=torch.float64)}
    with pytest.raises(ValueError) as e, torch.no_grad():
        model(**bad)
    assert "must be 32 x 32" in str(e.value) and "\n" not in str(e.value)


def test_an_earlier_feature_layer_drops_the_later_vision_layers():
    """A config that reads the second-last vision layer (as LLaVA-1.5): the last layer is unused, a plan's
    drop_layers removes it, the logits do not move, and the feature layer becomes absolute."""
    d = json.loads(shipped_config_path("tiny-llava-onevision").read_text())
    d["vision_feature_layer"] = -2
    model = build_model(config_from_dict(d), seed=0, dtype=torch.float64)
    adapter = adapter_for(model)
    assert adapter.unused_vision_layers() == [1]
    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ids = torch.full((2, 40), 5)
    ids[:, :36] = model.config.image_token_id
    with torch.no_grad():
        dense = model(pixel_values=img, input_ids=ids).logits
        adapter.apply_(model, PruningPlan(keep={}, drop_layers=adapter.drop_unused(model)))
        after = model(pixel_values=img, input_ids=ids).logits
    assert torch.equal(after, dense) and len(model.model.vision_tower.encoder.layers) == 1
    assert model.config.vision_feature_layer == 1


@pytest.mark.parametrize("field, value, needle", [
    ("image_grid_pinpoints", [[32, 64], [64, 32]], "lack [32, 32]"),
    ("vision_feature_select_strategy", "default", "vision_feature_select_strategy 'default' is not supported"),
])
def test_configs_it_cannot_read_are_refused_in_one_line(field, value, needle):
    d = json.loads(shipped_config_path("tiny-llava-onevision").read_text())
    d[field] = value
    with pytest.raises(ValueError) as e:
        config_from_dict(d, "cfg.json")
    assert str(e.value).startswith("cfg.json: ") and needle in str(e.value) and "\n" not in str(e.value)


# name -> (LM: layers, KV groups, query heads per group, width, channels, head dim; total parameters of the meta
#          build; the bridge: projector + image_newline)
FULL = {
    "llava-onevision-qwen2-0.5b": ((24, 2, 7, 896, 4864, 64), 893_675_552,
                                   1152 * 896 + 896 + 896 * 896 + 896 + 896),
    "llava-onevision-qwen2-7b": ((28, 4, 7, 3584, 18944, 128), 8_030_807_584,
                                 1152 * 3584 + 3584 + 3584 * 3584 + 3584 + 3584),
}


@pytest.mark.parametrize("name", list(FULL))
def test_inspect_full_size_configs(name, capsys):
    """SigLIP so400m/14 at 384 px (26 layers, the last read) + Qwen2-0.5B (tied embeddings, vocabulary 152,000) or
    Qwen2-7B (untied, 152,128): units per kind from the config, ``ukmp inspect --json`` totals equal to the meta
    build, 2 * 27^2 + 27 = 1,485 image tokens for one 384 px image."""
    from ukmp.cli import main
    from ukmp.models.build import load_config

    (ll, kv, r, le, lm, hd), total, bridge = FULL[name]
    assert main(["inspect", name, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    k = rep["group_kinds"]
    assert (k["vit_heads"]["layers"], k["vit_heads"]["units_per_layer"], k["vit_heads"]["params_per_unit"]) == (
        26, 16, 4 * 1152 * 72 + 3 * 72)
    assert (k["vit_mlp"]["layers"], k["vit_mlp"]["units_per_layer"], k["vit_mlp"]["params_per_unit"]) == (
        26, 4304, 2 * 1152 + 1)
    assert (k["lm_heads"]["layers"], k["lm_heads"]["units_per_layer"], k["lm_heads"]["params_per_unit"]) == (
        ll, kv, 2 * le * r * hd + 2 * le * hd + (r * hd + 2 * hd))  # Qwen2: q, k, v biases
    assert (k["lm_mlp"]["layers"], k["lm_mlp"]["units_per_layer"], k["lm_mlp"]["params_per_unit"]) == (
        ll, lm, 3 * le)
    assert rep["unused_layers"] == {"vision": []}
    model = build_model(load_config(name), device="meta", seed=None)
    p = rep["parameters"]
    assert p["total"] == sum(t.numel() for t in model.parameters()) == sum(p["by_modality"].values()) == total
    assert p["by_modality"]["bridge"] == bridge
    assert adapter_for(model).batch_layout().image_tokens == 1485
    assert 0 <= model.config.image_token_id < model.config.text_config.vocab_size
