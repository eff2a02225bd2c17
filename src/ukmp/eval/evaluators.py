"""Model-driven evaluators of BLIP-2 T5 models: zero-shot VQA (VQAv2, OK-VQA, GQA) and captioning (NoCaps, COCO).

Both follow UKMP_METHOD.md section 4 (the LAVIS ``blip2_t5`` zero-shot path): images get the evaluation transform
(bicubic square resize to ``image_size``, CLIP mean/std), the T5 encoder reads ``num_query_tokens`` image tokens
followed by the tokenised prompt (``</s>`` appended, right-padded per batch), and beam search decodes the answer.
When ``image_size`` differs from the vision config's, the ViT position embeddings are interpolated.

Each evaluator returns ``(metrics, predictions)``: the metrics of ``ukmp.eval.metrics`` and one JSON-ready record per
sample, in dataset order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ukmp.data.images import ImageTransform
from ukmp.data.records import CaptionEvalDataset, RecordDataset, VQADataset
from ukmp.eval import metrics
from ukmp.eval.text import CAPTION_PROMPT, VQA_PROMPT, blip_question

__all__ = [
    "encoder_inputs",
    "eval_mode",
    "evaluate_caption",
    "evaluate_vqa",
    "generate_texts",
    "image_batch",
    "strip_prompt",
]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` (and every submodule) in eval mode, then restore each submodule's previous mode."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_count(name: str, value: int, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return value


def sample_count(dataset: RecordDataset, max_samples: int) -> int:
    """How many leading records to evaluate: all when ``max_samples`` is 0."""
    check_count("max_samples", max_samples, minimum=0)
    return len(dataset) if max_samples == 0 else min(max_samples, len(dataset))


def image_batch(dataset: RecordDataset, indices: Sequence[int], transform: ImageTransform) -> torch.Tensor:
    """Open and transform the images of ``indices``: a float tensor [B, 3, size, size]."""
    return torch.stack([transform(dataset.open_image(int(i))) for i in indices])


def encoder_inputs(tokenizer, prompts: Sequence[str], num_query_tokens: int,
                   image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 encoder ids: ``num_query_tokens`` image tokens, then each prompt's tokens (``</s>`` appended), right-padded.

    Returns ``(input_ids, attention_mask)``, both [B, L] long tensors.
    """
    rows = [[image_token_id] * num_query_tokens + list(tokenizer(p, add_special_tokens=True)["input_ids"])
            for p in prompts]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), int(tokenizer.pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, : len(row)] = 1
    return ids, mask


