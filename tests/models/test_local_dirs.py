"""The real loading path on locally saved models (what a hub download leaves on disk): ``save_pretrained`` of a
tiny build and its processor / tokenizer, then ``load_dense`` with that directory as ``model.source``. Logits must be
bit-identical (the same safetensors tensors)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ukmp.config import ModelConfig
from ukmp.models import forward_inputs
from ukmp.models.build import build_tiny
from ukmp.runtime import load_dense
from ukmp.testing import make_inputs


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-blip2-opt", "tiny-qwen2"])
def test_load_dense_from_a_saved_directory(name, tmp_path):
    model, processor = build_tiny(seed=5, name=name)
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    assert not list((tmp_path / "m").glob("*.bin"))  # safetensors only
    loaded, proc = load_dense(replace(ModelConfig(), source=str(tmp_path / "m"), device="cpu"))
    assert type(loaded) is type(model)
    assert type(proc).__name__ == type(processor).__name__ or hasattr(proc, "tokenizer") == hasattr(processor,
                                                                                                      "tokenizer")
    tok = getattr(proc, "tokenizer", proc)
    assert tok("a red circle")["input_ids"] == getattr(processor, "tokenizer", processor)("a red circle")["input_ids"]
    inputs = forward_inputs(model, make_inputs(model, seed=1))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
        other, _ = build_tiny(seed=6, name=name)
        assert not torch.equal(other(**inputs).logits, loaded(**inputs).logits)  # not vacuous


def test_missing_directory_is_one_line(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError, OSError)) as e:
        load_dense(replace(ModelConfig(), source=str(tmp_path / "nope"), device="cpu"))
    assert "\n" not in str(e.value)
