"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): a windowed-attention ViT with fused ``qkv`` and 2-D rotary
embeddings, a patch merger, and a Qwen2 language model with multimodal rotary positions (M-RoPE). transformers 5
nests ``model.visual`` and ``model.language_model`` (a base model) under ``model``; ``lm_head`` sits at the top.

Group ids::

    vision.layers.{i}.attn     ViT heads (q, k, v row blocks of the fused qkv + proj columns; parts/qwen_vision.py)
    vision.layers.{i}.mlp      ViT gated MLP channels (gate_proj, up_proj rows and biases + down_proj column)
    lm.layers.{i}.attn         language-model KV groups (q/k/v rows and biases, o columns; parts/decoder.py)
    lm.layers.{i}.mlp          language-model MLP channels

The merger reads the tower's last block, so no vision layer is unused and nothing is dropped. M-RoPE rotates each
head's q and k by (temporal, height, width) positions with one table shared by every head, so removing whole KV
groups leaves it valid. Never pruned: the patch embedding, the norms, the merger, embeddings and ``lm_head``.

**Images.** The model takes every image of a batch as one flat sequence of patches (``pixel_values
[patches, 3 * temporal * patch^2]``, in 2 x 2 merge-window order) with ``image_grid_thw [images, 3]``, and its
M-RoPE positions need ``mm_token_type_ids`` (1 at image tokens), which Qwen's processor writes. ukmp's batches carry
one image per sample as ``pixel_values [B, 3, H, W]``: read at the adapter's square size for evaluation, and near
each image's own aspect ratio in calibration and recovery (``BatchLayout.native_resolution``: the collator pads the
images of a batch to the largest and adds ``image_sizes [B, 2]``). :func:`batched_image_class` is the stock class
whose ``forward`` and ``generate`` crop each image to its size, turn the pixels into the flat layout
(:func:`pack_images`, the same numbers as ``Qwen2VLImageProcessorPil``'s patches) and derive ``mm_token_type_ids``
from the image token. Native inputs (flat pixels with ``image_grid_thw``, as the processor builds them) pass
through untouched.
"""

from __future__ import annotations

from functools import lru_cache, wraps
from typing import Sequence

import torch

from ukmp.models.base import BatchLayout
from ukmp.models.parts.qwen_vision import GATED_MLP, PLAIN_MLP, QwenVisionPart
from ukmp.models.vision_decoder import VisionDecoderAdapter

DEFAULT_IMAGE_SIZE = 448  # ukmp's fixed read size for a hub config: 32 x 32 patches of 14 px -> 256 image tokens


class Qwen2_5_VLAdapter(VisionDecoderAdapter):
    vision_prefix = "model.visual"
    vision_mlp = GATED_MLP

    def __init__(self, config, lm_family: str, lm_part):
        super().__init__(config, lm_family, lm_part)
        image_text_processor_class(config.model_type)  # a saved processor of this type loads back (see there)

    def vision_part(self):
        return QwenVisionPart(self.config.vision_config, self.vision_prefix, self.vision_mlp)

    def modality_of_param(self, name: str) -> str:
        """The patch merger sits inside the tower's module but is the connector (LLaVA's projector): a bridge."""
        if name.startswith(f"{self.vision_prefix}.merger."):
            return "bridge"
        return super().modality_of_param(name)

    def batch_layout(self) -> BatchLayout:
        """One image per sample: ``(size / (patch * merge))^2`` image tokens at the square :func:`image_size` (a
        multiple of ``patch * merge``, the layout's ``patch_size``) in evaluation; ``h * w / (patch * merge)^2`` at
        the aspect-preserving size the collators read (``native_resolution``, at most ``size^2`` pixels)."""
        vc = self.config.vision_config
        size, unit = image_size(self.config), int(vc.patch_size) * int(vc.spatial_merge_size)
        return BatchLayout(decoder_only=True, image_tokens=(size // unit) ** 2,
                           image_token_id=int(self.config.image_token_id), image_size=size, patch_size=unit,
                           fixed_image_size=True, native_resolution=True)

    def model_class(self):
        return batched_image_class(self.config.model_type)

    def build_processor(self, tokenizer, corpus=None):
        return build_qwen_vl_processor(tokenizer, self.config)

    def load_processor(self, source: str):
        """The image-text processor without its video processor (the stock one cannot load without torchvision)."""
        return image_text_processor_class(self.config.model_type).from_pretrained(source)


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    """Qwen3-VL (``Qwen3VLForConditionalGeneration``): the same fused-qkv attention and input layout; its ViT's MLP
    is plain (``linear_fc1`` / ``linear_fc2``), attention is global (no windows), and DeepStack mergers
    (``model.visual.deepstack_merger_list``) hand the outputs of blocks ``deepstack_visual_indexes`` to the first
    language-model layers. Those blocks all lie before the last, which the main merger reads: still no unused
    layer. The mergers are bridges, never pruned. Its Qwen3 LM normalises q and k per head (``q_norm`` /
    ``k_norm``: one ``[head_dim]`` weight shared by every head), which whole-KV-group slicing leaves valid, and
    has no attention biases."""

    vision_mlp = PLAIN_MLP

    def modality_of_param(self, name: str) -> str:
        if name.startswith(f"{self.vision_prefix}.deepstack_merger_list."):
            return "bridge"
        return super().modality_of_param(name)


def image_size(config) -> int:
    """The square size ukmp reads images at: ``vision_config.image_size`` when the config has one (the tiny
    builds), else :data:`DEFAULT_IMAGE_SIZE`; refused when the patches cannot tile it into merge windows."""
    vc = config.vision_config
    size = int(getattr(vc, "image_size", None) or DEFAULT_IMAGE_SIZE)
    unit = int(vc.patch_size) * int(vc.spatial_merge_size)
    if size % unit:
        raise ValueError(f"model config: vision_config.image_size {size} is not a multiple of patch_size x "
                         f"spatial_merge_size ({unit})")
    return size


def pack_images(images: torch.Tensor | Sequence[torch.Tensor], patch: int, merge: int,
                temporal: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(``pixel_values [patches, 3 * temporal * patch^2]``, ``image_grid_thw [images, 3]``) of normalised images
    ``[B, 3, H, W]`` (or a list of ``[3, H, W]`` of any sizes that are multiples of ``patch * merge``).

    Each image's patches are listed merge window by merge window (row-major over windows, then row-major inside a
    ``merge x merge`` window), each patch flattened as (channel, time, row, column) with the still image repeated
    over ``temporal`` frames: the layout ``Qwen2VLImageProcessorPil`` writes, so the numbers are the same."""
    flat, grids = [], []
    for img in images:
        c, h, w = img.shape
        if h % (patch * merge) or w % (patch * merge):
            raise ValueError(f"pixel_values: image of {h} x {w} is not a multiple of patch x merge "
                             f"({patch * merge})")
        gh, gw = h // patch, w // patch
        x = img.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch)
        x = x.permute(1, 4, 2, 5, 0, 3, 6)  # (windows h, windows w, row in window, col in window, c, py, px)
        x = x.unsqueeze(5).expand(*x.shape[:5], temporal, patch, patch)
        flat.append(x.reshape(gh * gw, c * temporal * patch * patch))
        grids.append([1, gh, gw])
    device = flat[0].device
    return torch.cat(flat), torch.tensor(grids, dtype=torch.long, device=device)


