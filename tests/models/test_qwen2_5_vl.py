"""Qwen2.5-VL (windowed-attention ViT with a fused qkv + patch merger + Qwen2 GQA language model with M-RoPE), in
float64: sliced ≡ masked (eager and sdpa; windowed attention on; one-resolution 4-D batches and a native batch of two
images of different resolutions) with identical greedy generations, head 0 of a fused qkv removed as its three row
blocks, keep-all plans bit-identical, save → load identical, the last vision layer read (nothing to drop), ukmp's
4-D pixels packed exactly as the processor packs them, and the full-size configs counted as the meta build."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ukmp.models import adapter_for, count_parameters
from ukmp.models.build import build_model, load_config
from ukmp.models.qwen2_5_vl import pack_images
from ukmp.plan import PlanError, PruningPlan
from ukmp.testing import (check_keep_all_bit_identical, check_save_load_identical, float64_tiny, random_plan,
                          unpadded)

TOL = 1e-8  # float64; seen 0.0
N_NEW = 5
GEN = dict(max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, suppress_tokens=[0, 1],
           return_dict_in_generate=True, output_scores=True)


def _build(seed: int, impl: str = "sdpa"):
    return float64_tiny("tiny-qwen2.5-vl", seed, impl)


def _images(seed: int, sizes=((32, 32), (24, 40))) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in sizes]


def _native_batch(proc, seed: int) -> dict:
    """The processor's batch of two images of different resolutions (32 x 32: 8 x 8 patches, 16 image tokens;
    24 x 40: 6 x 10 patches, 15 image tokens), right-padded text, pixels in float64."""
    b = dict(proc(images=_images(seed), text=["<|image_pad|>a photo of", "<|image_pad|>what is in the"],
                  return_tensors="pt", padding=True))
    assert b["image_grid_thw"].tolist() == [[1, 8, 8], [1, 6, 10]]
    assert (b["input_ids"] == proc.image_token_id).sum(1).tolist() == [16, 15]
    b["pixel_values"] = b["pixel_values"].double()
    return b


def _windows(model, grid: torch.Tensor) -> int:
    """Number of attention windows the tower's windowed blocks use for ``grid``."""
    from transformers.vision_utils import get_vision_window_index

    v = model.model.visual
    _, cu = get_vision_window_index(grid, spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
                                    patch_size=v.patch_size)
    return len(cu) - 1


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_sliced_equals_masked_and_generations(impl):
    model, proc, inputs = _build(21, impl)
    assert model.model.visual.config._attn_implementation == impl
    adapter = adapter_for(model)
    assert [g.kind for g in adapter.groups()] == ["vit_heads", "vit_mlp"] * 4 + ["lm_heads", "lm_mlp"] * 2
    native = _native_batch(proc, 21)
    # windowed attention is on: blocks 0 and 2 attend within windows (4 per 32 x 32 image, 6 for 24 x 40)
    assert list(model.model.visual.fullatt_block_indexes) == [1, 3]
    assert _windows(model, native["image_grid_thw"]) == 4 + 6
    plan = random_plan(adapter.groups(), seed=21, force={"vit_heads": "one"})
    n0, bridge = count_parameters(model), adapter.parameter_breakdown(model)["bridge"]
    gen_inputs = unpadded(inputs)
    with torch.no_grad():
        dense, dense_nat = model(**inputs).logits, model(**native).logits
        dense_gen = model.generate(**gen_inputs, **GEN)
        visual = model.model.visual
        visual.fullatt_block_indexes = [0, 1, 2, 3]
        full = model(**native).logits  # every block attending to the whole image instead
        visual.fullatt_block_indexes = [1, 3]
        with adapter.mask(model, plan):
            masked, masked_nat = model(**inputs).logits, model(**native).logits
            masked_gen = model.generate(**gen_inputs, **GEN)
        removed = adapter.apply_(model, plan)
        sliced, sliced_nat = model(**inputs).logits, model(**native).logits
        sliced_gen = model.generate(**gen_inputs, **GEN)
    assert (full - dense_nat).abs().max().item() > 1e-3  # the windows matter
    for s, m, d in ((sliced, masked, dense), (sliced_nat, masked_nat, dense_nat)):
        assert (s - m).abs().max().item() <= TOL
        assert (m - d).abs().max().item() > 1e-3  # not vacuous
    assert torch.equal(sliced_gen.sequences, masked_gen.sequences) and len(sliced_gen.scores) == N_NEW
    s, m, d = (torch.stack(o.scores)[..., 2:] for o in (sliced_gen, masked_gen, dense_gen))
    assert (s - m).abs().max().item() <= TOL and (m - d).abs().max().item() > 1e-3
    # the model shrank by exactly the removed units; the merger (the bridge) is untouched
    assert count_parameters(model) == n0 - removed.numel() and removed.numel() == plan.removed_params(
        adapter.groups()) > 0
    assert adapter.parameter_breakdown(model)["bridge"] == bridge == 256 * 256 + 256 + 256 * 64 + 64 + 64
    assert [model.model.visual.blocks[i].attn.num_heads for i in range(4)] == [1] * 4
    fresh = adapter_for(model)
    assert fresh.unit_counts(model) == {g.id: len(plan.kept(g)) for g in fresh.groups()}


