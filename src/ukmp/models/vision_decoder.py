"""The shape LLaVA, LLaVA-OneVision and SmolVLM / Idefics3 share: a ViT with CLIP's module layout
(:class:`ClipVisionPart`) feeding a decoder-only language model through a connector that is never pruned, with
``lm_head`` on the whole model.

A subclass says where the tower sits (``vision_prefix``), which model class to build, which processor a
random-weights build gets (:meth:`VisionDecoderAdapter.build_processor`) and its batch layout: a family whose
image always becomes the same number of tokens derives from :class:`FixedSizeVisionDecoder` and says how many
(:meth:`FixedSizeVisionDecoder.image_tokens`). Everything else -- the parts, the adapter's name, which parameters
are language, the token masks of the streaming histograms, the language model the perplexity task reads -- is the
same for all of them.

:func:`one_image_per_sample` makes the class a model type runs as when ukmp's batches (one image per sample,
``pixel_values [B, 3, H, W]``) are not what the stock model reads: a subclass of the stock class whose base model
turns such pixels into the stock input before encoding them, and changes nothing else.
"""

from __future__ import annotations

import inspect
from abc import abstractmethod
from functools import wraps
from typing import Callable, Mapping

import torch
from torch import nn

from ukmp.models.base import BatchLayout, ModelAdapter
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

    @abstractmethod
    def build_processor(self, tokenizer, corpus=None):
        """The family's processor around ``tokenizer`` (adds its image token); each subclass builds its own."""

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


class FixedSizeVisionDecoder(VisionDecoderAdapter):
    """A family whose image always becomes the same number of tokens (LLaVA, SmolVLM untiled): one image per
    sample, read at the tower's size. A native-resolution family (Qwen2.5-VL) derives from
    :class:`VisionDecoderAdapter` and writes its own ``batch_layout``."""

    @abstractmethod
    def image_tokens(self) -> int:
        """Image placeholder tokens of one image read at the tower's ``image_size``."""

    def batch_layout(self) -> BatchLayout:
        """One image per sample, always read at the tower's size (another size would change the token count)."""
        vc = self.config.vision_config
        return BatchLayout(decoder_only=True, image_tokens=self.image_tokens(),
                           image_token_id=getattr(self.config, "image_token_id", None),
                           image_size=int(vc.image_size), patch_size=int(vc.patch_size), fixed_image_size=True)


def one_image_per_sample(outer: type, inner: type, lift: Callable[[object, dict], None]) -> type:
    """The stock ``outer`` (``*ForConditionalGeneration``) whose base model (``.model``, an ``inner``) runs
    ``lift(config, arguments)`` on the arguments of ``get_image_features`` (named as in the stock signature) before
    the stock method reads them. Both ``forward`` and ``generate`` reach the pixels through that one method, so it
    alone changes; weights, state-dict keys and ``from_pretrained`` stay the stock class's. The class is named
    ``<Type>SingleImage`` (cache it per model type: a new class per call would defeat type checks)."""
    stock = inner.get_image_features
    signature = inspect.signature(stock)
    var_kw = [p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD]

    @wraps(stock)  # generate() reads the stock signature
    def get_image_features(self, *args, **kwargs):
        named = dict(signature.bind_partial(self, *args, **kwargs).arguments)
        named.pop(next(iter(signature.parameters)))  # self
        extra = named.pop(var_kw[0], {}) if var_kw else {}
        lift(self.config, named)
        # by name: the stock decorators fill unnamed arguments from the config and would see them twice
        return stock(self, **named, **extra)

    base_name = inner.__name__.replace("Model", "SingleImageModel")
    base_cls = type(base_name, (inner,), {"get_image_features": get_image_features, "__module__": __name__,
                                          "__qualname__": base_name})

    def __init__(self, config, *args, **kwargs):
        outer.__init__(self, config, *args, **kwargs)
        self.model.__class__ = base_cls  # the same module, one method more lenient

    name = outer.__name__.replace("ForConditionalGeneration", "SingleImage")
    return type(name, (outer,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})