def _native_inputs(model, kwargs: dict) -> dict:
    """``kwargs`` with 4-D ``pixel_values`` packed (:func:`pack_images`) and ``mm_token_type_ids`` derived from
    ``input_ids`` when images come without them; anything else unchanged."""
    pix, sizes = kwargs.get("pixel_values"), kwargs.pop("image_sizes", None)
    if isinstance(pix, torch.Tensor) and pix.dim() == 4:
        if kwargs.get("image_grid_thw") is not None:
            raise ValueError("pixel_values: 4-D images come with no image_grid_thw (it is derived from them)")
        if sizes is not None:  # zero-padded images of several resolutions: each cropped to its own size
            pix = [p[:, : int(h), : int(w)] for p, (h, w) in zip(pix, sizes.tolist())]
        vc = model.config.vision_config
        kwargs["pixel_values"], kwargs["image_grid_thw"] = pack_images(
            pix, int(vc.patch_size), int(vc.spatial_merge_size), int(vc.temporal_patch_size))
    ids = kwargs.get("input_ids")
    if kwargs.get("image_grid_thw") is not None and kwargs.get("mm_token_type_ids") is None and ids is not None:
        kwargs["mm_token_type_ids"] = (ids == model.config.image_token_id).to(torch.int32)
    return kwargs


