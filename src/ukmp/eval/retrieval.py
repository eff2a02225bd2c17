"""Zero-shot image-text retrieval (Flickr30K) with the BLIP-2 stage-1 model and a transplanted (pruned) ViT.

UKMP_METHOD.md section 4: retrieval runs the Q-Former model of the first pre-training stage (HF
``Blip2ForImageTextRetrieval``, hub ``Salesforce/blip2-itm-vit-g``) with the pruned ViT of the generation model put in
its place (:func:`transplant_vision_`). Scoring follows the reference's two stages:

1. ITC for every image-text pair: the cosine between the projected ``[CLS]`` output of the text and each projected
   query output of the image, maximised over the queries;
2. for each image its ``k_test`` best texts by ITC (and for each text its ``k_test`` best images) are re-scored
   by the ITM head's "match" logit (averaged over the queries) plus the ITC value; every other pair scores -inf.

The model's submodules (vision_model, query_tokens, embeddings, qformer, projections, itm_head) are called directly,
so texts are tokenised once and image features computed once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import Blip2Config, Blip2ForImageTextRetrieval, BertTokenizer

from ukmp.data.images import ImageTransform
from ukmp.data.records import RetrievalDataset
from ukmp.eval import metrics
from ukmp.eval.evaluators import check_count, eval_mode, image_batch, model_device, sample_count
from ukmp.eval.text import blip_caption

__all__ = [
    "VISION_KEYS",
    "build_bert_tokenizer",
    "build_tiny_retrieval",
    "evaluate_retrieval",
    "image_features",
    "itc_similarity",
    "itm_scores",
    "load_retrieval_model",
    "rerank_topk",
    "retrieval_predictions",
    "text_features",
    "tokenize_texts",
    "transplant_vision_",
]

# structural fields of the vision config that must agree for a transplanted ViT to fit the Q-Former
VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
               "patch_size", "hidden_act", "layer_norm_eps", "qkv_bias")


def transplant_vision_(retrieval_model: Blip2ForImageTextRetrieval, blip2: nn.Module) -> Blip2ForImageTextRetrieval:
    """Replace ``retrieval_model.vision_model`` by the (pruned) ``blip2.vision_model``, as the reference does.

    The module is shared, not copied: both models then run the same ViT. The dense vision configs must agree on
    every field of ``VISION_KEYS`` (pruning changes layers, not the config).
    """
    ours, theirs = retrieval_model.config.vision_config, blip2.config.vision_config
    for key in VISION_KEYS:
        a, b = getattr(ours, key, None), getattr(theirs, key, None)
        if a != b:
            raise ValueError(f"vision_config.{key}: retrieval model has {a!r} but the transplanted ViT has {b!r}")
    retrieval_model.vision_model = blip2.vision_model
    return retrieval_model


# ------------------------------------------------------------------------------------------------------ features
@torch.no_grad()
def image_features(model: Blip2ForImageTextRetrieval, pixel_values: torch.Tensor,
                   interpolate_pos_encoding: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ViT output after its final layer norm [B, N, C], unit-norm projected query outputs [B, Q, D])."""
    vit = model.vision_model(pixel_values=pixel_values.to(model_device(model.vision_model)),
                             interpolate_pos_encoding=interpolate_pos_encoding).last_hidden_state
    vit = vit.to(model.query_tokens.device)
    queries = model.query_tokens.expand(vit.shape[0], -1, -1)
    out = model.qformer(query_embeds=queries, encoder_hidden_states=vit,
                        encoder_attention_mask=torch.ones(vit.shape[:-1], dtype=torch.long, device=vit.device))
    hidden = out.last_hidden_state.to(model.vision_projection.weight.dtype)
    return vit, nn.functional.normalize(model.vision_projection(hidden), dim=-1)


