"""The model families as data, readable without torch: what each can be evaluated on, its tiny build, and the
Hugging Face ``model_type`` of a model source found from its config JSON alone.

Config validation (:mod:`ukmp.config`) reads this before torch is imported, so a task a family cannot do, or a
tiny overlay (``tiny: true``) on a source with no tiny build, fails in a fraction of a second. The adapter registry
(:mod:`ukmp.models.registry`) answers from these tables (``supported_task_kinds``) and adds to them when a new type
is registered with its task kinds; a test ties them to the registered types.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

# shipped model configs (``ukmp inspect NAME``, ``model.source=NAME``): name -> file in ukmp/models/configs/
SHIPPED_CONFIGS = {
    "blip2-flan-t5-xl": "blip2-flan-t5-xl.json",
    "blip2-opt-2.7b": "blip2-opt-2.7b.json",
    "smollm2-135m": "smollm2-135m.json",
    "llama-3-8b": "llama-3-8b.json",
    "instructblip-flan-t5-xl": "instructblip-flan-t5-xl.json",
    "instructblip-vicuna-7b": "instructblip-vicuna-7b.json",
    "llava-1.5-7b": "llava-1.5-7b.json",
    "smolvlm-256m": "smolvlm-256m.json",
    "smolvlm-2.2b": "smolvlm-2.2b.json",
    "qwen2.5-vl-3b": "qwen2.5-vl-3b.json",
    "qwen2.5-vl-7b": "qwen2.5-vl-7b.json",
    "mid": "blip2-t5-mid.json",
    "tiny": "blip2-t5-tiny.json",
    "tiny-blip2-opt": "blip2-opt-tiny.json",
    "tiny-blip2-llama": "blip2-llama-tiny.json",
    "tiny-instructblip-t5": "instructblip-t5-tiny.json",
    "tiny-instructblip-llama": "instructblip-llama-tiny.json",
    "tiny-llava": "llava-tiny.json",
    "tiny-smolvlm": "smolvlm-tiny.json",
    "tiny-qwen2.5-vl": "qwen2.5-vl-tiny.json",
    "tiny-qwen3-vl": "qwen3-vl-tiny.json",
    "tiny-llama": "llama-tiny.json",
    "tiny-opt": "opt-tiny.json",
    "tiny-qwen2": "qwen2-tiny.json",
    "llava-onevision-qwen2-0.5b": "llava-onevision-qwen2-0.5b.json",
    "llava-onevision-qwen2-7b": "llava-onevision-qwen2-7b.json",
    "tiny-llava-onevision": "llava-onevision-tiny.json",
}
TINY = tuple(n for n in SHIPPED_CONFIGS if n == "tiny" or n.startswith("tiny-"))

# Evaluation task kinds (``ukmp.eval.stage.TASKS``) each whole-model type can run. ``retrieval`` (Flickr30K) needs a
# ViT that fits the BLIP-2 stage-1 image-text matching model (Salesforce/blip2-itm-vit-g): BLIP-2's and
# InstructBLIP's EVA ViT-g do, LLaVA's CLIP ViT does not. A plain causal LM has no vision tower.
VISION_TASK_KINDS: dict[str, tuple[str, ...]] = {
    "blip-2": ("vqa", "gqa", "caption", "retrieval"),
    "instructblip": ("vqa", "gqa", "caption", "retrieval"),
    "llava": ("vqa", "gqa", "caption"),
    "idefics3": ("vqa", "gqa", "caption"), "smolvlm": ("vqa", "gqa", "caption"),  # SigLIP: no ITM model fits
    "qwen2_5_vl": ("vqa", "gqa", "caption"),  # Qwen's own ViT: no ITM model fits
    "qwen3_vl": ("vqa", "gqa", "caption"),
    "llama": (), "mistral": (), "qwen2": (), "opt": (),
    "llava_onevision": ("vqa", "gqa", "caption"),  # SigLIP: no ITM model fits
}
# ... and the kinds its language model adds: perplexity needs a decoder-only language model
LANGUAGE_TASK_KINDS: dict[str, tuple[str, ...]] = {
    "t5": (), "llama": ("perplexity",), "mistral": ("perplexity",), "qwen2": ("perplexity",), "opt": ("perplexity",),
    "qwen2_5_vl_text": ("perplexity",), "qwen3_vl_text": ("perplexity",),
}
# model types whose language model is ``text_config``
COMPOSITE = ("blip-2", "instructblip", "llava", "idefics3", "smolvlm", "llava_onevision", "qwen2_5_vl", "qwen3_vl")
# ... and the language-model type of those whose hub configs are flat (the text fields at the top level)
IMPLICIT_TEXT_TYPE = {"qwen2_5_vl": "qwen2_5_vl_text"}


@dataclass(frozen=True)
class Family:
    """One family: its model types (the language model's for a composite model, '' for a plain LM) and the tiny
    random build that stands in for its models offline (``tiny: true``, configs/tiny.yaml)."""

    name: str
    model_type: str
    language_type: str
    tiny: str


FAMILIES = (
    Family("BLIP-2 FlanT5", "blip-2", "t5", "tiny"),
    Family("BLIP-2 OPT", "blip-2", "opt", "tiny-blip2-opt"),
    Family("BLIP-2 Llama", "blip-2", "llama", "tiny-blip2-llama"),
    Family("InstructBLIP FlanT5", "instructblip", "t5", "tiny-instructblip-t5"),
    Family("InstructBLIP Vicuna", "instructblip", "llama", "tiny-instructblip-llama"),
    Family("LLaVA", "llava", "llama", "tiny-llava"),
    Family("SmolVLM2", "smolvlm", "llama", "tiny-smolvlm"),
    Family("SmolVLM (Idefics3)", "idefics3", "llama", "tiny-smolvlm"),
    Family("Qwen2.5-VL", "qwen2_5_vl", "llama", "tiny-qwen2.5-vl"),
    Family("Qwen3-VL", "qwen3_vl", "llama", "tiny-qwen3-vl"),
    Family("Llama causal LM", "llama", "", "tiny-llama"),
    Family("Mistral causal LM", "mistral", "", "tiny-llama"),
    Family("Qwen2 causal LM", "qwen2", "", "tiny-qwen2"),
    Family("OPT causal LM", "opt", "", "tiny-opt"),
    Family("LLaVA-OneVision", "llava_onevision", "llama", "tiny-llava-onevision"),
)
LANGUAGE_FAMILY = {"t5": "t5", "llama": "llama", "mistral": "llama", "qwen2": "llama", "opt": "opt"}
LANGUAGE_FAMILY.update(qwen2_5_vl_text="llama", qwen3_vl_text="llama")
# hub ids whose structure ukmp ships (the config is read offline from the shipped copy)
HUB_CONFIGS = {
    "Salesforce/blip2-flan-t5-xl": "blip2-flan-t5-xl",
    "Salesforce/blip2-opt-2.7b": "blip2-opt-2.7b",
    "Salesforce/instructblip-flan-t5-xl": "instructblip-flan-t5-xl",
    "Salesforce/instructblip-vicuna-7b": "instructblip-vicuna-7b",
    "llava-hf/llava-1.5-7b-hf": "llava-1.5-7b",
    "HuggingFaceTB/SmolVLM-256M-Instruct": "smolvlm-256m",
    "HuggingFaceTB/SmolVLM2-2.2B-Instruct": "smolvlm-2.2b",
    "Qwen/Qwen2.5-VL-3B-Instruct": "qwen2.5-vl-3b",
    "Qwen/Qwen2.5-VL-7B-Instruct": "qwen2.5-vl-7b",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m",
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": "llava-onevision-qwen2-0.5b",
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": "llava-onevision-qwen2-7b",
}


def _shipped_path(name: str) -> Path:
    return Path(__file__).resolve().parent / "configs" / SHIPPED_CONFIGS[name]


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def source_config(source: str) -> dict | None:
    """The config JSON of a model source when it can be read without torch and offline: a shipped name, a config
    ``.json``, a local model directory (its ``config.json``; a pruned model's too) or a hub id in the local
    Hugging Face cache. ``None`` when none of these has it (a GGUF directory, a hub id not downloaded yet)."""
    if source in SHIPPED_CONFIGS:
        return _read_json(_shipped_path(source))
    p = Path(os.path.expanduser(source))
    if source.endswith(".json"):
        return _read_json(p)
    if p.is_dir():
        return _read_json(p / "config.json")
    if source in HUB_CONFIGS:
        return _read_json(_shipped_path(HUB_CONFIGS[source]))
    try:  # a hub id already in the cache (huggingface_hub imports no torch)
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "config.json")
    except Exception:  # noqa: BLE001 - a malformed repo id or no huggingface_hub: nothing to read
        return None
    return _read_json(Path(cached)) if isinstance(cached, str) else None


def model_types(config: dict) -> tuple[str, str]:
    """(whole-model type, language-model type; '' for a plain LM) of a config dict."""
    t = str(config.get("model_type", ""))
    if t in COMPOSITE:
        return t, str((config.get("text_config") or {}).get("model_type", IMPLICIT_TEXT_TYPE.get(t, "")))
    return t, ""


def task_kinds(model_type: str, language_type: str = "") -> frozenset[str] | None:
    """The evaluation task kinds a model of these types can run (``None``: a type ukmp does not know)."""
    lm = language_type if model_type in COMPOSITE else model_type
    if model_type not in VISION_TASK_KINDS or lm not in LANGUAGE_TASK_KINDS:
        return None
    return frozenset(VISION_TASK_KINDS[model_type]) | frozenset(LANGUAGE_TASK_KINDS[lm])


def family(config: dict) -> Family | None:
    """The family of a config dict (``None``: a type ukmp does not know)."""
    t, lm = model_types(config)
    lm = LANGUAGE_FAMILY.get(lm, lm) if t in COMPOSITE else ""
    return next((f for f in FAMILIES if f.model_type == t and f.language_type == lm), None)


def family_label(config: dict) -> str:
    fam = family(config)
    t, lm = model_types(config)
    return fam.name if fam is not None else t + (f" ({lm})" if lm else "")


def tiny_source(source: str) -> str | None:
    """The tiny build that stands in for ``source`` (itself when it is one; ``None`` when its family is unknown or
    its config cannot be read offline)."""
    if source in TINY:
        return source
    config = source_config(source)
    fam = family(config) if config is not None else None
    return fam.tiny if fam is not None else None


# Families tuned on conversations: their prompts default to the processor's chat template (a dataset YAML's
# ``prompt_style``, ukmp.data.prompts); the others default to the plain prompt. A new family adds its name here.
INSTRUCTION_TUNED = {"InstructBLIP Vicuna", "LLaVA", "SmolVLM2", "SmolVLM (Idefics3)", "Qwen2.5-VL", "Qwen3-VL",
                     "LLaVA-OneVision"}


def instruction_tuned(config: dict) -> bool:
    """Whether the family of a config dict is instruction-tuned (``False`` for a type ukmp does not know)."""
    fam = family(config)
    return fam is not None and fam.name in INSTRUCTION_TUNED
