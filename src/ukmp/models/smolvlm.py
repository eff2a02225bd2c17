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

from functools import lru_cache, wraps

from ukmp.models.base import BatchLayout
from ukmp.models.vision_decoder import VisionDecoderAdapter

FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN = "<fake_token_around_image>", "<global-img>"
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)  # SmolVLM's and Idefics3's image processors


class SmolVLMAdapter(VisionDecoderAdapter):
    vision_prefix = "model.vision_model"

    def batch_layout(self) -> BatchLayout:
        """One image read at the tower's size, without tiling: ``(size / patch)^2 / scale_factor^2`` image tokens
        (the pixel shuffle folds ``scale_factor^2`` patches into one token), written as the Idefics3 processor
        expands ``<image>`` for an untiled image -- ``<fake_token_around_image><global-img>``, the image tokens,
        ``<fake_token_around_image>`` -- and pixels made as its image processor makes them (longest edge, then
        square, Lanczos; mean and std 0.5)."""
        vc = self.config.vision_config
        return BatchLayout(decoder_only=True, image_tokens=_image_tokens(self.config),
                           image_token_id=getattr(self.config, "image_token_id", None),
                           image_size=int(vc.image_size), patch_size=int(vc.patch_size), fixed_image_size=True,
                           image_prefix=(FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN), image_suffix=(FAKE_IMAGE_TOKEN,),
                           image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD, image_resize="idefics3")

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


@lru_cache(maxsize=None)
def single_image_class(model_type: str) -> type:
    """The stock ``*ForConditionalGeneration`` of ``model_type`` whose base model (``.model``) takes 4-D
    ``pixel_values`` as one image per sample. Both ``forward`` and ``generate`` (which encodes the images first,
    through ``base_model.get_image_features``) reach the pixels through that one method, so it alone is changed;
    weights, state-dict keys and ``from_pretrained`` stay the stock class's. One class per type (cached)."""
    import transformers

    outer, inner = {"smolvlm": (transformers.SmolVLMForConditionalGeneration, transformers.SmolVLMModel),
                    "idefics3": (transformers.Idefics3ForConditionalGeneration, transformers.Idefics3Model)}[model_type]

    @wraps(inner.get_image_features)  # generate() reads the stock signature
    def get_image_features(self, pixel_values, pixel_attention_mask=None, **kwargs):
        if pixel_values.dim() == 4:
            pixel_values = pixel_values.unsqueeze(1)
        if pixel_attention_mask is not None and pixel_attention_mask.dim() == 3:
            pixel_attention_mask = pixel_attention_mask.unsqueeze(1)
        return inner.get_image_features(self, pixel_values, pixel_attention_mask, **kwargs)

    base_name = inner.__name__.replace("Model", "SingleImageModel")
    base_cls = type(base_name, (inner,), {"get_image_features": get_image_features, "__module__": __name__,
                                          "__qualname__": base_name})

    def __init__(self, config, *args, **kwargs):
        outer.__init__(self, config, *args, **kwargs)
        self.model.__class__ = base_cls  # the same module, one method more lenient

    name = outer.__name__.replace("ForConditionalGeneration", "SingleImage")
    return type(name, (outer,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})
