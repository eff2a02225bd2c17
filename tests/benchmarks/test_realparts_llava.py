"""The real-weights LLaVA (benchmarks/realparts/build_llava.py): DINOv2 in a SigLIP shell converted exactly but for
the class token, on synthetic weights; the assembled LLaVA loads in ukmp and prunes (sliced ≡ masked, the unused
vision layers dropped); the training rows are the evaluator's own prompt ids; the shared-prefix training forward
equals the stock forward."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "realparts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

convert = importlib.import_module("convert")
llava_parts = importlib.import_module("llava_parts")
llava_train = importlib.import_module("llava_train")
synthetic_dinov2 = importlib.import_module("test_realparts").synthetic_dinov2
SIZE = 28  # 2 x 2 patches of 14 px (the synthetic 3 x 3 position table interpolated)


@pytest.mark.unit
def test_siglip_shell_is_the_exact_conversion_less_the_class_token():
    """Tolerance 1e-5 absolute (float32, outputs of max |x| ~ 3): the shell's embeddings are the exact conversion's
    patch rows, and each of its layers and its final LayerNorm compute the exact conversion's on the same input.
    Not vacuous: the two towers' final patch outputs differ by more than 1e-2 (the class token is attended to)."""
    w = synthetic_dinov2()
    shell, exact = llava_parts.vision_tower(w, SIZE), convert.build_vision_model(w, SIZE)
    pix = np.random.default_rng(0).random((2, SIZE, SIZE, 3), dtype=np.float32)
    x = torch.from_numpy(convert.normalise(pix, convert.CLIP_MEAN, convert.CLIP_STD))
    with torch.no_grad():
        assert (shell.embeddings(x) - exact.embeddings(x)[:, 1:]).abs().max() <= 1e-5
        h = torch.randn(2, 4, 128)
        for a, b in zip(shell.encoder.layers, exact.encoder.layers, strict=True):
            ya, yb = a(h, None), b(h)
            ya, yb = (y[0] if isinstance(y, tuple) else y for y in (ya, yb))
            assert (ya - yb).abs().max() <= 1e-5
        assert (shell.post_layernorm(h) - exact.post_layernorm(h)).abs().max() <= 1e-5
        ours = shell(pixel_values=x).last_hidden_state
        full = exact(pixel_values=x).last_hidden_state[:, 1:]
    assert (ours - full).abs().max() > 1e-2
    dev = llava_parts.cls_deviation(w, x, SIZE, [0, 2])
    assert dev["0"]["min_cosine"] > 0.99999 and dev["2"]["mean_cosine"] < 0.9999


