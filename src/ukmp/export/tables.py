"""What each serving format can hold, per model family, and where a family's config keeps its widths.

The module paths and unit shapes come from the adapters (:mod:`ukmp.models.parts`); these tables add only what an
export needs on top: the config keys a stock architecture states its widths in, and the formats that hold a family.
"""

from __future__ import annotations

from dataclasses import dataclass

FORMATS = ("hf", "gguf", "onnx")


@dataclass(frozen=True)
class DecoderWidthKeys:
    """The config attributes of a Llama-family decoder that state its (uniform) widths."""

    heads: str = "num_attention_heads"
    kv_heads: str = "num_key_value_heads"
    head_dim: str = "head_dim"
    mlp: str = "intermediate_size"
    hidden: str = "hidden_size"


LLAMA_KEYS = DecoderWidthKeys()
# config flags that give every Linear of a block a bias (zero where the pruned model has none): how a stock config
# states the output biases FLAP's compensation adds (Llama, Mistral: the attention output via attention_bias, the MLP
# output via mlp_bias); a family whose config has no such flag (Qwen2) is refused
BIAS_FLAGS = {"self_attn": "attention_bias", "mlp": "mlp_bias"}
CLIP_KEYS = DecoderWidthKeys(kv_heads="num_attention_heads", head_dim="")  # CLIP derives head_dim = hidden / heads

# model_type -> (the width keys of its language model, the formats that hold it); LLaVA's vision tower: CLIP_KEYS
CAUSAL_LM_EXPORTS: dict[str, tuple[DecoderWidthKeys, tuple[str, ...]]] = {
    "llama": (LLAMA_KEYS, ("hf", "gguf", "onnx")),
    "mistral": (LLAMA_KEYS, ("hf", "gguf", "onnx")),
    "qwen2": (LLAMA_KEYS, ("hf", "gguf", "onnx")),
    "llava": (LLAMA_KEYS, ("hf", "gguf")),  # gguf: the language model alone
}


def formats_for(model_type: str) -> tuple[str, ...]:
    """The export formats of a model type (``()``: none yet)."""
    entry = CAUSAL_LM_EXPORTS.get(model_type)
    return entry[1] if entry else ()


def check_format(model_type: str, fmt: str, where: str) -> DecoderWidthKeys:
    """The width keys of ``model_type``; a one-line error naming the family and its formats when ``fmt`` cannot
    hold it."""
    if fmt not in FORMATS:
        raise ValueError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    held = formats_for(model_type)
    if fmt not in held:
        raise ValueError(f"{where}: a {model_type} model cannot be exported as {fmt} (formats for {model_type}: "
                         f"{', '.join(held) if held else 'none yet'}; {fmt} holds: "
                         f"{', '.join(t for t in CAUSAL_LM_EXPORTS if fmt in formats_for(t))})")
    return CAUSAL_LM_EXPORTS[model_type][0]