def decoder_prompts(rows: Sequence[list[int]], pad: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder-only prompt ids (each row: its image tokens and prompt, :class:`ukmp.data.prompts.PromptIds`)
    **left**-padded, so that every row continues from its last column. Returns ``(input_ids, attention_mask)``."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), int(pad if pad is not None else 0), dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, length - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[b, length - len(row):] = 1
    return ids, mask


def _interpolate(model: nn.Module, image_size: int) -> bool:
    from ukmp.models import adapter_for

    layout = adapter_for(model).batch_layout()
    check_count("image_size", image_size, minimum=layout.patch_size)
    return image_size != layout.image_size


@torch.no_grad()
def generate_texts(
    model: nn.Module,
    tokenizer,
    pixel_values: torch.Tensor,
    prompts: Sequence[str],
    *,
    image_size: int,
    num_beams: int,
    max_new_tokens: int,
    min_new_tokens: int,
    length_penalty: float,
    qformer_tokenizer=None,
    processor=None,
    prompt_style: str = "plain",
) -> list[str]:
    """Beam-search one text per image, conditioned on the image and its prompt; decoded without special tokens.
    ``qformer_tokenizer``: the processor's, for a model whose Q-Former reads the prompt (InstructBLIP).
    ``prompt_style``: how a decoder-only model's prompt is written (:mod:`ukmp.data.prompts`; ``template`` needs
    the ``processor``, whose chat template it applies)."""
    if len(prompts) != pixel_values.shape[0]:
        raise ValueError(f"prompts: {len(prompts)} prompts for {pixel_values.shape[0]} images")
    from ukmp.data.prompts import PromptIds
    from ukmp.models import adapter_for

    layout = adapter_for(model).batch_layout()
    if layout.decoder_only:
        build = PromptIds(processor if processor is not None else tokenizer, layout, prompt_style)
        ids, mask = decoder_prompts([build(p) for p in prompts], tokenizer.pad_token_id)
    elif prompt_style != "plain":
        raise ValueError(f"prompt_style {prompt_style!r}: an encoder-decoder language model reads a plain prompt")
    else:
        ids, mask = encoder_inputs(tokenizer, prompts, layout.image_tokens, int(layout.image_token_id))
    device = model_device(model)
    kwargs: dict[str, Any] = {}
    if _interpolate(model, image_size):
        kwargs["interpolate_pos_encoding"] = True
    if layout.qformer_text:  # InstructBLIP: the Q-Former reads the prompt too
        from ukmp.data.batches import qformer_inputs

        if qformer_tokenizer is None:
            raise ValueError("qformer_tokenizer: the model's Q-Former reads the prompt; pass the processor's")
        kwargs.update({k: v.to(device) for k, v in qformer_inputs(qformer_tokenizer, prompts).items()})
    out = model.generate(
        pixel_values=pixel_values.to(device), input_ids=ids.to(device), attention_mask=mask.to(device),
        num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
        length_penalty=length_penalty, do_sample=False, **kwargs,
    )
    if layout.decoder_only:  # the output repeats the prompt ids before the new tokens
        out = out[:, ids.shape[1]:]
    return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]


def _image_and_prompt(model: nn.Module, processor, dataset: RecordDataset, image_size: int,
                      prompt_style: str | None) -> tuple[ImageTransform, str]:
    """The evaluation transform the model's layout asks for (SmolVLM: its processor's resize and normalisation),
    and the prompt style: ``prompt_style``, or the one the dataset and the model's family give."""
    from ukmp.data.prompts import check_style, dataset_style
    from ukmp.models import adapter_for

    transform = ImageTransform.for_layout(adapter_for(model).batch_layout(), image_size, train=False)
    if check_style(prompt_style, "prompt_style") is None:
        prompt_style = dataset_style(dataset, processor, model.config)
    return transform, prompt_style