def tiny_llava(feature_layer: int = 1):
    """The build's assembly on a synthetic DINOv2 (2 layers, width 128) and a tiny tied Llama whose vocabulary is
    its on-the-fly tokenizer's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ukmp.models.build import build_tiny

    _, tok = build_tiny(name="tiny-llama", seed=0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                                      eos_token_id=tok.eos_token_id))
    return llava_parts.assemble(synthetic_dinov2(), lm, tok, SIZE, feature_layer, seed=0)


@pytest.mark.unit
def test_assembled_llava_loads_in_ukmp_and_sliced_equals_masked():
    """float64, tolerance 1e-5 (a statement about structure). Not vacuous: the masked logits differ from the dense
    ones by more than 1e-2; the plan drops the unused vision layer (the LM reads hidden state 1 of 2)."""
    from ukmp.models import adapter_for
    from ukmp.testing import make_inputs, random_plan, randomize_biases_

    model, processor = tiny_llava()
    model = model.double()
    randomize_biases_(model, 0)
    adapter = adapter_for(model)
    assert adapter.name == "llava-llama" and adapter.image_tokens() == 4 and adapter.unused_vision_layers() == [1]
    assert adapter.batch_layout().image_mean is None  # CLIP's mean/std: what the patch convolution is folded for
    groups = [g for g in adapter.groups() if not g.id.startswith("vision.layers.1.")]
    plan = random_plan(groups, seed=3, force={"vit_heads": "one"})
    plan.drop_layers = adapter.drop_unused(model)
    inputs = make_inputs(model, seed=3)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    with torch.no_grad():
        dense = model(**inputs).logits
        with adapter.mask(model, plan):
            masked = model(**inputs).logits
        adapter.apply_(model, plan)
        sliced = model(**inputs).logits
    assert (sliced - masked).abs().max() <= 1e-5
    assert (masked - dense).abs().max() > 1e-2
    assert len(model.model.vision_tower.encoder.layers) == 1


@pytest.mark.unit
def test_training_rows_are_the_evaluators_prompts_and_the_shared_prefix_forward_is_the_models(sample_data):
    """The rows' prompt part equals what ukmp's VQA evaluator builds (``PromptIds`` in the style it resolves for
    this model and dataset: the chat template); the answer ends with the end-of-sequence token; the shared-prefix
    forward's logits equal the stock forward on whole rows (1e-4, float32)."""
    from ukmp.data.images import ImageTransform
    from ukmp.data.loaders import load_dataset
    from ukmp.data.prompts import PromptIds, dataset_style
    from ukmp.eval.text import vqa_prompt
    from ukmp.models import adapter_for

    model, processor = tiny_llava()
    layout = adapter_for(model).batch_layout()
    ds = load_dataset(sample_data["okvqa"], max_samples=6)
    style = dataset_style(ds, processor, model.config, "okvqa")
    assert style == "template"
    rows = llava_train.Rows(ds, processor, layout)
    evaluator = PromptIds(processor, layout, style)
    for i, r in enumerate(ds.records[:6]):
        k = rows.images.index(r.image)
        q = [j for j, rr in enumerate(x for x in ds.records if x.image == r.image) if rr is r][0]
        prompt = evaluator(vqa_prompt(r.question))
        full = rows.full_ids(k, q)
        assert full[: len(prompt)] == prompt and full[-1] == processor.tokenizer.eos_token_id
        assert len(full) > len(prompt) + 1  # the answer is there
    transform = ImageTransform.for_layout(layout)
    pixels = torch.stack([transform(ds.open_image(i)) for i in rows.first])
    feats = llava_parts.features(model, pixels, 1)
    picks = [(k, q) for k in range(len(rows.images)) for q in range(len(rows.by_image[k]))][:5]
    assert llava_train.check_forward(model, rows, feats, pixels, picks) <= 1e-4


@pytest.mark.unit
def test_whitening_whitens_and_folds_exactly_into_the_projector():
    """Without the ridge the whitened features have the identity covariance (1e-3, float32); with it no direction
    grows past unit variance (1e-4). The projector's first Linear with the whitening folded in gives on raw features
    what it gave on whitened ones (1e-4). Not vacuous: the raw covariance is far from the identity (> 1)."""
    build_llava = importlib.import_module("build_llava")
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(64, 9, 16, generator=g) @ torch.randn(16, 16, generator=g) + 3.0
    mu, white = build_llava.whitening(feats, ridge=0.0)
    x = ((feats - mu) @ white).reshape(-1, 16)
    assert (torch.cov(x.T) - torch.eye(16)).abs().max() < 1e-3
    mu, white = build_llava.whitening(feats)
    x = ((feats - mu) @ white).reshape(-1, 16)
    assert torch.linalg.eigvalsh(torch.cov(x.T)).max() <= 1 + 1e-4
    assert (torch.cov(feats.reshape(-1, 16).T) - torch.eye(16)).abs().max() > 1.0
    lin = torch.nn.Linear(16, 8)
    with torch.no_grad():
        before = lin((feats - mu) @ white)
        build_llava.fold_whitening(lin, mu, white)
        assert (lin(feats) - before).abs().max() <= 1e-4