def test_removing_head_0_removes_its_q_k_and_v_row_blocks():
    """Head 0 of block 1 owns qkv rows [0, 16), [64, 80) and [128, 144) (q, k, v blocks of width 64, head_dim 16)
    and proj columns [0, 16); the first 3 * head_dim rows (q rows of heads 0-2) are not what goes."""
    model, _, inputs = _build(4)
    adapter = adapter_for(model)
    qkv = model.model.visual.blocks[1].attn.qkv
    w0, b0 = qkv.weight.detach().clone(), qkv.bias.detach().clone()
    p0 = model.model.visual.blocks[1].attn.proj.weight.detach().clone()
    keep = {g.id: list(range(g.n_units)) for g in adapter.groups()}
    keep["vision.layers.1.attn"] = [1, 2, 3]
    plan = PruningPlan(keep=keep, units={g.id: g.n_units for g in adapter.groups()})
    with torch.no_grad():
        with adapter.mask(model, plan):
            masked = model(**inputs).logits
        removed = adapter.apply_(model, plan)
        sliced = model(**inputs).logits
    rows = torch.cat([torch.arange(0, 16), torch.arange(64, 80), torch.arange(128, 144)])
    gone = removed["model.visual.blocks.1.attn.qkv"]
    assert gone.removed.tolist() == rows.tolist() != list(range(48))
    assert torch.equal(gone.weight, w0[rows]) and torch.equal(gone.bias, b0[rows])
    kept = torch.tensor([r for r in range(192) if r not in set(rows.tolist())])
    assert torch.equal(qkv.weight, w0[kept]) and torch.equal(qkv.bias, b0[kept]) and qkv.out_features == 144
    proj = model.model.visual.blocks[1].attn.proj
    assert removed["model.visual.blocks.1.attn.proj"].removed.tolist() == list(range(16))
    assert torch.equal(proj.weight, p0[:, 16:]) and model.model.visual.blocks[1].attn.num_heads == 3
    assert (sliced - masked).abs().max().item() <= TOL


def test_keep_all_is_bit_identical():
    model, _, inputs = _build(3)
    check_keep_all_bit_identical(model, inputs)