def _batches(n: int, batch_size: int) -> list[range]:
    check_count("batch_size", batch_size)
    return [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def evaluate_vqa(
    model: nn.Module,
    processor,
    dataset: VQADataset,
    *,
    kind: Literal["vqa", "gqa"] = "vqa",
    image_size: int,
    batch_size: int,
    num_beams: int = 5,
    max_new_tokens: int = 10,
    min_new_tokens: int = 1,
    length_penalty: float = -1.0,
    prompt: str = VQA_PROMPT,
    max_samples: int = 0,
    progress: bool = True,
    prompt_style: str | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Zero-shot VQA: ``prompt`` on the ``blip_question``-cleaned question, beam search, then the task metric.
    ``prompt_style``: plain or the processor's chat template around the prompt (``None``: the dataset's
    ``prompt_style``, else the model family's default; :func:`ukmp.data.prompts.dataset_style`).

    ``kind="vqa"`` (VQAv2, OK-VQA) scores with the official VQA accuracy (``metrics.vqa_score``); ``kind="gqa"``
    with exact match (``metrics.gqa_accuracy``). ``max_samples=0`` evaluates every question, otherwise the first N.
    Predictions: ``{"question_id", "question" (as in the dataset), "answer"}``.
    """
    if kind not in ("vqa", "gqa"):
        raise ValueError(f"kind: must be 'vqa' or 'gqa', got {kind!r}")
    if "{}" not in prompt:
        raise ValueError(f"prompt: must contain '{{}}' for the question, got {prompt!r}")
    n = sample_count(dataset, max_samples)
    transform, style = _image_and_prompt(model, processor, dataset, image_size, prompt_style)
    tokenizer = getattr(processor, "tokenizer", processor)
    predictions: list[dict[str, Any]] = []
    with eval_mode(model), tqdm(total=n, desc=f"{dataset.name} ({kind})", unit="q", disable=not progress) as bar:
        for idx in _batches(n, batch_size):
            records = [dataset[i] for i in idx]
            prompts = [prompt.format(blip_question(r.question)) for r in records]
            answers = generate_texts(
                model, tokenizer, image_batch(dataset, idx, transform), prompts, image_size=image_size,
                num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                length_penalty=length_penalty, qformer_tokenizer=getattr(processor, "qformer_tokenizer", None),
                processor=processor, prompt_style=style,
            )
            predictions += [{"question_id": r.question_id, "question": r.question, "answer": a}
                            for r, a in zip(records, answers)]
            bar.update(len(records))
    preds = {p["question_id"]: p["answer"] for p in predictions}
    if kind == "vqa":
        scores = metrics.vqa_score(preds, dataset.gts())
    else:
        scores = metrics.gqa_accuracy(preds, dataset.single_gts())
    return scores, predictions


def strip_prompt(text: str, prompt: str) -> str:
    """``text`` without a leading copy of ``prompt`` (compared case-insensitively, surrounding spaces ignored)."""
    head = prompt.strip()
    if head and text.strip().lower().startswith(head.lower()):
        return text.strip()[len(head):].strip()
    return text.strip()


def evaluate_caption(
    model: nn.Module,
    processor,
    dataset: CaptionEvalDataset,
    *,
    prompt: str = CAPTION_PROMPT,
    image_size: int,
    batch_size: int,
    num_beams: int = 5,
    max_new_tokens: int = 30,
    min_new_tokens: int = 8,
    length_penalty: float = 1.0,
    strip_echo: bool | None = None,
    spice: bool | Literal["auto"] = "auto",
    max_samples: int = 0,
    progress: bool = True,
    prompt_style: str | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Zero-shot captioning with ``prompt`` as the T5 input (a decoder-only model's prompt, in ``prompt_style`` as
    for :func:`evaluate_vqa`); scores from ``metrics.caption_scores`` (CIDEr, BLEU-1..4,
    METEOR, ROUGE-L, and SPICE when its jars are installed, see ``spice``).

    ``strip_echo``: remove a leading copy of the prompt from each caption; the default (None) does so only for a
    decoder-only language model, which continues the prompt. An encoder-decoder T5 never echoes its input, so a
    caption that happens to begin with the prompt words is kept as generated (as in the reference).
    Predictions: ``{"image_id", "caption"}`` (the LAVIS result format).
    """
    n = sample_count(dataset, max_samples)
    if strip_echo is None:
        from ukmp.models import is_decoder_only

        strip_echo = is_decoder_only(model.config)
    transform, style = _image_and_prompt(model, processor, dataset, image_size, prompt_style)
    tokenizer = getattr(processor, "tokenizer", processor)
    predictions: list[dict[str, Any]] = []
    with eval_mode(model), tqdm(total=n, desc=f"{dataset.name} (caption)", unit="img", disable=not progress) as bar:
        for idx in _batches(n, batch_size):
            captions = generate_texts(
                model, tokenizer, image_batch(dataset, idx, transform), [prompt] * len(idx),
                image_size=image_size, num_beams=num_beams, max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens, length_penalty=length_penalty,
                qformer_tokenizer=getattr(processor, "qformer_tokenizer", None), processor=processor,
                prompt_style=style,
            )
            for i, caption in zip(idx, captions):
                text = strip_prompt(caption, prompt) if strip_echo else caption
                predictions.append({"image_id": dataset[i].image_id, "caption": text})
            bar.update(len(idx))
    preds = {p["image_id"]: p["caption"] for p in predictions}
    return metrics.caption_scores(preds, dataset.refs, spice=spice), predictions
