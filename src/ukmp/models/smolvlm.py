"""SmolVLM and Idefics3 (``SmolVLMForConditionalGeneration``, ``Idefics3ForConditionalGeneration``): a SigLIP vision
tower, a pixel-shuffle connector and a Llama-family language model (transformers 5 nests ``model.vision_model``,
``model.connector`` and ``model.text_model``, a base model, under ``model``; ``lm_head`` sits at the top). The two
model types share every module path and shape.

Group ids::

    vision.layers.{i}.attn     SigLIP heads (q, k, v rows and biases + out_proj columns)
    vision.layers.{i}.mlp      SigLIP MLP channels (fc1 row + bias, fc2 column)
    lm.layers.{i}.attn         language-model KV groups
    lm.layers.{i}.mlp          language-model MLP channels

In transformers 5.24 the SigLIP attention of both types views q/k/v as ``(*shape, -1, head_dim)`` and uses
``num_heads`` nowhere in its forward, and its modules are named as CLIP's (``q_proj``, ``k_proj``, ``v_proj``,
``out_proj``; ``mlp.fc1``, ``mlp.fc2`` under ``encoder.layers``), so the CLIP part serves unchanged.
The connector reads the tower's *last* hidden state (after ``post_layernorm``): no vision layer is unused, nothing is
dropped. Never pruned: the patch and position embeddings, layer norms, the connector (pixel shuffle + modality
projection), embeddings and ``lm_head``.

ukmp's batches carry one image per sample as ``pixel_values [B, 3, H, W]``; the stock model wants
``[B, images, 3, H, W]``. :func:`single_image_class` is a subclass whose base model adds the image axis to 4-D
pixel values (and 3-D pixel masks) and changes nothing else: same weights, same state-dict keys, 5-D input passes
through untouched. The image is never split into tiles: its text is what the Idefics3 processor writes for one
untiled image (``<fake_token_around_image><global-img>`` + the image tokens + ``<fake_token_around_image>``; the
``<row_i_col_j>`` tile tokens only appear with tiling) and its pixels what its image processor makes with
``do_image_splitting=False`` at the tower's size (:meth:`SmolVLMAdapter.batch_layout`, ``ukmp.data.prompts``).
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

from ukmp.models.base import BatchLayout
from ukmp.models.vision_decoder import FixedSizeVisionDecoder, one_image_per_sample

FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN = "<fake_token_around_image>", "<global-img>"
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)  # SmolVLM's and Idefics3's image processors


class SmolVLMAdapter(FixedSizeVisionDecoder):
    vision_prefix = "model.vision_model"

    def image_tokens(self) -> int:
        """One image read at the tower's size, without tiling: ``(size / patch)^2 / scale_factor^2`` image tokens
        (the pixel shuffle folds ``scale_factor^2`` patches into one token)."""
        return _image_tokens(self.config)

    def batch_layout(self) -> BatchLayout:
        """The shared layout, with the image written as the Idefics3 processor expands ``<image>`` for an untiled
        image -- ``<fake_token_around_image><global-img>``, the image tokens, ``<fake_token_around_image>`` -- and
        pixels made as its image processor makes them (longest edge, then square, Lanczos; mean and std 0.5)."""
        return replace(super().batch_layout(), image_prefix=(FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN),
                       image_suffix=(FAKE_IMAGE_TOKEN,), image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD,
                       image_resize="idefics3")

    def build_processor(self, tokenizer, corpus=None):
        return build_smolvlm_processor(tokenizer, self.config)

    def model_class(self):
        return single_image_class(self.config.model_type)


def _image_tokens(config) -> int:
    vc, s = config.vision_config, int(config.scale_factor)
    return (int(vc.image_size) // int(vc.patch_size)) ** 2 // (s * s)


def build_smolvlm_processor(tokenizer, config):
    """An ``Idefics3Processor`` (SmolVLM's prompt format; ``SmolVLMProcessor`` itself needs ``num2words``, which
    ukmp does not depend on) with image splitting off: one image at the tower's size, mean/std 0.5, whose
    ``<image>`` expands to ``<fake_token_around_image><global-img>`` + the image tokens + the fake token again. It
    adds ``<global-img>``, ``<fake_token_around_image>``, ``<image>`` and ``<end_of_utterance>`` to the tokenizer."""
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    tokenizer.add_tokens([GLOBAL_IMAGE_TOKEN], special_tokens=True)  # the processor adds the other three
    size = int(config.vision_config.image_size)
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": size}, max_image_size={"longest_edge": size},
        image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD), do_convert_rgb=True)
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                             image_seq_len=_image_tokens(config))


def _lift(config, args: dict) -> None:
    """One image per sample: 4-D pixels (and 3-D pixel masks) gain the image axis the stock model reads."""
    pixels, mask = args.get("pixel_values"), args.get("pixel_attention_mask")
    if pixels is not None and pixels.dim() == 4:
        args["pixel_values"] = pixels.unsqueeze(1)
    if mask is not None and mask.dim() == 3:
        args["pixel_attention_mask"] = mask.unsqueeze(1)


@lru_cache(maxsize=None)
def single_image_class(model_type: str) -> type:
    """The stock ``*ForConditionalGeneration`` of ``model_type`` whose base model takes 4-D ``pixel_values`` as one
    image per sample (:func:`~ukmp.models.vision_decoder.one_image_per_sample`; 5-D input passes through)."""
    import transformers

    outer, inner = {"smolvlm": (transformers.SmolVLMForConditionalGeneration, transformers.SmolVLMModel),
                    "idefics3": (transformers.Idefics3ForConditionalGeneration, transformers.Idefics3Model)}[model_type]
    return one_image_per_sample(outer, inner, _lift)
