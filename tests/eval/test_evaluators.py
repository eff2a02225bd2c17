"""Model-driven evaluators on the tiny random BLIP-2 and the sample data: VQA, captioning and retrieval."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from ukmp.data.images import ImageTransform
from ukmp.data.loaders import load_dataset
from ukmp.data.sample import write_sample_data
from ukmp.eval.evaluators import encoder_inputs, evaluate_caption, evaluate_vqa, image_batch, strip_prompt
from ukmp.eval.metrics import recall_at_k
from ukmp.eval.retrieval import (
    build_tiny_retrieval,
    evaluate_retrieval,
    image_features,
    itc_similarity,
    itm_scores,
    load_retrieval_model,
    rerank_topk,
    text_features,
    tokenize_texts,
    transplant_vision_,
)
from ukmp.eval.text import blip_question
from ukmp.models import adapter_for
from ukmp.models.build import build_tiny
from ukmp.testing import random_plan

TOL = 1e-5  # float32 agreement between two routes through the same modules


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample_data(tmp_path_factory.mktemp("sample"), n_images=6)


@pytest.fixture(scope="module")
def tiny_model():
    return build_tiny(seed=0)


def _finite_numbers(scores: dict, keys) -> None:
    for key in keys:
        assert key in scores, key
        assert isinstance(scores[key], (int, float)) and math.isfinite(scores[key]), (key, scores[key])


# --------------------------------------------------------------------------------------------------------- VQA
@pytest.mark.integration
@pytest.mark.parametrize(("name", "kind"), [("okvqa", "vqa"), ("gqa", "gqa")])
def test_vqa_end_to_end(tiny_model, sample, name, kind):
    model, processor = tiny_model
    ds = load_dataset(sample[name])
    scores, preds = evaluate_vqa(model, processor, ds, kind=kind, image_size=32, batch_size=4, progress=False)
    _finite_numbers(scores, ["accuracy", "count"])
    assert 0.0 <= scores["accuracy"] <= 100.0
    assert scores["count"] == len(ds) == len(preds)
    assert [p["question_id"] for p in preds] == [r.question_id for r in ds]
    assert all(set(p) == {"question_id", "question", "answer"} and isinstance(p["answer"], str) for p in preds)


@pytest.mark.integration
def test_vqa_predictions_do_not_depend_on_batch_size(tiny_model, sample):
    model, processor = tiny_model
    ds = load_dataset(sample["gqa"])  # two questions of different token lengths per image: batches need padding
    prompts = [f"Question: {blip_question(r.question)} Short answer:" for r in ds.records[:3]]
    _, mask = encoder_inputs(processor.tokenizer, prompts, model.config.num_query_tokens,
                             model.config.image_token_index)
    assert (mask == 0).any(), "non-vacuous: a batch of 3 is padded"
    kw = dict(kind="gqa", image_size=32, max_samples=6, progress=False)
    _, one = evaluate_vqa(model, processor, ds, batch_size=1, **kw)
    _, three = evaluate_vqa(model, processor, ds, batch_size=3, **kw)
    assert [p["answer"] for p in one] == [p["answer"] for p in three]  # exact string equality


@pytest.mark.integration
def test_vqa_interpolates_position_embeddings_and_restores_train_mode(tiny_model, sample):
    model, processor = tiny_model
    ds = load_dataset(sample["vqav2"])
    model.train()
    try:
        scores, preds = evaluate_vqa(model, processor, ds, image_size=48, batch_size=4, max_samples=4,
                                     progress=False)
        assert model.training and model.vision_model.training  # mode restored after the evaluation
    finally:
        model.eval()
    assert scores["count"] == len(preds) == 4
    with pytest.raises(ValueError, match="kind"):
        evaluate_vqa(model, processor, ds, kind="okvqa", image_size=32, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_vqa(model, processor, ds, image_size=32, batch_size=0, progress=False)


# ----------------------------------------------------------------------------------------------------- captions
@pytest.mark.integration
def test_caption_end_to_end(tiny_model, sample):
    model, processor = tiny_model
    ds = load_dataset(sample["nocaps"])
    scores, preds = evaluate_caption(model, processor, ds, image_size=32, batch_size=3, max_samples=3,
                                     spice=False, progress=False)
    _finite_numbers(scores, ["cider", "bleu_4", "meteor", "rouge_l", "bleu_1", "count"])
    assert scores["count"] == len(preds) == 3
    assert [p["image_id"] for p in preds] == [r.image_id for r in ds.records[:3]]
    # min_new_tokens=8: every caption has at least 8 generated tokens
    assert all(len(processor.tokenizer(p["caption"], add_special_tokens=False)["input_ids"]) >= 8 for p in preds)


def test_strip_prompt():
    assert strip_prompt("a photo of a red circle", "a photo of") == "a red circle"
    assert strip_prompt("A Photo Of  a cat ", "a photo of") == "a cat"
    assert strip_prompt("a red circle", "a photo of") == "a red circle"  # non-vacuous: no echo, unchanged


# ---------------------------------------------------------------------------------------------------- retrieval
def _ranking_case(n_img: int = 5, per_img: int = 2, seed: int = 0):
    """ITC and ITM matrices [I, T] where the true pairs win: ITC puts them in the top 3, ITM makes them first."""
    g = torch.Generator().manual_seed(seed)
    n_txt = n_img * per_img
    txt2img = [t // per_img for t in range(n_txt)]
    img2txt = [list(range(i * per_img, (i + 1) * per_img)) for i in range(n_img)]
    truth = torch.zeros(n_img, n_txt)
    truth[torch.tensor(txt2img), torch.arange(n_txt)] = 1.0
    itc = 0.1 * torch.rand(n_img, n_txt, generator=g) + 0.5 * truth  # true pairs high ...
    for i in range(n_img):  # ... but a decoy (the next image's first text) beats them in both directions
        itc[i, ((i + 1) % n_img) * per_img] = 0.9
    itm = torch.randn(n_img, n_txt, generator=g) + 10.0 * truth
    return itc, itm, txt2img, img2txt


def _recall(itc, itm, txt2img, img2txt, k):
    i2t = rerank_topk(itc, k, lambda q, idx: itm[q, idx])
    t2i = rerank_topk(itc.t(), k, lambda q, idx: itm.t()[q, idx])
    return i2t, t2i, recall_at_k(i2t.numpy(), txt2img, img2txt, sim_t2i=t2i.numpy())


@pytest.mark.unit
def test_rerank_topk_perfect_and_shuffled():
    itc, itm, txt2img, img2txt = _ranking_case()
    i2t, t2i, r = _recall(itc, itm, txt2img, img2txt, k=4)
    assert abs(r["txt_r1"] - 100.0) < 1e-9 and abs(r["img_r1"] - 100.0) < 1e-9, r
    assert torch.isfinite(i2t).sum(dim=1).tolist() == [4] * itc.shape[0]  # exactly k finite per query
    assert torch.isfinite(t2i).sum(dim=1).tolist() == [4] * itc.shape[1]
    top = itc.topk(4, dim=1).indices
    expected = itm.gather(1, top) + itc.gather(1, top)
    assert torch.allclose(i2t.gather(1, top), expected, atol=1e-6)  # ITM + ITC inside the top k
    # ITC alone does not rank perfectly, so the re-ranking is what made R@1 = 100
    itc_only = recall_at_k(itc.numpy(), txt2img, img2txt)
    assert itc_only["txt_r1"] < 100.0 and itc_only["img_r1"] < 100.0, itc_only
    perm = torch.randperm(itc.shape[1], generator=torch.Generator().manual_seed(1))
    _, _, shuffled = _recall(itc[:, perm], itm[:, perm], txt2img, img2txt, k=4)
    assert shuffled["txt_r1"] < 100.0 and shuffled["img_r1"] < 100.0, shuffled


@pytest.mark.unit
def test_rerank_topk_ignores_itm_outside_top_k():
    itc, itm, _, _ = _ranking_case()
    huge = itm.clone()
    low = itc.argmin(dim=1)  # each row's worst ITC candidate is never in the top k
    huge[torch.arange(itc.shape[0]), low] = 1e6
    out = rerank_topk(itc, 3, lambda q, idx: huge[q, idx])
    assert torch.isinf(out[torch.arange(itc.shape[0]), low]).all()
    assert torch.isfinite(rerank_topk(itc, 100, lambda q, idx: huge[q, idx])).all()  # k capped at n: all kept


@pytest.fixture(scope="module")
def tiny_retrieval(tiny_model):
    return build_tiny_retrieval(tiny_model[0].config, seed=0)


@pytest.mark.integration
def test_features_match_transformers_forward(tiny_retrieval, sample):
    model, tok = tiny_retrieval
    ds = load_dataset(sample["flickr30k"])
    ids, mask = tokenize_texts(tok, ds.texts[:3], 35)
    assert (ids[:, 0] == tok.cls_token_id).all() and int(ids.max()) < model.config.qformer_config.vocab_size
    pix = image_batch(ds, [0, 1, 2], ImageTransform(32))
    with torch.no_grad():
        itc_ref = model(pixel_values=pix, input_ids=ids, attention_mask=mask).logits_per_image
        itm_ref = model(pixel_values=pix, input_ids=ids, attention_mask=mask,
                        use_image_text_matching_head=True).logits_per_image[:, 1]
    vit, feats = image_features(model, pix)
    itc = itc_similarity(feats, text_features(model, ids, mask))
    assert torch.allclose(itc, itc_ref, atol=TOL), (itc - itc_ref).abs().max()
    itm = itm_scores(model, vit, ids, mask)
    assert torch.allclose(itm, itm_ref, atol=TOL), (itm - itm_ref).abs().max()
    with torch.no_grad():  # non-vacuous: the scores really come from the ITM head (class-1 bias moves them by 0.5)
        model.itm_head.bias[1] += 0.5
        moved = itm_scores(model, vit, ids, mask)
        model.itm_head.bias[1] -= 0.5
    assert torch.allclose(moved - itm, torch.full_like(itm, 0.5), atol=1e-5)
    assert not torch.allclose(moved, itm_ref, atol=TOL)


@pytest.mark.integration
def test_retrieval_end_to_end(tiny_retrieval, sample):
    model, tok = tiny_retrieval
    ds = load_dataset(sample["flickr30k"])
    scores, details = evaluate_retrieval(model, tok, ds, image_size=48, k_test=4, batch_size=4, itm_batch_size=3,
                                         max_samples=5, progress=False)
    keys = [f"{d}_r{k}" for d in ("txt", "img") for k in (1, 5, 10)] + ["txt_r_mean", "img_r_mean", "r_mean"]
    _finite_numbers(scores, keys)
    n_txt = sum(len(t) for t in ds.img2txt[:5])
    assert details["itc"].shape == (5, n_txt) and details["score_t2i"].shape == (n_txt, 5)
    assert torch.isfinite(details["score_i2t"]).sum(dim=1).tolist() == [4] * 5
    assert torch.isfinite(details["score_t2i"]).sum(dim=1).tolist() == [4] * n_txt


@pytest.mark.integration
def test_transplant_pruned_vision_changes_itc(tiny_retrieval, sample):
    gen, _ = build_tiny(seed=1)
    retrieval = copy.deepcopy(tiny_retrieval[0])
    tok = tiny_retrieval[1]
    ds = load_dataset(sample["flickr30k"])
    kw = dict(image_size=32, k_test=3, batch_size=6, progress=False)
    _, before = evaluate_retrieval(retrieval, tok, ds, **kw)
    # the generation model's ViT with the retrieval model's own weights: the transplant alone changes nothing
    gen.vision_model.load_state_dict(retrieval.vision_model.state_dict())
    transplant_vision_(retrieval, gen)
    assert retrieval.vision_model is gen.vision_model
    _, dense = evaluate_retrieval(retrieval, tok, ds, **kw)
    assert (dense["itc"] - before["itc"]).abs().max() <= 1e-7
    # prune the generation model (its ViT is shared): ITC similarities move
    adapter = adapter_for(gen)
    adapter.apply_(gen, random_plan(adapter.groups(), seed=3))
    vc, layers = gen.config.vision_config, gen.vision_model.encoder.layers
    assert sum(layer.mlp.fc1.out_features for layer in layers) < len(layers) * vc.intermediate_size
    scores, pruned = evaluate_retrieval(retrieval, tok, ds, **kw)
    assert (pruned["itc"] - before["itc"]).abs().max() > 1e-5  # random weights: ITC varies only ~1e-3
    assert all(np.isfinite(v) for v in scores.values())


def test_transplant_rejects_another_vision_config(tiny_retrieval):
    gen, _ = build_tiny(seed=0)
    gen.config.vision_config.patch_size = 4
    with pytest.raises(ValueError, match=r"vision_config\.patch_size"):
        transplant_vision_(copy.deepcopy(tiny_retrieval[0]), gen)


@pytest.mark.integration
def test_load_retrieval_model_from_local_dir(tiny_retrieval, tmp_path):
    model, tok = tiny_retrieval
    model.save_pretrained(tmp_path / "itm")
    tok.save_pretrained(tmp_path / "itm")
    loaded, loaded_tok = load_retrieval_model(tmp_path / "itm", dtype="float32")
    assert next((tmp_path / "itm").glob("*.safetensors"), None) is not None
    ids, mask = tokenize_texts(loaded_tok, ["a red circle"], 35)
    assert torch.equal(ids, tokenize_texts(tok, ["a red circle"], 35)[0])
    pix = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ours = itc_similarity(image_features(model, pix)[1], text_features(model, ids, mask))
    theirs = itc_similarity(image_features(loaded, pix)[1], text_features(loaded, ids, mask))
    assert torch.allclose(ours, theirs, atol=TOL)
    with torch.no_grad():
        loaded.text_projection.bias.add_(0.1)  # non-vacuous: a changed weight shows up in the similarity
    assert not torch.allclose(ours, itc_similarity(image_features(loaded, pix)[1], text_features(loaded, ids, mask)),
                              atol=TOL)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_retrieval_model(tmp_path)
