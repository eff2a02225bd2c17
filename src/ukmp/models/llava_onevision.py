"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): LLaVA's module layout -- ``model.vision_tower``,
``model.multi_modal_projector``, ``model.language_model`` (a base model) and ``lm_head`` on top -- with a
SigLIP tower, a Qwen2 language model, a learned ``image_newline`` vector and AnyRes tiling.

Group ids (as LLaVA)::

    vision.layers.{i}.attn     SigLIP heads (q, k, v rows and biases + out_proj columns)
    vision.layers.{i}.mlp      SigLIP MLP channels (fc1 row + bias, fc2 column)
    lm.layers.{i}.attn         Qwen2 KV groups (q, k, v rows and biases + o columns)
    lm.layers.{i}.mlp          Qwen2 MLP channels (gate/up rows + down column)

SigLIP's attention views q/k/v with ``-1`` heads and its modules carry CLIP's names, so the CLIP part serves
it (as for SmolVLM). The language model reads the hidden state of ``vision_feature_layer`` (the released
checkpoints: -1, the last layer, so nothing is unused); a config that reads an earlier layer has the layers
after it dropped by a plan's ``drop_layers`` exactly as LLaVA-1.5 (this adapter is LLaVA's, with the image
token count and the model class changed). Never pruned: the patch and position embeddings, layer norms, the
projector, ``image_newline``, embeddings and ``lm_head``.

**AnyRes.** The processor (:class:`OnevisionImageTextProcessor`, the slow PIL image processor) resizes an
image to the grid of ``image_grid_pinpoints`` that fits it best, cuts that into tiles of the tower's size and
puts a resized copy of the whole image first (``pixel_values [B, tiles + 1, 3, S, S]``, ``image_sizes``);
the model keeps the tiles' features inside the image's own aspect ratio, ends each row of them with
``image_newline`` and writes ``(S / patch)^2`` base tokens plus those, so the token count depends on each
image's size. ukmp's batches carry one image per sample at the tower's size ``S x S`` (``pixel_values``
``[B, 3, S, S]``): for such an image the best grid is the single ``S x S`` tile (a pinpoint of every released
config, required here), its tile equals the base image, and it becomes ``2 p^2 + p`` tokens (``p``
``= S / patch``). :func:`single_image_class` feeds such 4-D pixels to the stock model as the processor would (two
equal tiles, ``image_sizes = [S, S]``); 5-D input with ``image_sizes`` passes through untouched, so batches of
the processor run as in the stock model.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from transformers import (LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessorPil,
                          LlavaOnevisionModel, LlavaOnevisionProcessor)

from ukmp.models.llava import LlavaAdapter
from ukmp.models.vision_decoder import one_image_per_sample


class LlavaOnevisionAdapter(LlavaAdapter):
    def __init__(self, config, lm_family: str, lm_part):
        size = int(config.vision_config.image_size)
        if [size, size] not in [list(p) for p in config.image_grid_pinpoints]:
            raise ValueError(f"model config: llava_onevision image_grid_pinpoints lack [{size}, {size}] (the "
                             f"tower's size), which one image per sample is read as")
        strategy = config.vision_feature_select_strategy
        if strategy != "full":
            raise ValueError(f"model config: llava_onevision vision_feature_select_strategy {strategy!r} is not "
                             f"supported (AnyRes tiles need every patch: 'full')")
        super().__init__(config, lm_family, lm_part)

    def image_tokens(self) -> int:
        """An ``S x S`` image: the base image's ``p^2`` patches, the one tile's ``p^2`` and ``p`` row ends."""
        vc = self.config.vision_config
        p = int(vc.image_size) // int(vc.patch_size)
        return 2 * p * p + p

    def model_class(self):
        return single_image_class()

    def build_processor(self, tokenizer, corpus=None):
        return build_onevision_processor(tokenizer, self.config)

    def load_processor(self, source: str):
        """:class:`OnevisionImageTextProcessor` (``AutoProcessor`` would also load the video processor, which
        needs torchvision)."""
        return OnevisionImageTextProcessor.from_pretrained(source)


def _lift(config, args: dict) -> None:
    """4-D pixels without ``image_sizes``: each an ``S x S`` image, given as the processor gives it (its resized
    whole image and its one tile, both the image itself) with ``image_sizes = [S, S]``."""
    pixels = args.get("pixel_values")
    if pixels is None or pixels.dim() != 4 or args.get("image_sizes") is not None:
        return
    size = int(config.vision_config.image_size)
    if tuple(pixels.shape[-2:]) != (size, size):
        raise ValueError(f"pixel_values: one image per sample must be {size} x {size} (the tower's size), "
                         f"got {tuple(pixels.shape[-2:])}; give other sizes through the processor (5-D pixel "
                         f"values with image_sizes)")
    args["pixel_values"] = pixels.unsqueeze(1).expand(-1, 2, -1, -1, -1)
    args["image_sizes"] = torch.tensor([[size, size]] * pixels.shape[0], device=pixels.device)


@lru_cache(maxsize=None)
def single_image_class() -> type:
    """``LlavaOnevisionForConditionalGeneration`` whose base model also takes 4-D ``pixel_values`` (one
    ``S x S`` image per sample, :func:`_lift`); the same weights, keys and ``from_pretrained``."""
    return one_image_per_sample(LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel, _lift)


class OnevisionImageTextProcessor(LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` without its video processor (which needs torchvision, not a dependency):
    images and text only. ``from_pretrained`` reads a checkpoint's image processor, tokenizer and processor
    settings (``num_image_tokens``, ``vision_feature_select_strategy``, the chat template), no video processor."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                 vision_aspect_ratio="anyres_max_9", **kwargs):
        kwargs.pop("video_token", None)
        super().__init__(image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy,
                         chat_template=chat_template, image_token=image_token,
                         vision_aspect_ratio=vision_aspect_ratio, **kwargs)


def build_onevision_processor(tokenizer, config):
    """The image-and-text processor of a random-weights build: the slow (PIL) AnyRes image processor at the
    tower's size with the config's pinpoints, SigLIP's mean/std 0.5 and bicubic resizing; ``<image>`` (added to
    the tokenizer) expands to each image's own token count. Plain prompts, no chat template: the released
    processors carry Qwen2's ChatML one (``<|im_start|>`` / ``<|im_end|>`` turns, ``<image>`` before the text),
    whose tokens a tokenizer trained here does not have."""
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    vc = config.vision_config
    size = int(vc.image_size)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": size, "width": size},
        image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True)
    return OnevisionImageTextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=(size // int(vc.patch_size)) ** 2,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio)