def test_save_load_round_trip(tmp_path):
    model, proc, inputs = _build(5)
    adapter = adapter_for(model)
    plan = random_plan(adapter.groups(), seed=5)
    adapter.apply_(model, plan)
    native = _native_batch(proc, 5)
    path, _ = check_save_load_identical(model, plan, proc, tmp_path / "p", [inputs, native], unpadded(inputs),
                                        GEN)
    from transformers import AutoProcessor

    loaded = AutoProcessor.from_pretrained(path)
    b = loaded(images=_images(5), text=["<|image_pad|>a photo of", "<|image_pad|>what is in the"],
               return_tensors="pt", padding=True)
    assert torch.equal(b["input_ids"], native["input_ids"]) and torch.equal(b["image_grid_thw"],
                                                                           native["image_grid_thw"])
    # a directory that names the stock processor class (as the hub's do) loads through ukmp's runtime, which
    # builds the processor without the torchvision-only video processor (AutoProcessor cannot, here)
    from ukmp.runtime import load_processor

    for f in path.glob("*config.json"):
        d = json.loads(f.read_text())
        if "processor_class" in d:
            f.write_text(json.dumps({**d, "processor_class": "Qwen2_5_VLProcessor"}))
    again_proc = load_processor(path)
    assert type(again_proc).__name__ == "Qwen2_5_VLImageTextProcessor" and again_proc.image_token_id == \
        proc.image_token_id


def test_four_d_pixels_are_packed_as_the_processor_packs_them():
    """ukmp's ``[B, 3, H, W]`` pixels become the processor's flat patches (same order: a wrong window or channel
    order would differ by O(1)), and the model gives the same logits either way, bit for bit."""
    model, proc, _ = _build(9)
    img = _images(9, sizes=((32, 32),))[0]
    b = proc(images=[img], text=["<|image_pad|>what is it?"], return_tensors="pt")
    arr = np.asarray(img, dtype=np.float32) / 255.0
    mean, std = np.array(proc.image_processor.image_mean), np.array(proc.image_processor.image_std)
    four = torch.from_numpy(((arr - mean) / std).transpose(2, 0, 1).astype(np.float32)).unsqueeze(0)
    flat, grid = pack_images(four, 4, 2, 2)
    assert torch.equal(grid, b["image_grid_thw"]) and flat.shape == b["pixel_values"].shape == (64, 96)
    assert (flat - b["pixel_values"]).abs().max().item() <= 1e-5  # float32 normalisation order
    pix = b["pixel_values"].double()
    four_exact = torch.zeros(1, 3, 32, 32, dtype=torch.float64)  # the processor's own numbers, unpacked
    four_exact.view(3, 4, 2, 4, 4, 2, 4).permute(1, 4, 2, 5, 0, 3, 6).copy_(
        pix.view(4, 4, 2, 2, 3, 2, 4, 4)[:, :, :, :, :, 0])
    with torch.no_grad():
        native = model(**{**b, "pixel_values": pix}).logits
        packed = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=four_exact).logits
        text = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.equal(native, packed) and (native - text).abs().max().item() > 1e-3  # images matter


def test_last_vision_layer_is_read_and_nothing_is_dropped():
    model, _, inputs = _build(7)
    adapter = adapter_for(model)
    assert adapter.unused_vision_layers() == [] and adapter.drop_unused(model) == {}
    with torch.no_grad():
        dense = model(**inputs).logits
        model.model.visual.blocks[3].mlp.down_proj.weight.mul_(100.0)
        assert (model(**inputs).logits - dense).abs().max().item() > 1e-3
    with pytest.raises(PlanError, match="no layers to drop"):
        adapter.apply_(model, PruningPlan(keep={}, drop_layers={"vision": {"keep": 3, "params": 1}}))


# name -> (LM: layers, KV groups, query heads per group, width, channels; total parameters of the meta build;
#          merger parameters)
FULL = {
    "qwen2.5-vl-3b": ((36, 2, 8, 2048, 11008), 3_754_622_976, 5120 * 5120 + 5120 + 5120 * 2048 + 2048 + 1280),
    "qwen2.5-vl-7b": ((28, 4, 7, 3584, 18944), 8_292_166_656, 5120 * 5120 + 5120 + 5120 * 3584 + 3584 + 1280),
}


