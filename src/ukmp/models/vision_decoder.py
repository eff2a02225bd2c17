"""The shape LLaVA and SmolVLM / Idefics3 share: a ViT with CLIP's module layout (:class:`ClipVisionPart`) feeding a
decoder-only language model through a connector that is never pruned, with ``lm_head`` on the whole model.

A subclass says where the tower sits (``vision_prefix``), which model class to build and how a batch is laid out
(:meth:`batch_layout`); everything else -- the parts, the adapter's name, which parameters are language, the token
masks of the streaming histograms, the language model the perplexity task reads -- is the same for both.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ukmp.models.base import ModelAdapter
from ukmp.models.parts.clip import ClipVisionPart


class VisionDecoderAdapter(ModelAdapter):
    layout = "decoder_only"
    modalities = ("vision", "language")
    vision_prefix = ""  # the vision tower's module path, e.g. "model.vision_tower"

    def __init__(self, config, lm_family: str, lm_part):
        super().__init__(config)
        self.lm_family = lm_family
        self.name = f"{config.model_type}-{lm_family}"
        self.vision = self.vision_part()
        self.lm = lm_part
        self.parts = [self.vision, self.lm]

    def vision_part(self):
        """The vision tower's part (CLIP's module layout unless a subclass says otherwise)."""
        return ClipVisionPart(self.config.vision_config, self.vision_prefix)

    def modality_of_param(self, name: str) -> str:
        if name.startswith("lm_head."):
            return "language"
        return super().modality_of_param(name)

    def stream_masks(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        return {"vision": None, "lm": batch.get("attention_mask")}

    def language_model(self, model: nn.Module) -> nn.Module:
        """The whole model: the nested language model is a base model without ``lm_head``, and the whole model gives
        the same logits for text alone (no ``pixel_values``)."""
        return model