@torch.no_grad()
def text_features(model: Blip2ForImageTextRetrieval, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor:
    """Unit-norm projected ``[CLS]`` output of the Q-Former's text branch: [T, D]."""
    device = model.query_tokens.device
    emb = model.embeddings(input_ids=input_ids.to(device))
    out = model.qformer(query_embeds=emb, query_length=0, attention_mask=attention_mask.to(device))
    cls = out.last_hidden_state[:, 0, :].to(model.text_projection.weight.dtype)
    return nn.functional.normalize(model.text_projection(cls), dim=-1)


def itc_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """[I, T]: for each pair, the largest cosine between the text feature and any of the image's query features
    (computed ``chunk`` images at a time to bound memory)."""
    t = text_feats.float()
    return torch.cat([torch.einsum("iqd,td->itq", image_feats[s].float(), t).amax(dim=-1)
                      for s in _chunked(image_feats.shape[0], chunk)])


@torch.no_grad()
def itm_scores(model: Blip2ForImageTextRetrieval, vit: torch.Tensor, input_ids: torch.Tensor,
               attention_mask: torch.Tensor) -> torch.Tensor:
    """ITM "match" logit (class 1) of each (image, text) row pair, averaged over the query positions: [B]."""
    device = model.query_tokens.device
    vit, input_ids, attention_mask = vit.to(device), input_ids.to(device), attention_mask.to(device)
    queries = model.query_tokens.expand(vit.shape[0], -1, -1)
    n_q = queries.shape[1]
    emb = model.embeddings(input_ids=input_ids, query_embeds=queries)
    mask = torch.cat([torch.ones((vit.shape[0], n_q), dtype=attention_mask.dtype, device=device), attention_mask], 1)
    out = model.qformer(query_embeds=emb, query_length=n_q, attention_mask=mask, encoder_hidden_states=vit,
                        encoder_attention_mask=torch.ones(vit.shape[:-1], dtype=torch.long, device=device))
    hidden = out.last_hidden_state[:, :n_q, :].to(model.itm_head.weight.dtype)
    return model.itm_head(hidden)[..., 1].float().mean(dim=1)


def rerank_topk(sim: torch.Tensor, k: int, score_fn: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Re-rank each row's ``k`` best candidates: ``score_fn(row, candidate indices) + sim``; all others -inf.

    ``sim`` is [n_queries, n_candidates]; ``k`` is capped at the number of candidates. Returns a float32 tensor
    of the same shape on ``sim``'s device.
    """
    if sim.ndim != 2:
        raise ValueError(f"sim: expected a 2-D [queries, candidates] tensor, got shape {tuple(sim.shape)}")
    k = min(check_count("k_test", k), sim.shape[1])
    out = torch.full(sim.shape, float("-inf"), dtype=torch.float32, device=sim.device)
    for q in range(sim.shape[0]):
        top, idx = sim[q].float().topk(k)
        out[q, idx] = score_fn(q, idx).float().to(out.device) + top
    return out


# ---------------------------------------------------------------------------------------------------- evaluator
def tokenize_texts(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``blip_caption``-cleaned texts, BERT-tokenised to a fixed ``max_length`` (as the reference): ids, mask."""
    enc = tokenizer([blip_caption(t) for t in texts], padding="max_length", truncation=True,
                    max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _chunked(n: int, size: int) -> Iterable[slice]:
    return (slice(s, min(s + size, n)) for s in range(0, n, size))


@torch.no_grad()
def evaluate_retrieval(
    retrieval_model: Blip2ForImageTextRetrieval,
    text_tokenizer,
    dataset: RetrievalDataset,
    *,
    image_size: int,
    k_test: int = 128,
    batch_size: int = 32,
    text_batch_size: int = 256,
    itm_batch_size: int = 128,
    max_text_length: int = 35,
    max_samples: int = 0,
    progress: bool = True,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Flickr30K-style retrieval: ITC for all pairs, top-``k_test`` re-ranked by ITM + ITC in each direction.

    ``max_samples`` keeps the first N images (and their texts); 0 keeps all. Returns the metrics of
    ``metrics.recall_at_k`` (``txt_r1/5/10``, ``img_r1/5/10``, means) and details as CPU float tensors:
    ``itc`` [I, T], ``score_i2t`` [I, T] and ``score_t2i`` [T, I] (-inf outside each query's top k).
    """
    check_count("batch_size", batch_size)
    check_count("text_batch_size", text_batch_size)
    check_count("itm_batch_size", itm_batch_size)
    check_count("max_text_length", max_text_length, minimum=2)
    vc = retrieval_model.vision_model.config
    check_count("image_size", image_size, minimum=vc.patch_size)
    n_img = sample_count(dataset, max_samples)
    img2txt = dataset.img2txt[:n_img]
    n_txt = max(max(t) for t in img2txt) + 1
    texts, txt2img = dataset.texts[:n_txt], dataset.txt2img[:n_txt]
    transform = ImageTransform(image_size, train=False)
    interpolate = image_size != vc.image_size

    with eval_mode(retrieval_model):
        ids, mask = tokenize_texts(text_tokenizer, texts, max_text_length)
        text_feats = torch.cat([text_features(retrieval_model, ids[s], mask[s])
                                for s in _chunked(n_txt, text_batch_size)])
        vits, img_feats = [], []
        for s in tqdm(list(_chunked(n_img, batch_size)), desc=f"{dataset.name} images", disable=not progress):
            vit, feats = image_features(retrieval_model, image_batch(dataset, range(s.start, s.stop), transform),
                                        interpolate)
            vits.append(vit)
            img_feats.append(feats)
        vit_all, img_all = torch.cat(vits), torch.cat(img_feats)
        itc = itc_similarity(img_all, text_feats)
        dev = ids.device

        def i2t(i: int, cand: torch.Tensor) -> torch.Tensor:
            c = cand.to(dev)
            return torch.cat([itm_scores(retrieval_model, vit_all[i].expand(len(c[s]), -1, -1), ids[c[s]], mask[c[s]])
                              for s in _chunked(len(c), itm_batch_size)])

        def t2i(t: int, cand: torch.Tensor) -> torch.Tensor:
            c = cand.to(vit_all.device)
            return torch.cat([itm_scores(retrieval_model, vit_all[c[s]], ids[t].expand(len(c[s]), -1),
                                         mask[t].expand(len(c[s]), -1))
                              for s in _chunked(len(c), itm_batch_size)])

        with tqdm(total=n_img + n_txt, desc=f"{dataset.name} ITM re-rank", disable=not progress) as bar:
            score_i2t = rerank_topk(itc, k_test, _counting(i2t, bar))
            score_t2i = rerank_topk(itc.t(), k_test, _counting(t2i, bar))

    details = {"itc": itc.cpu(), "score_i2t": score_i2t.cpu(), "score_t2i": score_t2i.cpu()}
    scores = metrics.recall_at_k(details["score_i2t"].numpy(), txt2img, img2txt,
                                 sim_t2i=details["score_t2i"].numpy())
    return scores, details


def retrieval_predictions(details: dict[str, torch.Tensor], k: int = 10) -> dict[str, Any]:
    """The readable form of ``evaluate_retrieval``'s details: per image its ``k`` best text ids and scores
    (``i2t``), per text its ``k`` best image ids and scores (``t2i``), best first, as plain ints and floats.

    Candidates outside a query's re-ranked top ``k_test`` (score -inf) are left out, so a list can be shorter.
    """
    out: dict[str, Any] = {"k": k}
    for key, name, query, cand in (("score_i2t", "i2t", "image", "texts"), ("score_t2i", "t2i", "text", "images")):
        sim = details[key].float()
        vals, idx = sim.topk(min(k, sim.shape[1]), dim=1)
        rows = []
        for q, (v, i) in enumerate(zip(vals.tolist(), idx.tolist())):
            keep = [j for j, x in enumerate(v) if x != float("-inf")]
            rows.append({query: q, cand: [i[j] for j in keep], "scores": [round(v[j], 6) for j in keep]})
        out[name] = rows
    return out


def _counting(fn: Callable[[int, torch.Tensor], torch.Tensor], bar: Any) -> Callable[[int, torch.Tensor], torch.Tensor]:
    def wrapped(q: int, cand: torch.Tensor) -> torch.Tensor:
        out = fn(q, cand)
        bar.update(1)
        return out

    return wrapped


# ------------------------------------------------------------------------------------------------------- models
_TINY_CORPUS = (
    "a red circle on a blue background", "a green square in front of a white wall", "a picture of one black triangle",
    "the triangle is yellow and the background is purple", "a simple orange image with a red square in it",
    "a photo of a dog running on the grass", "two people riding bicycles down a city street",
    "a plate of food on a wooden table", "a man holding an umbrella in the rain",
)


def build_bert_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 128) -> BertTokenizer:
    """A lower-casing WordPiece ``BertTokenizer`` built now, offline; ids 0-4 are [PAD] [UNK] [CLS] [SEP] [MASK].

    The vocabulary is built deterministically (tokenizers' WordPiece trainer breaks frequency ties differently in
    every process, which made the tiny retrieval model, and so the demo's Flickr30K numbers, change from run to
    run): the special tokens, every character of the corpus alone and as a ``##`` continuation, then whole words by
    frequency (ties in alphabetical order) while room is left. Raises when the characters alone need more than
    ``vocab_size`` entries.
    """
    from collections import Counter  # noqa: PLC0415

    from tokenizers import normalizers, pre_tokenizers  # noqa: PLC0415

    texts = list(corpus) if corpus is not None else list(_TINY_CORPUS)
    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(w for t in texts for w, _span in pre.pre_tokenize_str(norm.normalize_str(t)))
    chars = sorted({c for w in words for c in w})
    base = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    if len(base) > vocab_size:
        raise ValueError(f"vocab_size: the corpus needs {len(base)} WordPiece entries, more than {vocab_size}")
    whole = [w for w, _n in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1]
    tokens = base + whole[: vocab_size - len(base)]
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})


def build_tiny_retrieval(config: Blip2Config, seed: int = 0,
                         corpus: Iterable[str] | None = None) -> tuple[Blip2ForImageTextRetrieval, BertTokenizer]:
    """A random ``Blip2ForImageTextRetrieval`` with the vision config and Q-Former sizes of the generation model's
    ``config`` (text input enabled), and a WordPiece tokenizer that fits the Q-Former vocabulary."""
    qformer = config.qformer_config.to_dict()
    qformer["use_qformer_text_input"] = True
    # InstructBLIP's config has no image-text projection size: the stage-1 (BLIP-2) model's default stands in
    extra = ({"image_text_hidden_size": config.image_text_hidden_size}
             if hasattr(config, "image_text_hidden_size") else {})
    cfg = Blip2Config(vision_config=config.vision_config.to_dict(), qformer_config=qformer,
                      num_query_tokens=config.num_query_tokens, **extra)
    tokenizer = build_bert_tokenizer(corpus, vocab_size=cfg.qformer_config.vocab_size)
    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(cfg).eval()
    with torch.no_grad():  # HF zero-initialises the queries; random ones (as LAVIS) make them image-specific
        model.query_tokens.normal_(0.0, cfg.qformer_config.initializer_range)
    return model, tokenizer


def load_retrieval_model(name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = None,
                         device: str | torch.device = "cpu") -> tuple[Blip2ForImageTextRetrieval, Any]:
    """(model, BERT tokenizer) of the stage-1 checkpoint: a hub id (``Salesforce/blip2-itm-vit-g``, honours
    ``HF_HUB_OFFLINE``) or a local ``save_pretrained`` directory; weights only from safetensors."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    from ukmp.models.build import parse_dtype  # noqa: PLC0415

    s = str(name_or_path)
    if Path(s).exists() and not (Path(s) / "config.json").is_file():
        raise FileNotFoundError(f"{s}: not a retrieval model directory (config.json missing)")
    try:
        model = Blip2ForImageTextRetrieval.from_pretrained(s, dtype=parse_dtype(dtype), use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(s)
    except OSError as e:  # offline and not cached, no such repo, no weights
        raise OSError(f"eval.retrieval_model: cannot load {s!r} ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), tokenizer
