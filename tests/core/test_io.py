import json
import pickle

import pytest
import torch
from transformers import Blip2ForConditionalGeneration

from ukmp.io import load_pruned, save_pruned
from ukmp.models import adapter_for
from ukmp.models.build import load_model
from ukmp.testing import make_inputs, random_plan


@pytest.fixture
def pruned(tiny):
    model, processor = tiny
    adapter = adapter_for(model)
    plan = random_plan(adapter.groups(), seed=3)
    adapter.apply_(model, plan)
    return model, processor, plan


def _forbid_pickle(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("pickle used while loading")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)


def test_save_load_round_trip_identical_logits_without_pickle(tmp_path, pruned, monkeypatch):
    model, processor, plan = pruned
    inputs = make_inputs(model)
    with torch.no_grad():
        ref = model(**inputs).logits
    path = save_pruned(model, plan, tmp_path / "p", processor=processor)
    names = {p.name for p in path.iterdir()}
    assert {"ukmp.json", "plan.json", "config.json", "model.safetensors"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    _forbid_pickle(monkeypatch)
    again = load_pruned(path)
    assert type(again) is Blip2ForConditionalGeneration
    with torch.no_grad():
        out = again(**inputs).logits
    assert torch.equal(out, ref)
    gen = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    tokens = again.generate(**gen, max_new_tokens=4, min_new_tokens=4, suppress_tokens=[0, 1], do_sample=False)
    assert tokens.shape == (2, 5)
    # the tied embeddings stay tied; lm_head stays separate (FlanT5)
    lm = again.language_model
    assert lm.encoder.embed_tokens.weight is lm.shared.weight and lm.lm_head.weight is not lm.shared.weight


def test_load_pruned_dtype_keeps_fp32_modules(tmp_path, pruned):
    model, processor, plan = pruned
    path = save_pruned(model, plan, tmp_path / "p")
    m = load_pruned(path, dtype="bfloat16")
    assert m.language_model.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.bfloat16
    assert m.language_model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert m.query_tokens.dtype == torch.float32


def test_save_is_atomic(tmp_path, pruned):
    model, processor, plan = pruned
    target = tmp_path / "p"
    save_pruned(model, plan, target)
    before = sorted(p.name for p in target.iterdir())

    class Broken:
        def save_pretrained(self, d):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_pruned(model, plan, target, processor=Broken())
    assert sorted(p.name for p in target.iterdir()) == before  # the previous artifact is intact
    assert [p.name for p in tmp_path.iterdir()] == ["p"]  # no temporary directory left behind
    load_pruned(target)


def test_save_rejects_a_plan_that_does_not_match(tmp_path, pruned):
    model, _, plan = pruned
    other = random_plan(adapter_for(model).groups(), seed=99)
    with pytest.raises(ValueError, match="pass the plan that was applied"):
        save_pruned(model, other, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_load_pruned_errors_name_the_file(tmp_path, pruned):
    model, _, plan = pruned
    with pytest.raises(FileNotFoundError, match="ukmp.json"):
        load_pruned(tmp_path)
    path = save_pruned(model, plan, tmp_path / "p")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pruned(path)
    path = save_pruned(model, plan, tmp_path / "q")
    d = json.loads((path / "plan.json").read_text())
    first = next(iter(d["keep"]))
    d["keep"][first] = d["keep"][first][:-1] or [0, 1]
    (path / "plan.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="plan digest"):
        load_pruned(path)


def test_load_model_from_local_directory(tmp_path, tiny, monkeypatch):
    """The real loading path (hub id or directory) on a locally saved model, offline and pickle-free."""
    model, processor = tiny
    model.save_pretrained(tmp_path / "dense")
    processor.save_pretrained(tmp_path / "dense")
    inputs = make_inputs(model)
    with torch.no_grad():
        ref = model(**inputs).logits
    _forbid_pickle(monkeypatch)
    loaded = load_model(tmp_path / "dense", attn_implementation="eager")
    with torch.no_grad():
        out = loaded(**inputs).logits
    assert (out - ref).abs().max().item() <= 1e-4  # eager vs sdpa kernels: summation order only
    assert loaded.language_model.lm_head.weight is not loaded.language_model.shared.weight
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.gguf: no such GGUF file"):  # a GGUF needs no config.json
        load_model(tmp_path, gguf_file="model.gguf")


def test_out_bias_modules_are_created_and_reload(tmp_path, tiny):
    """A plan may give output projections a bias (FLAP compensation); the pruned model reloads with it."""
    model, _ = tiny
    adapter = adapter_for(model)
    plan = random_plan(adapter.groups(), seed=4)
    o = "language_model.encoder.block.0.layer.0.SelfAttention.o"
    wo = "language_model.decoder.block.1.layer.2.DenseReluDense.wo"
    plan.out_bias = [o, wo]
    adapter.apply_(model, plan)
    with torch.no_grad():
        model.get_submodule(o).bias.fill_(0.25)
        model.get_submodule(wo).bias.fill_(-0.5)
    inputs = make_inputs(model)
    with torch.no_grad():
        ref = model(**inputs).logits
    path = save_pruned(model, plan, tmp_path / "p")
    again = load_pruned(path)
    assert again.get_submodule(o).bias.shape == (model.config.text_config.d_model,)
    assert torch.equal(again.get_submodule(wo).bias, model.get_submodule(wo).bias)
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, ref)
    bad = random_plan(adapter.groups(), seed=4)
    bad.out_bias = ["language_model.encoder.block.0.layer.0.SelfAttention.q"]
    from ukmp.plan import PlanError

    with pytest.raises(PlanError, match="out_bias"):
        bad.validate(adapter.groups())
