"""A plain decoder-only causal LM (Llama family, OPT): language-only pruning, perplexity evaluation."""

from __future__ import annotations

from typing import Mapping

import torch

from ukmp.models.base import ModelAdapter


class CausalLMAdapter(ModelAdapter):
    layout = "decoder_only"
    modalities = ("language",)

    def __init__(self, config, family: str, lm_part):
        super().__init__(config)
        self.lm_family = family
        self.name = f"causal-lm-{family}"
        self.lm = lm_part
        self.parts = [lm_part]

    def modality_of_param(self, name: str) -> str:
        return "language"

    def stream_masks(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        return {"lm": batch.get("attention_mask")}

    def model_class(self):
        """The concrete ``*ForCausalLM`` class of this config (``LlamaForCausalLM``, ``OPTForCausalLM``, ...)."""
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

        return MODEL_FOR_CAUSAL_LM_MAPPING[type(self.config)]
