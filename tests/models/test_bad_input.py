"""Bad input is refused in one line that names the model type or the group, before anything is changed or written:
unregistered architectures, uneven KV groups, a plan that empties a layer's attention; the registry refuses
duplicate and empty names."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import Blip2Config, GPT2Config, LlamaConfig

from ukmp.cli import main
from ukmp.io import save_pruned
from ukmp.models import adapter_for, register_language_model, register_model
from ukmp.models.build import build_tiny, load_config, shipped_config_path
from ukmp.models.registry import LANGUAGE_MODELS, MODELS
from ukmp.plan import PlanError
from ukmp.testing import make_inputs, random_plan


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def _blip2_with_gpt2() -> Blip2Config:
    return Blip2Config(text_config=GPT2Config(n_layer=2, n_embd=32, n_head=2).to_dict())


def _uneven_llama() -> LlamaConfig:
    return LlamaConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=4, intermediate_size=64,
                       num_hidden_layers=2, vocab_size=64)


CASES = {  # name -> (config, words the message must contain)
    "gpt2": (lambda: GPT2Config(n_layer=2, n_embd=32, n_head=2), ["model_type 'gpt2'", "not supported"]),
    "blip2-gpt2": (_blip2_with_gpt2, ["blip-2", "language model type 'gpt2'", "not supported"]),
    "uneven-kv": (_uneven_llama, ["llama", "num_attention_heads 6", "num_key_value_heads 4"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_for_refuses_by_name(case):
    make, words = CASES[case]
    with pytest.raises(ValueError) as e:
        adapter_for(make())
    msg = _one_line(e)
    assert all(w in msg for w in words), msg


@pytest.mark.parametrize("case", list(CASES))
def test_load_config_refuses_a_json_file_by_name(case, tmp_path):
    make, words = CASES[case]
    path = tmp_path / f"{case}.json"
    path.write_text(json.dumps(make().to_dict()))
    with pytest.raises(ValueError) as e:
        load_config(path)
    msg = _one_line(e)
    assert str(path) in msg and all(w in msg for w in words), msg
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # nothing written


def test_load_config_accepts_the_supported_twins(tmp_path):
    """Not vacuous: the same routes accept a BLIP-2 with a Llama language model and evenly grouped heads."""
    good = LlamaConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, intermediate_size=64,
                       num_hidden_layers=2, vocab_size=64)
    path = tmp_path / "good.json"
    path.write_text(json.dumps(good.to_dict()))
    assert adapter_for(load_config(path)).groups()[0].n_units == 3
    d = json.loads(shipped_config_path("tiny-blip2-llama").read_text())
    path.write_text(json.dumps(d))
    assert adapter_for(load_config(path)).name == "blip2-llama"


def test_inspect_cli_refuses_in_one_line(tmp_path, capsys):
    path = tmp_path / "gpt2.json"
    path.write_text(json.dumps(GPT2Config(n_layer=2, n_embd=32, n_head=2).to_dict()))
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "gpt2" in err and "\n" not in err


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-blip2-opt"])
def test_plan_that_removes_every_kv_group_is_refused(name, tmp_path):
    model, _ = build_tiny(name=name, seed=0)
    adapter = adapter_for(model)
    groups = adapter.groups()
    plan = random_plan(groups, seed=0)
    plan.keep["lm.layers.0.attn"] = []
    inputs = make_inputs(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    counts = adapter.unit_counts(model)
    with torch.no_grad():
        dense = model(**inputs).logits
    with pytest.raises(PlanError) as e:
        adapter.apply_(model, plan)
    assert "'lm.layers.0.attn'" in _one_line(e) and "keeps nothing" in str(e.value)
    sd = model.state_dict()
    assert sd.keys() == before.keys() and all(torch.equal(sd[k], before[k]) for k in sd)  # unchanged
    assert adapter.unit_counts(model) == counts
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, dense)
    with pytest.raises(PlanError) as e:
        save_pruned(model, plan, tmp_path / "out")
    assert "'lm.layers.0.attn'" in _one_line(e)
    assert list(tmp_path.iterdir()) == []  # not even a temporary directory
    with pytest.raises(PlanError):
        with adapter.mask(model, plan):
            pass
    # not vacuous: the same plan with one group kept in that layer applies
    plan.keep["lm.layers.0.attn"] = [0]
    adapter.apply_(model, plan)
    assert adapter.unit_counts(model)["lm.layers.0.attn"] == 1


# ---------------------------------------------------------------------------------------------------- registry
def _factory(config):
    return SimpleNamespace(config=config)


@pytest.mark.parametrize("register, table, taken", [
    (register_model, MODELS, "llama"),
    (register_model, MODELS, "blip-2"),
    (register_language_model, LANGUAGE_MODELS, "opt"),
    (register_language_model, LANGUAGE_MODELS, "t5"),
])
def test_registry_refuses_duplicates_and_empty_names(register, table, taken):
    args = (_factory,) if register is register_model else ("llama", _factory)
    snapshot = dict(table)
    for bad in (taken, ""):
        with pytest.raises(ValueError) as e:
            register(bad, *args)
        msg = _one_line(e)
        assert repr(bad) in msg and "already registered" in msg
    assert table == snapshot  # nothing replaced
    # not vacuous: a new name is accepted once, then refused like the others
    new = "ukmp-test-registry"
    try:
        register(new, *args)
        assert new in table
        with pytest.raises(ValueError, match="already registered"):
            register(new, *args)
    finally:
        table.pop(new, None)
    assert table == snapshot


def test_registered_model_is_found_by_adapter_for():
    new = "ukmp-test-registry"
    try:
        register_model(new, _factory)
        cfg = SimpleNamespace(model_type=new)
        assert adapter_for(cfg).config is cfg
        assert adapter_for(SimpleNamespace(config=cfg)).config is cfg  # a model: its config is read
    finally:
        MODELS.pop(new, None)
    with pytest.raises(ValueError, match=new):
        adapter_for(SimpleNamespace(model_type=new))
