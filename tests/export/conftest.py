"""Pruned tiny causal LMs on disk, shared by the export tests (built once per session; never modified)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from ukmp.io import save_pruned
from ukmp.models import adapter_for
from ukmp.models.build import build_model, build_tiny, build_tokenizer, config_from_dict, shipped_config_path
from ukmp.plan import PruningPlan
from ukmp.testing import random_plan, randomize_biases_


def _mha(model_type: str):
    """A Llama / Mistral with one head per KV group and 6 heads of 16 in 96 channels: 5 kept heads do not divide
    96, which LlamaConfig refuses (snapped to 6) and MistralConfig accepts."""
    d = json.loads(shipped_config_path("tiny-llama").read_text())
    d.update(model_type=model_type, architectures=[f"{model_type.title()}ForCausalLM"], hidden_size=96,
             num_attention_heads=6, num_key_value_heads=6, head_dim=16)
    if model_type == "mistral":
        d["sliding_window"] = 64
    return build_model(config_from_dict(d), seed=5), build_tokenizer()  # a plain LM's "processor"


def _plan(adapter, model, case: str) -> PruningPlan:
    groups = adapter.groups()
    if case == "uniform":  # every layer keeps the same number of units (different ones)
        keep = {}
        for g in groups:
            n = g.n_units // 2
            keep[g.id] = list(range(g.layer % 2, g.n_units, 2))[:n]
        return PruningPlan(keep=keep, units={g.id: g.n_units for g in groups})
    plan = random_plan(groups, seed=3)
    if case in ("llava", "llava_64"):  # LLaVA's last vision layer never reaches the output: dropped outright
        plan.drop_layers = adapter.drop_unused(model)
        keep = plan.drop_layers["vision"]["keep"]
        plan.keep = {k: v for k, v in plan.keep.items() if not any(k.startswith(f"vision.layers.{i}.")
                                                                   for i in range(keep, adapter.vision.n_layers))}
    if case == "llava_64":  # a CLIP MLP of exactly hidden_size channels (llama.cpp's legacy swap check)
        plan.keep["vision.layers.0.mlp"] = list(range(0, 128, 2))
    if case == "five_heads":  # the widest attention keeps 5 of 6 heads
        plan.keep["lm.layers.0.attn"] = [0, 1, 2, 4, 5]
        plan.keep["lm.layers.1.attn"] = [3]
    return plan


def _llava_deep():
    """A tiny LLaVA with 3 CLIP layers: reading hidden state -2, it keeps 2, pruned to different widths."""
    model, processor = build_tiny(name="tiny-llava", seed=6)
    cfg = copy.deepcopy(model.config)
    cfg.vision_config.num_hidden_layers = 3
    return build_model(cfg, seed=9), processor


CASES = {  # name -> (builder, plan case)
    "llama": (lambda: build_tiny(name="tiny-llama", seed=1), "random"),
    "qwen2": (lambda: build_tiny(name="tiny-qwen2", seed=2), "random"),
    "llama_snap": (lambda: _mha("llama"), "five_heads"),
    "mistral": (lambda: _mha("mistral"), "five_heads"),
    "llama_uniform": (lambda: build_tiny(name="tiny-llama", seed=4), "uniform"),
    "llava": (lambda: build_tiny(name="tiny-llava", seed=6), "llava"),  # CLIP heads and MLP + a GQA Llama
    "llava_deep": (_llava_deep, "llava"),  # two CLIP layers read: widths differ per layer (mmproj padding)
    "llava_64": (_llava_deep, "llava_64"),  # the same, its first CLIP MLP keeping 64 = hidden_size channels
}


def _make_pruned(root, case: str, dtype=torch.float64):
    """(pruned model, tokenizer or processor, its directory, dense model) of one case, in ``dtype``."""
    build, plan_case = CASES[case]
    dense, tok = build()
    dense = dense.to(dtype)
    randomize_biases_(dense, 7)
    model = copy.deepcopy(dense)
    adapter = adapter_for(model)
    plan = _plan(adapter, model, plan_case)
    adapter.apply_(model, plan)
    path = root / f"{case}_{str(dtype).removeprefix('torch.')}"
    save_pruned(model, plan, path, processor=tok)
    return model.eval(), tok, path, dense.eval()


@pytest.fixture(scope="session")
def pruned_lms(tmp_path_factory):
    """{case: (pruned model, tokenizer, directory, dense model)} in float64."""
    root = tmp_path_factory.mktemp("pruned")
    return {case: _make_pruned(root, case) for case in CASES}


def byte_level_bpe():
    """A byte-level BPE tokenizer (GPT-2 / SmolLM2 style) of 300 tokens trained now, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a photo of a cat sitting on a red couch", "a dog running on the green grass",
                             "order 12345 of 67890"] * 4,
                            trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def bpe_pruned(tmp_path_factory):
    """(pruned tiny Llama of 320 tokens, its byte-level BPE tokenizer, its directory)."""
    d = json.loads(shipped_config_path("tiny-llama").read_text())
    d["vocab_size"] = 320
    model = build_model(config_from_dict(d), seed=8)
    adapter = adapter_for(model)
    plan = random_plan(adapter.groups(), seed=8)
    adapter.apply_(model, plan)
    tok = byte_level_bpe()
    path = tmp_path_factory.mktemp("bpe") / "pruned"
    save_pruned(model, plan, path, processor=tok)
    return model, tok, path


@pytest.fixture(scope="session")
def make_pruned():
    """``make_pruned(root, case, dtype)``: one case built on demand (another dtype)."""
    return _make_pruned


@pytest.fixture(scope="session")
def image_features():
    """``image_features(llava, pixels)``: the projector's output for one image (transformers' own
    ``get_image_features``), one row per image token."""
    def features(model, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = model.get_image_features(pixel_values=pixels)
        out = getattr(out, "pooler_output", out)
        out = out[0] if isinstance(out, (list, tuple)) else out
        return out.reshape(-1, out.shape[-1])

    return features