@pytest.mark.parametrize("name", list(FULL))
def test_inspect_full_size_configs(name, capsys):
    """Qwen2.5-VL-3B (tied embeddings) and -7B: the 32-block ViT (1280 wide, 16 heads of 80, 3420 gated
    channels), the Qwen2 LM's units from the config, ``ukmp inspect --json`` totals equal to the meta build and to
    the published counts (3.75B, 8.29B), the merger the whole bridge, 256 image tokens at the 448 px read size."""
    from ukmp.cli import main

    (ll, kv, r, le, lm), total, bridge = FULL[name]
    assert main(["inspect", name, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    k = rep["group_kinds"]
    assert (k["vit_heads"]["layers"], k["vit_heads"]["units_per_layer"], k["vit_heads"]["params_per_unit"]) == (
        32, 16, 4 * 1280 * 80 + 3 * 80)
    assert (k["vit_mlp"]["layers"], k["vit_mlp"]["units_per_layer"], k["vit_mlp"]["params_per_unit"]) == (
        32, 3420, 3 * 1280 + 2)
    assert (k["lm_heads"]["layers"], k["lm_heads"]["units_per_layer"], k["lm_heads"]["params_per_unit"]) == (
        ll, kv, 2 * le * r * 128 + 2 * le * 128 + r * 128 + 2 * 128)
    assert (k["lm_mlp"]["layers"], k["lm_mlp"]["units_per_layer"], k["lm_mlp"]["params_per_unit"]) == (
        ll, lm, 3 * le)
    assert rep["unused_layers"] == {"vision": []}
    model = build_model(load_config(name), device="meta", seed=None)
    p = rep["parameters"]
    assert p["total"] == sum(t.numel() for t in model.parameters()) == sum(p["by_modality"].values()) == total
    assert p["by_modality"]["bridge"] == bridge
    assert adapter_for(model).batch_layout().image_tokens == 256


# ---------------------------------------------------------------------------------------------------- Qwen3-VL
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_qwen3_vl_sliced_equals_masked(impl):
    """Qwen3-VL under the same parts (its plain vision MLP; Qwen3 LM with per-head q/k norms): sliced ≡ masked on
    ukmp's 4-D batch and on a native batch of two resolutions, identical greedy tokens; the DeepStack mergers (fed
    by blocks 0 and 1, bridges, never pruned) reach the logits, and keep-all is bit-identical."""
    model, proc, inputs = float64_tiny("tiny-qwen3-vl", 31, impl)
    adapter = adapter_for(model)
    assert [g.kind for g in adapter.groups()] == ["vit_heads", "vit_mlp"] * 3 + ["lm_heads", "lm_mlp"] * 2
    assert adapter.groups()[1].slices[0].module == "model.visual.blocks.0.mlp.linear_fc1"
    assert adapter.unused_vision_layers() == [] and list(model.model.visual.deepstack_visual_indexes) == [0, 1]
    native = _native_batch(proc, 31)
    plan = random_plan(adapter.groups(), seed=31, force={"vit_heads": "one"})
    gen_inputs = unpadded(inputs)
    deep = model.model.visual.deepstack_merger_list[0].linear_fc2
    with torch.no_grad():
        dense, dense_nat = model(**inputs).logits, model(**native).logits
        saved = deep.weight.clone()
        deep.weight.zero_()
        assert (model(**inputs).logits - dense).abs().max().item() > 1e-3  # DeepStack reaches the logits
        deep.weight.copy_(saved)
        with adapter.mask(model, plan):
            masked, masked_nat = model(**inputs).logits, model(**native).logits
            masked_gen = model.generate(**gen_inputs, **GEN)
        n0 = count_parameters(model)
        removed = adapter.apply_(model, plan)
        sliced, sliced_nat = model(**inputs).logits, model(**native).logits
        sliced_gen = model.generate(**gen_inputs, **GEN)
    for s, m, d in ((sliced, masked, dense), (sliced_nat, masked_nat, dense_nat)):
        assert (s - m).abs().max().item() <= TOL and (m - d).abs().max().item() > 1e-3
    assert torch.equal(sliced_gen.sequences, masked_gen.sequences)
    assert count_parameters(model) == n0 - removed.numel() and removed.numel() > 0
    if impl == "sdpa":
        fresh, _, inputs = float64_tiny("tiny-qwen3-vl", 32, impl)
        check_keep_all_bit_identical(fresh, inputs)


# --------------------------------------------------------------------------- ukmp's collator: mixed resolutions
class _Images:
    """A two-sample caption dataset whose images are 32 x 32 and 40 x 24 (width x height)."""

    def __init__(self, seed: int):
        self.images = _images(seed, sizes=((32, 32), (24, 40)))
        self.records = [type("R", (), {"caption": c})() for c in ("a red circle on grass", "two blue squares")]

    def __len__(self) -> int:
        return 2

    def open_image(self, i: int) -> Image.Image:
        return self.images[i]


def test_collator_batches_two_resolutions():
    """The collator reads each image near its own aspect ratio (the processor's resize rule: the same grids), pads
    the pixels and says each size; the rows carry 16 and 15 image tokens; the padding never reaches the model; and
    sliced ≡ masked on that batch (windowed blocks, float64)."""
    from ukmp.data.batches import make_collator
    from ukmp.data.resolution import fit_size

    model, proc, _ = _build(41)
    adapter = adapter_for(model)
    layout = adapter.batch_layout()
    assert layout.native_resolution and layout.patch_size == 8 and layout.image_size == 32
    for h, w in ((32, 32), (24, 40), (50, 17), (100, 64), (9, 9)):  # ukmp's fit == the processor's resize
        img = Image.new("RGB", (w, h))
        grid = proc.image_processor(images=[img], return_tensors="pt")["image_grid_thw"][0].tolist()
        assert [1, *(s // 4 for s in fit_size(h, w, 8, 32 * 32, 64))] == grid, (h, w)
    collate = make_collator(_Images(41), proc, layout, max_text_tokens=8, augment=False, seed=0)
    batch = collate([0, 1])
    assert batch["image_sizes"].tolist() == [[32, 32], [24, 40]]
    assert tuple(batch["pixel_values"].shape) == (2, 3, 32, 40)
    assert (batch["input_ids"] == layout.image_token_id).sum(1).tolist() == [16, 15]
    assert collate.text_lengths(1)[0] == len(collate.prompt(collate.texts(1)[0], 15))
    batch["pixel_values"] = batch["pixel_values"].double()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    noisy = batch["pixel_values"].clone()
    noisy[0, :, :, 32:] = torch.randn(3, 32, 8, dtype=torch.float64)
    noisy[1, :, 24:, :] = torch.randn(3, 8, 40, dtype=torch.float64)
    plan = random_plan(adapter.groups(), seed=41)
    with torch.no_grad():
        dense = model(**inputs).logits
        assert torch.equal(model(**{**inputs, "pixel_values": noisy}).logits, dense)  # padding is cropped away
        with adapter.mask(model, plan):
            masked = model(**inputs).logits
        adapter.apply_(model, plan)
        sliced = model(**inputs).logits
    assert (sliced - masked).abs().max().item() <= TOL and (masked - dense).abs().max().item() > 1e-3


def test_family_tables_read_flat_hub_configs():
    """Hub configs of Qwen2.5-VL keep the language model's fields at the top level (no ``text_config``): the
    torch-free tables still know its language model, its tasks and its tiny build."""
    from ukmp.models import families

    flat = {"model_type": "qwen2_5_vl", "hidden_size": 3584, "vision_config": {"depth": 32}}
    assert families.model_types(flat) == ("qwen2_5_vl", "qwen2_5_vl_text")
    assert families.task_kinds(*families.model_types(flat)) == {"vqa", "gqa", "caption", "perplexity"}
    assert families.family_label(flat) == "Qwen2.5-VL"
    assert families.tiny_source("Qwen/Qwen2.5-VL-7B-Instruct") == "tiny-qwen2.5-vl"
    assert families.tiny_source("qwen2.5-vl-3b") == "tiny-qwen2.5-vl"
