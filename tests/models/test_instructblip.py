"""InstructBLIP (BLIP-2's layout; the Q-Former also reads the prompt) with a T5 and a Vicuna-style Llama language
model: sliced ≡ masked in float64 (eager and sdpa) with identical greedy generations, keep-all plans bit-identical,
save → load identical, and ``inspect`` on the full-size configs against the meta-device build."""

from __future__ import annotations

import pytest
import torch

from ukmp.inspect import inspect_model
from ukmp.io import load_pruned, save_pruned
from ukmp.models import adapter_for, count_parameters
from ukmp.models.attention import HeadPrunedInstructBlipAttention
from ukmp.models.build import build_model, build_tiny, load_config
from ukmp.testing import check_keep_all_bit_identical, float64_tiny, random_plan

TOL = 1e-5  # float64: a statement about structure, not about summation order
N_NEW = 5
FAMILIES = ("tiny-instructblip-t5", "tiny-instructblip-llama")
GEN = dict(max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, suppress_tokens=[0, 1],
           return_dict_in_generate=True, output_scores=True)


def _build(name: str, seed: int, impl: str = "sdpa"):
    return float64_tiny(name, seed, impl)


def _gen_inputs(inputs: dict) -> dict:
    return {k: v if k != "attention_mask" else torch.ones_like(v) for k, v in inputs.items()
            if k != "decoder_input_ids"}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", FAMILIES)
def test_sliced_equals_masked_and_generations(name, impl):
    seed = 11 + FAMILIES.index(name)
    model, _, inputs = _build(name, seed, impl)
    adapter = adapter_for(model)
    assert adapter.batch_layout().qformer_text and "qformer_input_ids" in inputs
    groups = adapter.groups()
    plan = random_plan(groups, seed=seed, force={"vit_heads": "one"})
    gen_inputs = _gen_inputs(inputs)
    with torch.no_grad():
        dense = model(**inputs).logits
        dense_gen = model.generate(**gen_inputs, **GEN)
        with adapter.mask(model, plan):
            masked = model(**inputs).logits
            masked_gen = model.generate(**gen_inputs, **GEN)
        restored = model(**inputs).logits
        removed = adapter.apply_(model, plan)
        sliced = model(**inputs).logits
        sliced_gen = model.generate(**gen_inputs, **GEN)
        # the Q-Former really reads the prompt: another instruction changes the output
        other = dict(inputs, qformer_input_ids=inputs["qformer_input_ids"].roll(1, dims=1))
        assert (model(**other).logits - sliced).abs().max().item() > 10 * TOL  # tiny random Q-Former: a small effect
    assert torch.equal(restored, dense)
    assert (sliced - masked).abs().max().item() <= TOL
    assert (masked - dense).abs().max().item() > 1e3 * TOL  # not vacuous
    assert torch.equal(sliced_gen.sequences, masked_gen.sequences)
    assert len(sliced_gen.scores) == N_NEW
    s_scores, m_scores, d_scores = (torch.stack(o.scores)[..., 2:] for o in (sliced_gen, masked_gen, dense_gen))
    assert (s_scores - m_scores).abs().max().item() <= TOL
    assert (m_scores - d_scores).abs().max().item() > 1e3 * TOL  # not vacuous
    assert removed.numel() == plan.removed_params(groups) > 0
    assert adapter.unit_counts(model) == {g.id: len(plan.kept(g)) for g in groups}
    vit_attn = [model.get_submodule(adapter.attention_module(g)) for g in groups if g.kind == "vit_heads"]
    assert all(type(a) is HeadPrunedInstructBlipAttention and a.num_heads == 1 for a in vit_attn)


@pytest.mark.parametrize("name", FAMILIES)
def test_keep_all_is_bit_identical(name):
    model, _, inputs = _build(name, 3)
    check_keep_all_bit_identical(model, inputs)


@pytest.mark.parametrize("name", FAMILIES)
def test_save_load_round_trip(name, tmp_path):
    model, proc, inputs = _build(name, 5)
    adapter = adapter_for(model)
    plan = random_plan(adapter.groups(), seed=5)
    adapter.apply_(model, plan)
    with torch.no_grad():
        ref = model(**inputs).logits
    again = load_pruned(save_pruned(model, plan, tmp_path / "p", processor=proc))
    assert type(again) is type(model) and count_parameters(again) == count_parameters(model)
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():
        out = again(**inputs).logits
    assert (out - ref).abs().max().item() <= 1e-12  # up to BLAS kernel choice on the loaded buffer's alignment