@lru_cache(maxsize=None)
def batched_image_class(model_type: str) -> type:
    """The stock ``*ForConditionalGeneration`` of ``model_type`` whose ``forward`` and ``generate`` also take
    ``pixel_values [B, 3, H, W]`` as one image per sample (see the module docstring); weights, state-dict keys and
    ``from_pretrained`` stay the stock class's. One class per type (cached)."""
    import transformers

    stock = {"qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
             "qwen3_vl": transformers.Qwen3VLForConditionalGeneration}[model_type]

    @wraps(stock.forward)  # generate() reads the stock signature (mm_encoder_outputs, the image kwargs)
    def forward(self, input_ids=None, **kwargs):
        return stock.forward(self, **_native_inputs(self, {"input_ids": input_ids, **kwargs}))

    @wraps(stock.generate)
    def generate(self, inputs=None, **kwargs):
        if inputs is not None:
            kwargs["input_ids"] = inputs
        return stock.generate(self, **_native_inputs(self, kwargs))

    name = stock.__name__.replace("ForConditionalGeneration", "BatchedImages")
    return type(name, (stock,), {"forward": forward, "generate": generate, "__module__": __name__,
                                 "__qualname__": name})


def build_qwen_vl_processor(tokenizer, config):
    """A :func:`image_text_processor_class` around ``tokenizer`` with the PIL ``Qwen2VLImageProcessorPil`` (CLIP
    mean/std, bicubic, each image resized to a multiple of ``patch * merge`` near its own aspect ratio, at most
    ``image_size^2`` pixels). It adds ``<|vision_start|>``, ``<|image_pad|>`` and ``<|vision_end|>`` to the
    tokenizer; ``<|image_pad|>`` expands to one token per merged patch of each image. The real Qwen prompt wraps the
    pads as ``<|vision_start|><|image_pad|><|vision_end|>`` inside its chat template; ukmp's plain prompts put the
    pads first."""
    from transformers import Qwen2VLImageProcessorPil

    tokenizer.add_tokens(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"], special_tokens=True)
    vc, size = config.vision_config, image_size(config)
    unit = int(vc.patch_size) * int(vc.spatial_merge_size)
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": unit * unit, "longest_edge": size * size}, patch_size=int(vc.patch_size),
        merge_size=int(vc.spatial_merge_size), temporal_patch_size=int(vc.temporal_patch_size))
    return image_text_processor_class(config.model_type)(image_processor=image_processor, tokenizer=tokenizer)


@lru_cache(maxsize=None)
def image_text_processor_class(model_type: str = "qwen2_5_vl") -> type:
    """The stock ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor`` without its video processor. transformers 5.24
    checks every processor attribute's class, and the video processor's needs torchvision, which ukmp does not
    install: the stock class cannot be built (or loaded) without it, even for images alone. This subclass drops the
    ``video_processor`` argument and nothing else (the same tokens, image expansion and ``mm_token_type_ids``); it
    is registered with ``AutoProcessor`` for the model's config class once, here, so a saved copy loads back through
    ``AutoProcessor.from_pretrained``."""
    import transformers
    from transformers import AutoProcessor
    from transformers.processing_utils import ProcessorMixin

    stock, config_cls = {"qwen2_5_vl": (transformers.Qwen2_5_VLProcessor, transformers.Qwen2_5_VLConfig),
                         "qwen3_vl": (transformers.Qwen3VLProcessor, transformers.Qwen3VLConfig)}[model_type]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        for kind, default in (("image", "<|image_pad|>"), ("video", "<|video_pad|>"),
                              ("vision_start", "<|vision_start|>"), ("vision_end", "<|vision_end|>")):
            token = getattr(tokenizer, f"{kind}_token", None) or default
            setattr(self, f"{kind}_token", token)
            setattr(self, f"{kind}_token_id", tokenizer.convert_tokens_to_ids(token))
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    name = stock.__name__.replace("Processor", "ImageTextProcessor")
    cls = type(name, (stock,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})
    AutoProcessor.register(config_cls, cls, exist_ok=True)
    return cls
