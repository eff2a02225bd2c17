"""Helpers for tests and benchmarks: random plans and model inputs for tiny BLIP-2 models."""

from __future__ import annotations

import random

import torch

from ukmp.plan import PruningPlan


def random_plan(groups, seed: int, force: dict | None = None) -> PruningPlan:
    """Non-uniform random plan over every group; ``force`` maps group kind -> 'one' | 'all'."""
    rng = random.Random(seed)
    keep = {}
    for g in groups:
        mode = (force or {}).get(g.kind)
        if mode == "one":
            n = 1
        elif mode == "all":
            n = g.n_units
        else:
            n = rng.randint(1, g.n_units)
        keep[g.id] = sorted(rng.sample(range(g.n_units), n))
    return PruningPlan(keep=keep, units={g.id: g.n_units for g in groups})


def make_inputs(model, batch: int = 2, text_len: int = 7, dec_len: int = 5, seed: int = 0) -> dict:
    """pixel_values, input_ids (with the image tokens first), a padded attention mask, decoder ids (encoder-decoder
    models only). A plain causal LM gets input_ids and a padded attention mask."""
    from ukmp.models import is_decoder_only

    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    if not hasattr(cfg, "vision_config"):  # a plain causal LM
        ids = torch.randint(3, cfg.vocab_size, (batch, text_len + dec_len), generator=g)
        am = torch.ones_like(ids)
        if batch > 1:
            am[1, -2:] = 0
        return {"input_ids": ids, "attention_mask": am}
    size = cfg.vision_config.image_size
    nq = cfg.num_query_tokens
    ids = torch.randint(3, cfg.image_token_index, (batch, nq + text_len), generator=g)
    ids[:, :nq] = cfg.image_token_index
    am = torch.ones_like(ids)
    if batch > 1:
        am[1, -2:] = 0
    out = {
        "pixel_values": torch.randn(batch, 3, size, size, generator=g),
        "input_ids": ids,
        "attention_mask": am,
        "decoder_input_ids": torch.randint(3, cfg.image_token_index, (batch, dec_len), generator=g),
    }
    if is_decoder_only(cfg):
        del out["decoder_input_ids"]
    return out