# name -> {kind: (layers, units per layer, params per unit)}, by hand: ViT-g head 4*1408*88 + 3*88 (q/k/v biases),
# ViT MLP channel 2*1408 + 1; Vicuna head (MHA) 4*4096*128, gated MLP channel 3*4096; FlanT5-XL head 4*2048*64,
# gated FFN channel 3*2048
VIT = {"vit_heads": (39, 16, 4 * 1408 * 88 + 3 * 88), "vit_mlp": (39, 6144, 2 * 1408 + 1)}
EXPECTED = {
    "instructblip-vicuna-7b": {**VIT, "lm_heads": (32, 32, 4 * 4096 * 128), "lm_mlp": (32, 11008, 3 * 4096)},
    "instructblip-flan-t5-xl": {**VIT, "enc_heads": (24, 32, 4 * 2048 * 64), "enc_ffn": (24, 5120, 3 * 2048),
                                "dec_self_heads": (24, 32, 4 * 2048 * 64), "dec_cross_heads": (24, 32, 4 * 2048 * 64),
                                "dec_ffn": (24, 5120, 3 * 2048)},
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_inspect_full_size(name):
    r = inspect_model(name)
    kinds = r["group_kinds"]
    assert set(kinds) == set(EXPECTED[name])
    for kind, (layers, units, per_unit) in EXPECTED[name].items():
        k = kinds[kind]
        assert (k["layers"], k["units_per_layer"], k["params_per_unit"]) == (layers, units, per_unit), kind
    model = build_model(load_config(name), device="meta", seed=None)
    assert type(model).__name__ == "InstructBlipForConditionalGeneration"
    p = r["parameters"]
    assert p["total"] == sum(t.numel() for t in model.parameters()) == sum(p["by_modality"].values())
    assert p["prunable"] == sum(k["prunable_params"] for k in kinds.values())
    # the Q-Former (BERT-base size, vocabulary 30,523 and 512 positions) is a bridge: never pruned
    qformer = sum(t.numel() for t in model.qformer.parameters())
    assert model.qformer.embeddings.word_embeddings.weight.shape == (30523, 768)
    assert p["by_modality"]["bridge"] == qformer + model.query_tokens.numel() + sum(
        t.numel() for t in model.language_projection.parameters())


class _Captions:
    """A two-record caption dataset (``records[i].caption``, ``open_image(i)``) for the collators."""

    def __init__(self, size: int):
        from types import SimpleNamespace

        self.records = [SimpleNamespace(caption="a photo of a cat sitting on a red couch"),
                        SimpleNamespace(caption="two people riding bicycles down a city street")]
        self.size = size

    def __len__(self) -> int:
        return len(self.records)

    def open_image(self, i: int):
        from PIL import Image

        return Image.new("RGB", (self.size, self.size), (40 * i, 90, 200))


@pytest.mark.parametrize("name", FAMILIES)
def test_collator_gives_the_qformer_the_prompt(name):
    from ukmp.data.batches import make_collator

    model, proc = build_tiny(name=name, seed=0)
    layout = adapter_for(model).batch_layout()
    ds = _Captions(layout.image_size)
    collate = make_collator(ds, proc, layout, augment=False)
    batch = collate([0, 1])
    prompts = [collate.texts(i)[0] for i in (0, 1)]
    ref = proc.qformer_tokenizer(prompts, padding=True, return_tensors="pt")  # what InstructBlipProcessor gives
    assert torch.equal(batch["qformer_input_ids"], ref["input_ids"])
    assert torch.equal(batch["qformer_attention_mask"], ref["attention_mask"])
    assert batch["qformer_attention_mask"].sum(1).tolist() != [batch["qformer_input_ids"].shape[1]] * 2  # padded
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if not (layout.decoder_only and k == "labels")})
    blip2_proc = build_tiny(name="tiny-blip2-llama" if layout.decoder_only else "tiny", seed=0)[1]
    with pytest.raises(ValueError, match="qformer_tokenizer"):
        make_collator(ds, blip2_proc, layout)
