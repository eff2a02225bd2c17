"""LLaVA (CLIP vision tower + MLP projector + Llama GQA language model): sliced ≡ masked in float64 (eager and sdpa)
with identical greedy generations, the unused vision layers dropped outright with bit-identical logits, keep-all
plans bit-identical, save → load identical (plan version 2 with ``drop_layers``), ``inspect`` on LLaVA-1.5-7B."""

from __future__ import annotations

import json

import pytest
import torch

from ukmp.inspect import format_inspect, inspect_model
from ukmp.io import load_pruned, save_pruned
from ukmp.models import adapter_for, count_parameters
from ukmp.models.build import build_model, build_tiny, load_config
from ukmp.plan import PlanError, PruningPlan
from ukmp.testing import check_keep_all_bit_identical, float64_tiny, random_plan, unpadded

TOL = 1e-5  # float64: a statement about structure, not about summation order
N_NEW = 5
GEN = dict(max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, suppress_tokens=[0, 1],
           return_dict_in_generate=True, output_scores=True)


def _build(seed: int, impl: str = "sdpa"):
    return float64_tiny("tiny-llava", seed, impl)


def _plan(adapter, model, seed: int, drop: bool = True) -> PruningPlan:
    """Random units over the layers that stay, plus (``drop``) the unused vision layers removed outright."""
    unused = {f"vision.layers.{i}." for i in adapter.unused_vision_layers()}
    groups = [g for g in adapter.groups() if not any(g.id.startswith(u) for u in unused)]
    plan = random_plan(groups, seed=seed, force={"vit_heads": "one"})
    if drop:
        plan.drop_layers = adapter.drop_unused(model)
    return plan


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_sliced_equals_masked_and_generations(impl):
    model, _, inputs = _build(21, impl)
    adapter = adapter_for(model)
    assert adapter.unused_vision_layers() == [1]  # vision_feature_layer -2 of 2 layers: the last never counts
    plan = _plan(adapter, model, 21)
    n0 = count_parameters(model)
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
    assert (masked - dense).abs().max().item() > 1e3 * TOL  # not vacuous
    assert torch.equal(sliced_gen.sequences, masked_gen.sequences) and len(sliced_gen.scores) == N_NEW
    s, m, d = (torch.stack(o.scores)[..., 2:] for o in (sliced_gen, masked_gen, dense_gen))
    assert (s - m).abs().max().item() <= TOL and (m - d).abs().max().item() > 1e3 * TOL
    # the model shrank by the removed units and the dropped layer; every dependent attribute followed
    assert count_parameters(model) == n0 - removed.numel() - plan.dropped_params()
    assert removed.numel() == plan.removed_params(adapter.groups()) > 0 and plan.dropped_params() > 0
    assert len(model.model.vision_tower.encoder.layers) == model.config.vision_config.num_hidden_layers == 1
    assert model.config.vision_feature_layer == 1  # absolute now: hidden state after layer 0
    fresh = adapter_for(model)
    assert fresh.unused_vision_layers() == [] and fresh.unit_counts(model) == {
        g.id: len(plan.kept(g)) for g in fresh.groups()}


def test_dropping_unused_layers_alone_is_bit_identical():
    model, _, inputs = _build(22)
    adapter = adapter_for(model)
    plan = PruningPlan(keep={}, drop_layers=adapter.drop_unused(model))
    n0 = count_parameters(model)
    last = model.model.vision_tower.encoder.layers[1]
    with torch.no_grad():
        dense = model(**inputs).logits
        for p in last.parameters():  # not vacuous: the layer is there and its weights are big, yet unread
            p.mul_(100.0)
        assert torch.equal(model(**inputs).logits, dense)
        adapter.apply_(model, plan)
        after = model(**inputs).logits
    assert torch.equal(after, dense)
    assert plan.dropped_params() == sum(p.numel() for p in last.parameters()) > 0
    assert count_parameters(model) == n0 - plan.dropped_params()
    fresh, _ = build_tiny(name="tiny-llava", seed=0)
    with pytest.raises(PlanError, match="drop_layers"):  # keeping no layer at all
        adapter_for(fresh).apply_(fresh, PruningPlan(keep={}, drop_layers={"vision": {"keep": 0, "params": 0}}))
    fresh.config.vision_feature_layer = -1  # now the last layer is read: dropping it is refused
    with pytest.raises(PlanError, match="reads hidden state 2"):
        adapter_for(fresh).apply_(fresh, plan)
    assert len(fresh.model.vision_tower.encoder.layers) == 2  # refused before anything changed


def test_keep_all_is_bit_identical():
    model, _, inputs = _build(3)
    check_keep_all_bit_identical(model, inputs)


def test_save_load_round_trip(tmp_path):
    model, proc, inputs = _build(5)
    adapter = adapter_for(model)
    plan = _plan(adapter, model, 5)
    adapter.apply_(model, plan)
    with torch.no_grad():
        ref = model(**inputs).logits
    path = save_pruned(model, plan, tmp_path / "p", processor=proc)
    d = json.loads((path / "plan.json").read_text())
    assert d["version"] == 2 and d["drop_layers"] == plan.drop_layers
    again = load_pruned(path)
    assert count_parameters(again) == count_parameters(model)
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():
        out = again(**inputs).logits
    assert (out - ref).abs().max().item() <= 1e-12  # up to BLAS kernel choice on the loaded buffer's alignment
    r = inspect_model(path)
    assert r["dropped_layers"] == plan.drop_layers
    assert r["parameters"]["dense_total"] == count_parameters(_build(5)[0])  # units + dropped layer counted
    d["version"] = 1
    with pytest.raises(PlanError, match="drop_layers"):
        PruningPlan.from_dict(d)


