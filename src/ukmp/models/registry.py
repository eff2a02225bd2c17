"""One registry from a Hugging Face config to the adapter that understands it; everything else is refused by name.

Whole models are keyed by ``model_type``; composite models (BLIP-2) pick their language-model part by the text
config's ``model_type``. :func:`register_model` / :func:`register_language_model` validate what they insert.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from ukmp.models import families
from ukmp.models.base import ModelAdapter, Part
from ukmp.models.parts.decoder import LLAMA, OPT, DecoderPart
from ukmp.models.parts.t5 import T5Part

LMFactory = Callable[[object, str], Part]  # (text config, prefix) -> part
LANGUAGE_MODELS: dict[str, tuple[str, LMFactory]] = {}  # text model_type -> (family, factory)
MODELS: dict[str, Callable[[object], ModelAdapter]] = {}  # whole-model model_type -> adapter factory


def register_language_model(model_type: str, family: str, factory: LMFactory,
                            task_kinds: tuple[str, ...] | None = None) -> None:
    """``task_kinds``: the evaluation task kinds the language model adds (``families.LANGUAGE_TASK_KINDS``)."""
    if not model_type or model_type in LANGUAGE_MODELS:
        raise ValueError(f"language model {model_type!r}: empty or already registered")
    _task_table(families.LANGUAGE_TASK_KINDS, model_type, task_kinds)
    LANGUAGE_MODELS[model_type] = (family, factory)


def register_model(model_type: str, factory: Callable[[object], ModelAdapter],
                   task_kinds: tuple[str, ...] | None = None) -> None:
    """``task_kinds``: the evaluation task kinds of its vision side (``families.VISION_TASK_KINDS``)."""
    if not model_type or model_type in MODELS:
        raise ValueError(f"model {model_type!r}: empty or already registered")
    _task_table(families.VISION_TASK_KINDS, model_type, task_kinds)
    MODELS[model_type] = factory


def _task_table(table: dict[str, tuple[str, ...]], model_type: str, task_kinds: tuple[str, ...] | None) -> None:
    if task_kinds is not None:
        table[model_type] = tuple(task_kinds)


def supported_task_kinds(model_or_config) -> frozenset[str] | None:
    """The evaluation task kinds (``ukmp.eval.stage.Task.kind``) a model can run, from the family tables
    (``None``: a type registered without them, whose tasks are not checked)."""
    config = getattr(model_or_config, "config", model_or_config)
    return families.task_kinds(*families.model_types(config.to_dict()))


def _language_part(text_config, prefix: str, owner: str) -> tuple[str, Part]:
    t = getattr(text_config, "model_type", None)
    if t not in LANGUAGE_MODELS:
        raise ValueError(f"model config: {owner} with language model type {t!r} is not supported "
                         f"(supported: {', '.join(sorted(LANGUAGE_MODELS))})")
    family, factory = LANGUAGE_MODELS[t]
    return family, factory(text_config, prefix)


def _blip2(config) -> ModelAdapter:
    from ukmp.models.blip2 import Blip2Adapter

    from ukmp.models.blip2 import Blip2T5Adapter

    family, part = _language_part(config.text_config, "language_model", config.model_type)
    if family == "t5":
        return Blip2T5Adapter(config)
    return Blip2Adapter(config, family, part)


def _base_llama_part(config, prefix: str) -> DecoderPart:
    """The Llama-family language model of a VLM that nests it as a base model at ``prefix`` (its layers sit at
    ``layers``, not ``model.layers``); other language models are refused by name."""
    t = getattr(config.text_config, "model_type", None)
    if t not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"model config: {config.model_type} with language model type {t!r} is not supported "
                         f"(supported: llama, mistral, qwen2)")
    return DecoderPart(config.text_config, prefix, replace(LLAMA, layers="layers"))


def _llava(config) -> ModelAdapter:
    from ukmp.models.llava import LlavaAdapter

    return LlavaAdapter(config, "llama", _base_llama_part(config, "model.language_model"))


def _smolvlm(config) -> ModelAdapter:
    from ukmp.models.smolvlm import SmolVLMAdapter

    return SmolVLMAdapter(config, "llama", _base_llama_part(config, "model.text_model"))


def _llava_onevision(config) -> ModelAdapter:
    from ukmp.models.llava_onevision import LlavaOnevisionAdapter

    return LlavaOnevisionAdapter(config, "llama", _base_llama_part(config, "model.language_model"))


def _qwen2_5_vl(config) -> ModelAdapter:
    from ukmp.models.qwen2_5_vl import Qwen2_5_VLAdapter

    part = DecoderPart(config.text_config, "model.language_model", replace(LLAMA, layers="layers"))
    return Qwen2_5_VLAdapter(config, "llama", part)


def _qwen3_vl(config) -> ModelAdapter:
    from ukmp.models.qwen2_5_vl import Qwen3VLAdapter

    part = DecoderPart(config.text_config, "model.language_model", replace(LLAMA, layers="layers"))
    return Qwen3VLAdapter(config, "llama", part)


def _causal_lm(config) -> ModelAdapter:
    from ukmp.models.causal_lm import CausalLMAdapter

    family, part = _language_part(config, "", config.model_type)
    if family == "t5":
        raise ValueError("model config: a plain T5 is an encoder-decoder, not a causal LM (not supported alone)")
    return CausalLMAdapter(config, family, part)


register_language_model("t5", "t5", lambda c, p: T5Part(c, p or "language_model"))
for _t in ("llama", "mistral", "qwen2"):
    register_language_model(_t, "llama", lambda c, p: DecoderPart(c, p, LLAMA))
register_language_model("opt", "opt", lambda c, p: DecoderPart(c, p, OPT))
register_model("blip-2", _blip2)
register_model("instructblip", _blip2)
register_model("llava", _llava)  # BLIP-2's layout; the adapter names the model class and the Q-Former text
register_model("smolvlm", _smolvlm)
register_model("idefics3", _smolvlm)  # SmolVLM's architecture under its first name: the same modules
register_model("qwen2_5_vl", _qwen2_5_vl)  # its Qwen2 LM is a text config of its own (qwen2_5_vl_text)
register_model("qwen3_vl", _qwen3_vl)  # Qwen3 LM (per-head q/k norms, no biases), DeepStack mergers
for _t in ("llama", "mistral", "qwen2", "opt"):
    register_model(_t, _causal_lm)
register_model("llava_onevision", _llava_onevision)  # LLaVA's layout; SigLIP tower, Qwen2 LM, AnyRes tiling


def adapter_for(model_or_config) -> ModelAdapter:
    """The adapter that understands ``model_or_config`` (a model or its config); a one-line error otherwise."""
    config = getattr(model_or_config, "config", model_or_config)
    t = getattr(config, "model_type", None)
    if t not in MODELS:
        raise ValueError(f"model config: model_type {t!r} is not supported (supported: {', '.join(sorted(MODELS))})")
    return MODELS[t](config)


def is_decoder_only(config) -> bool:
    """Whether the model's language model is decoder-only (targets sit in ``input_ids``, after the prompt)."""
    if getattr(config, "model_type", None) in ("blip-2", "instructblip"):
        return bool(getattr(config, "use_decoder_only_language_model", False))
    return not bool(getattr(config, "is_encoder_decoder", False))


def forward_inputs(model, batch):
    """The batch keys ``model``'s forward takes: decoder-only batches carry ``labels`` aligned with the logits
    (``labels[:, t]`` is the target of position ``t``), which the model must not shift again, so they stay out."""
    config = getattr(model, "config", None)
    if config is not None and is_decoder_only(config):
        return {k: v for k, v in batch.items() if k != "labels"}
    return dict(batch)


def forward_batch(model, batch):
    """``model``'s outputs on a collated batch. A text-only batch (no ``pixel_values``: windows of a text dataset)
    given to a vision-language model runs through its language model alone, so calibration can mix plain text in
    for the language model; every other batch goes through ``model`` itself."""
    inputs = forward_inputs(model, batch)
    if "pixel_values" not in inputs and getattr(model, "config", None) is not None:
        adapter = adapter_for(model)
        if adapter.batch_layout().has_images:
            return adapter.language_model(model)(**inputs)
    return model(**inputs)
