"""Attention pieces that make head-pruned BLIP-2 modules run under stock transformers 5.

* :class:`HeadPrunedBlip2Attention` / :class:`HeadPrunedInstructBlipAttention` — subclasses of the stock ViT
  attentions whose forward reshapes the fused qkv output with the stored ``head_dim`` instead of deriving it from the
  input width (the stock forward divides the *input* width by ``num_heads``, which is wrong once heads are gone).
* ``ukmp_eager`` / ``ukmp_sdpa`` — attention functions registered in both ``AttentionInterface`` and
  ``AttentionMaskInterface``. T5 computes a relative position bias for all original heads in block 0 and shares it
  with every later block; a layer with pruned heads selects its own heads' columns (its ``ukmp_kept_heads`` buffer).
  Cross-attention receives a zero bias, which is selected the same way.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.blip_2.modeling_blip_2 import Blip2Attention
from transformers.models.blip_2.modeling_blip_2 import eager_attention_forward as blip2_eager
from transformers.models.instructblip.modeling_instructblip import InstructBlipAttention
from transformers.models.instructblip.modeling_instructblip import eager_attention_forward as instructblip_eager
from transformers.models.t5.modeling_t5 import eager_attention_forward as t5_eager

KEPT_HEADS = "ukmp_kept_heads"  # non-persistent buffer name on a head-pruned T5Attention
PREFIX = "ukmp_"


class _HeadPrunedFusedQKV:
    """The fused-qkv ViT attention of BLIP-2 and InstructBLIP with ``num_heads`` kept heads of width ``head_dim``
    (qkv of 3·num_heads·head_dim rows). Mixed into a subclass of the stock class, listed first."""

    eager: Callable = staticmethod(blip2_eager)

    def __init__(self, config, num_heads: int, head_dim: int):
        nn.Module.__init__(self)
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.is_causal = False
        self.attention_dropout = config.attention_dropout
        inner = num_heads * head_dim
        self.qkv = nn.Linear(self.embed_dim, 3 * inner, bias=bool(config.qkv_bias))
        self.projection = nn.Linear(inner, self.embed_dim)

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        bsz, tgt_len, _ = hidden_states.size()
        mixed = self.qkv(hidden_states).reshape(bsz, tgt_len, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = mixed[0], mixed[1], mixed[2]
        attn_fn: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self.eager)
        out, weights = attn_fn(
            self, query, key, value, attention_mask=None,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scale, **kwargs,
        )
        out = out.reshape(bsz, tgt_len, -1).contiguous()
        return self.projection(out), weights


class HeadPrunedBlip2Attention(_HeadPrunedFusedQKV, Blip2Attention):
    """``Blip2Attention`` with ``num_heads`` kept heads of width ``head_dim`` (fused qkv of 3·num_heads·head_dim)."""


class HeadPrunedInstructBlipAttention(_HeadPrunedFusedQKV, InstructBlipAttention):
    """``InstructBlipAttention`` (same layout as BLIP-2's; its forward also derives the head size from the input
    width) with ``num_heads`` kept heads of width ``head_dim``."""

    eager: Callable = staticmethod(instructblip_eager)


HEAD_PRUNED_VIT_ATTENTION: dict[type, type] = {
    Blip2Attention: HeadPrunedBlip2Attention,
    InstructBlipAttention: HeadPrunedInstructBlipAttention,
}


def _select_heads(module: nn.Module, query: torch.Tensor, position_bias: torch.Tensor | None):
    if position_bias is None or position_bias.shape[1] == query.shape[1]:
        return position_bias
    kept = getattr(module, KEPT_HEADS, None)
    if kept is None:
        raise RuntimeError(
            f"{type(module).__name__}: position bias has {position_bias.shape[1]} heads but the layer has "
            f"{query.shape[1]} and no '{KEPT_HEADS}' buffer"
        )
    return position_bias.index_select(1, kept.to(position_bias.device))


def ukmp_eager(module, query, key, value, attention_mask, position_bias=None, **kwargs):
    position_bias = _select_heads(module, query, position_bias)
    return t5_eager(module, query, key, value, attention_mask, position_bias=position_bias, **kwargs)


def ukmp_sdpa(module, query, key, value, attention_mask, position_bias=None, **kwargs):
    position_bias = _select_heads(module, query, position_bias)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](
        module, query, key, value, attention_mask, position_bias=position_bias, **kwargs
    )


_REGISTERED = False


def register_attention_functions() -> None:
    """Register ``ukmp_eager`` and ``ukmp_sdpa`` (idempotent). Both interfaces are needed: the mask builder picks
    the mask format (additive float for eager, boolean for sdpa) from the same implementation name."""
    global _REGISTERED
    if _REGISTERED:
        return
    AttentionInterface.register(PREFIX + "eager", ukmp_eager)
    AttentionInterface.register(PREFIX + "sdpa", ukmp_sdpa)
    AttentionMaskInterface.register(PREFIX + "eager", eager_mask)
    AttentionMaskInterface.register(PREFIX + "sdpa", sdpa_mask)
    _REGISTERED = True


def head_aware_implementation(current: str | None) -> str:
    """Map an implementation name (``eager``/``sdpa``/already ours) to its head-aware counterpart."""
    base = (current or "sdpa").removeprefix(PREFIX)
    if base not in ("eager", "sdpa"):
        raise ValueError(f"attention implementation {current!r} is not supported for head-pruned T5 (eager, sdpa)")
    return PREFIX + base
