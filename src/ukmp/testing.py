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
    models only), InstructBLIP's Q-Former prompt ids and (padded) mask. A plain causal LM gets input_ids and a
    padded attention mask."""
    from ukmp.models import is_decoder_only

    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    if not hasattr(cfg, "vision_config"):  # a plain causal LM
        ids = torch.randint(3, cfg.vocab_size, (batch, text_len + dec_len), generator=g)
        am = torch.ones_like(ids)
        if batch > 1:
            am[1, -2:] = 0
        return {"input_ids": ids, "attention_mask": am}
    from ukmp.models import adapter_for

    layout = adapter_for(cfg).batch_layout()
    size, nq, image_id = layout.image_size, layout.image_tokens, layout.image_token_id
    ids = torch.randint(3, image_id, (batch, nq + text_len), generator=g)
    ids[:, :nq] = image_id
    am = torch.ones_like(ids)
    if batch > 1:
        am[1, -2:] = 0
    out = {
        "pixel_values": torch.randn(batch, 3, size, size, generator=g),
        "input_ids": ids,
        "attention_mask": am,
        "decoder_input_ids": torch.randint(3, image_id, (batch, dec_len), generator=g),
    }
    if is_decoder_only(cfg):
        del out["decoder_input_ids"]
    if hasattr(cfg, "qformer_config") and cfg.model_type == "instructblip":  # the Q-Former reads the prompt too
        q = torch.randint(3, cfg.qformer_config.vocab_size, (batch, text_len), generator=g)
        qm = torch.ones_like(q)
        if batch > 1:
            qm[1, -3:] = 0
        out["qformer_input_ids"], out["qformer_attention_mask"] = q, qm
    return out


def randomize_biases_(model, seed: int) -> None:
    """Every Linear bias drawn at random (0.1 x N(0, 1), from ``seed``): transformers zero-initialises them, and
    random ones make the bias slices (and an export's bias padding) matter."""
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))


def float64_tiny(name: str, seed: int, impl: str = "sdpa"):
    """(model, processor, inputs) for exactness tests: the tiny vision-language build ``name`` in float64 with
    random Linear biases (transformers zero-initialises them; random ones make the bias slices matter) and
    :func:`make_inputs`' batch, pixels in float64 too."""
    from ukmp.models.build import build_tiny

    model, proc = build_tiny(name=name, seed=seed, attn_implementation=impl)
    model = model.double()
    randomize_biases_(model, seed)
    inputs = make_inputs(model, seed=seed)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    return model, proc, inputs


def unpadded(inputs: dict) -> dict:
    """``inputs`` with an all-ones attention mask (for ``generate``, which appends after the last column)."""
    return {k: v if k != "attention_mask" else torch.ones_like(v) for k, v in inputs.items()}


def check_keep_all_bit_identical(model, inputs: dict) -> None:
    """Applying the keep-all plan removes nothing and changes no weight and no logit, bit for bit (the slicing
    path with nothing to slice is the identity)."""
    from ukmp.models import adapter_for

    adapter = adapter_for(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        dense = model(**inputs).logits
        removed = adapter.apply_(model, PruningPlan.keep_all(adapter.groups()))
        after = model(**inputs).logits
    sd = model.state_dict()
    assert not removed.slices and before.keys() == sd.keys() and all(torch.equal(before[k], sd[k]) for k in sd)
    assert torch.equal(dense, after)


def check_save_load_identical(model, plan, processor, path, batches: list[dict], gen_inputs: dict, gen: dict):
    """Save the pruned ``model`` (with ``plan`` and ``processor``) at ``path`` and load it back: the same class and
    parameter count, every tensor bit-identical, logits within 1e-12 on each of ``batches`` (BLAS kernel choice on
    the loaded buffers' alignment) and identical greedy tokens from ``gen_inputs`` with ``generate(**gen)``.
    Returns (the saved directory, the reloaded model) for a family's own further checks."""
    from ukmp.io import load_pruned, save_pruned
    from ukmp.models import count_parameters

    with torch.no_grad():
        refs = [model(**b).logits for b in batches]
        ref_gen = model.generate(**gen_inputs, **gen)
    saved = save_pruned(model, plan, path, processor=processor)
    again = load_pruned(saved)
    assert type(again) is type(model) and count_parameters(again) == count_parameters(model)
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():
        outs = [again(**b).logits for b in batches]
        out_gen = again.generate(**gen_inputs, **gen)
    assert all((o - r).abs().max().item() <= 1e-12 for o, r in zip(outs, refs))
    assert torch.equal(out_gen.sequences, ref_gen.sequences)
    return saved, again
