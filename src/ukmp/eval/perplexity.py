"""Perplexity of a decoder-only language model on plain text (a ``format: text`` dataset), alone or inside a VLM.

The text is tokenised once and cut into windows of ``window`` tokens starting every ``stride`` tokens
(:class:`~ukmp.data.records.TextDataset`). Each window is one forward pass; a token is scored once, in the first
window that holds it with some context before it (a window's first token is context only; with ``stride <
window`` the overlap is context too). ``perplexity = exp(sum of token NLLs / tokens scored)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ukmp.eval.evaluators import check_count, eval_mode, model_device
from ukmp.nll import token_nll


@torch.no_grad()
def evaluate_perplexity(model: nn.Module, processor, dataset, *, batch_size: int = 4,
                        progress: bool = True) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """``({"perplexity", "nll", "tokens"}, [{"start", "tokens", "nll"} per window])`` of the language model of
    ``model`` (the model itself for a plain causal LM; BLIP-2's ``language_model`` for a VLM, text only)."""
    from ukmp.models import adapter_for

    adapter = adapter_for(model)
    if not adapter.batch_layout().decoder_only:
        raise ValueError(f"perplexity: {adapter.name} has an encoder-decoder language model (decoder-only only)")
    check_count("batch_size", batch_size)
    lm = adapter.language_model(model)
    tokenizer = getattr(processor, "tokenizer", processor)
    windows = dataset.windows(tokenizer)
    device = model_device(model)
    total_nll, total_tokens, scored_upto = 0.0, 0, 0
    records: list[dict[str, Any]] = []
    with eval_mode(model), tqdm(total=len(windows), desc=f"{dataset.name} (perplexity)", unit="win",
                                disable=not progress) as bar:
        for b in range(0, len(windows), batch_size):
            chunk = windows[b: b + batch_size]
            length = max(len(ids) for _, ids in chunk)
            ids = torch.zeros((len(chunk), length), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, (_, w) in enumerate(chunk):
                ids[r, : len(w)] = torch.tensor(w)
                mask[r, : len(w)] = 1
            logits = lm(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            nll = token_nll(logits[:, :-1], ids[:, 1:].to(device)).cpu()  # classes last, fp32 at least (ukmp.nll)
            for r, (start, w) in enumerate(chunk):
                first = max(1, scored_upto - start)  # local index of the first token not scored yet
                part = nll[r, first - 1: len(w) - 1]
                scored_upto = max(scored_upto, start + len(w))
                total_nll += float(part.double().sum())
                total_tokens += int(part.numel())
                records.append({"start": start, "tokens": int(part.numel()),
                                "nll": float(part.double().mean()) if part.numel() else 0.0})
            bar.update(len(chunk))
    if total_tokens == 0:
        raise ValueError(f"{dataset.name}: no token to score")
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tokens}, records