def test_inspect_llava_1_5_7b():
    """CLIP ViT-L/14-336 (24 layers x 16 heads of 64, 4,096 MLP channels; the last layer unused) and Vicuna-7B
    (32 x 32 heads of 128, 11,008 channels); totals equal the meta-device build (7,063,427,072)."""
    r = inspect_model("llava-1.5-7b")
    k = r["group_kinds"]
    E, hd, H = 1024, 64, 4096
    assert (k["vit_heads"]["layers"], k["vit_heads"]["units_per_layer"]) == (24, 16)
    assert k["vit_heads"]["params_per_unit"] == 4 * E * hd + 3 * hd
    assert (k["vit_mlp"]["layers"], k["vit_mlp"]["units_per_layer"], k["vit_mlp"]["params_per_unit"]) == (
        24, 4096, 2 * E + 1)
    assert (k["lm_heads"]["layers"], k["lm_heads"]["units_per_layer"]) == (32, 32)
    assert k["lm_heads"]["params_per_unit"] == 4 * H * 128
    assert (k["lm_mlp"]["layers"], k["lm_mlp"]["units_per_layer"], k["lm_mlp"]["params_per_unit"]) == (
        32, 11008, 3 * H)
    assert r["unused_layers"] == {"vision": [23]}
    assert "vision layers [23] never reach the output" in format_inspect(r)
    model = build_model(load_config("llava-1.5-7b"), device="meta", seed=None)
    p = r["parameters"]
    assert p["total"] == sum(t.numel() for t in model.parameters()) == sum(p["by_modality"].values())
    assert p["total"] == 7_063_427_072
    # the projector 1024 -> 4096 -> 4096 (with biases) is the bridge
    assert p["by_modality"]["bridge"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert adapter_for(model).batch_layout().image_tokens == 576  # (336 / 14)^2 patches, CLS dropped


def test_perplexity_on_text_alone(tmp_path):
    """Perplexity reads the whole LLaVA model on text (its ``language_model`` has no ``lm_head``): the NLL equals a
    hand computation from the base Llama's hidden states and ``lm_head``, to 1e-9 in float64."""
    from ukmp.data.loaders import load_dataset
    from ukmp.data.sample import write_sample_text
    from ukmp.eval.perplexity import evaluate_perplexity

    model, proc, _ = _build(8)
    ds = load_dataset(write_sample_text(tmp_path, window=16))
    metrics, records = evaluate_perplexity(model, proc, ds, batch_size=2, progress=False)
    start, ids = ds.windows(proc.tokenizer)[0]
    x = torch.tensor([ids])
    with torch.no_grad():
        h = model.model.language_model(input_ids=x).last_hidden_state
        nll = torch.nn.functional.cross_entropy(model.lm_head(h)[0, :-1], x[0, 1:])
    assert start == 0 and abs(records[0]["nll"] - nll.item()) <= 1e-9
    assert metrics["tokens"] > 0 and torch.isfinite(torch.tensor(metrics["perplexity"]))


@pytest.mark.parametrize("name, text_type, needle", [
    ("llava-tiny.json", "opt", "llava with language model type 'opt' is not supported"),
    ("instructblip-llama-tiny.json", "gpt2", "instructblip with language model type 'gpt2' is not supported"),
])
def test_unsupported_language_models_are_refused_in_one_line(name, text_type, needle):
    from ukmp.models.build import config_from_dict, shipped_config_path

    d = json.loads(shipped_config_path("tiny-llava").parent.joinpath(name).read_text())
    d["text_config"] = {"model_type": text_type, "vocab_size": 192, "hidden_size": 64, "num_attention_heads": 4}
    with pytest.raises(ValueError) as e:
        config_from_dict(d, "cfg.json")
    assert needle in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("cfg.json: ")


def test_distillation_blocks_skip_unused_layers():
    """Teacher (dense) and student (unused layers dropped) supervise the same vision blocks: with 3 vision layers
    and ``vision_feature_layer`` -2, the even block 2 is unused and leaves the list (not vacuous: it was a block)."""
    from ukmp.models.build import config_from_dict, shipped_config_path

    d = json.loads(shipped_config_path("tiny-llava").read_text())
    d["vision_config"]["num_hidden_layers"] = 3
    model = build_model(config_from_dict(d), seed=0)
    adapter = adapter_for(model)
    assert adapter.unused_vision_layers() == [2] and [b.index for b in adapter.vision.feature_blocks()] == [0, 2]
    teacher = [(b.family, b.index, b.path) for b in adapter.feature_blocks()]
    adapter.apply_(model, PruningPlan(keep={}, drop_layers=adapter.drop_unused(model)))
    student = [(b.family, b.index, b.path) for b in adapter_for(model).feature_blocks()]
    assert teacher == student and ("vision", 0, "model.vision_tower.encoder.layers.0") in student
