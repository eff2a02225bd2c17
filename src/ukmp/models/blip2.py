"""BLIP-2 and InstructBLIP (ViT + Q-Former + language model): the ViT part plus a T5, OPT or Llama-family
language-model part. InstructBLIP has BLIP-2's module layout; its Q-Former also reads the prompt
(``qformer_input_ids``), which :class:`~ukmp.models.base.BatchLayout` ``qformer_text`` tells batch builders.

Group ids::

    vision.layers.{i}.attn          ViT heads   (fused qkv rows of q, k, v thirds + projection columns)
    vision.layers.{i}.mlp           ViT MLP channels (fc1 row + bias, fc2 column)
    text_enc.block.{i}.attn         T5 encoder self-attention heads (q, k, v rows + o columns)
    text_enc.block.{i}.ffn          T5 encoder FFN channels (wi_0, wi_1 rows + wo column)
    text_dec.block.{i}.self_attn    T5 decoder self-attention heads
    text_dec.block.{i}.cross_attn   T5 decoder cross-attention heads
    text_dec.block.{i}.ffn          T5 decoder FFN channels
    lm.layers.{i}.attn              decoder-only LM KV groups (OPT: heads)
    lm.layers.{i}.mlp               decoder-only LM MLP channels

Never pruned: the Q-Former, query tokens, embeddings, ``language_projection``, layer norms, ``lm_head`` and the T5
relative-attention-bias tables (which keep every original head column; pruned layers select theirs).
"""

from __future__ import annotations

from typing import Mapping

import torch

from ukmp.models.base import ModelAdapter, RemovedSlice, RemovedWeights, count_parameters
from ukmp.models.parts.decoder import DecoderPart
from ukmp.models.parts.t5 import T5Part
from ukmp.models.parts.vit import Blip2VisionPart

__all__ = ["Blip2Adapter", "Blip2T5Adapter", "RemovedSlice", "RemovedWeights", "count_parameters"]


class Blip2Adapter(ModelAdapter):
    """Structure of a ``Blip2ForConditionalGeneration`` or an ``InstructBlipForConditionalGeneration`` (the same
    module layout; InstructBLIP's Q-Former also reads the prompt) given its language-model part."""

    modalities = ("vision", "language")

    def __init__(self, config, lm_family: str, lm_part):
        super().__init__(config)
        self.lm_family = lm_family
        self.instruct = config.model_type == "instructblip"
        self.name = f"{'instructblip' if self.instruct else 'blip2'}-{lm_family}"
        self.layout = "decoder_only" if isinstance(lm_part, DecoderPart) else "encoder_decoder"
        self.vision = Blip2VisionPart(config.vision_config, "vision_model")
        self.lm = lm_part
        self.parts = [self.vision, self.lm]

    def stream_masks(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        if self.layout == "encoder_decoder":
            return {"vision": None, "encoder": batch.get("attention_mask"),
                    "decoder": batch.get("decoder_attention_mask")}
        return {"vision": None, "lm": batch.get("attention_mask")}

    def batch_layout(self):
        from ukmp.models.base import BatchLayout

        vc = self.config.vision_config
        return BatchLayout(decoder_only=self.layout == "decoder_only", image_tokens=int(self.config.num_query_tokens),
                           image_token_id=getattr(self.config, "image_token_index", None),
                           image_size=int(vc.image_size), patch_size=int(vc.patch_size), qformer_text=self.instruct)

    def build_processor(self, tokenizer, corpus=None):
        """A ``Blip2Processor``; for InstructBLIP an ``InstructBlipProcessor`` whose second tokenizer (trained
        on ``corpus`` as the first) reads the prompt for the Q-Former."""
        from ukmp.models.processors import build_processor, build_tokenizer

        qformer_tok = build_tokenizer(corpus) if self.instruct else None
        size = int(self.config.vision_config.image_size)
        return build_processor(tokenizer, int(self.config.num_query_tokens), size, qformer_tok)

    def model_class(self):
        from transformers import Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

        return InstructBlipForConditionalGeneration if self.instruct else Blip2ForConditionalGeneration


class Blip2T5Adapter(Blip2Adapter):
    """BLIP-2 with an encoder-decoder T5 language model (FlanT5)."""

    def __init__(self, config):
        if getattr(config, "use_decoder_only_language_model", False):
            raise ValueError("model config: only T5 (encoder-decoder) language models are supported by blip2-t5")
        super().__init__(config, "t5", T5Part(config.text_config, "language_model"))
