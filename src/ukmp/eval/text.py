"""Prompts of the reference, its text cleaning (LAVIS ``blip_question`` / ``blip_caption``, defined in
:mod:`ukmp.data.textclean` and re-exported here), and the per-task decoding settings of UKMP_METHOD.md section 4,
for the model-driven evaluators to use.
"""

from __future__ import annotations

from dataclasses import dataclass

from ukmp.data.textclean import blip_caption, blip_question

__all__ = [
    "CAPTION_DECODING",
    "CAPTION_PROMPT",
    "VQA_DECODING",
    "VQA_PROMPT",
    "Decoding",
    "blip_caption",
    "blip_question",
    "caption_prompt",
    "vqa_prompt",
]

VQA_PROMPT = "Question: {} Short answer:"
CAPTION_PROMPT = "a photo of"


def vqa_prompt(question: str, template: str = VQA_PROMPT, process: bool = True) -> str:
    """The T5 input of a VQA question: ``template.format(blip_question(question))`` (``process=False`` skips
    ``blip_question`` when the question was processed already)."""
    if "{}" not in template:
        raise ValueError(f"template: must contain '{{}}' for the question, got {template!r}")
    return template.format(blip_question(question) if process else question)


def caption_prompt(prompt: str = CAPTION_PROMPT) -> str:
    """The T5 input of zero-shot captioning (the reference's caption model uses "a photo of")."""
    return prompt


@dataclass(frozen=True)
class Decoding:
    """Beam-search settings of one task (``length_penalty`` as in HF ``generate``)."""

    num_beams: int
    max_new_tokens: int
    min_length: int
    length_penalty: float = 1.0
    image_size: int = 224


# section 4: VQAv2 / OK-VQA / GQA, and NoCaps (caption model at 364 px)
VQA_DECODING = Decoding(num_beams=5, max_new_tokens=10, min_length=1, length_penalty=-1.0, image_size=224)
CAPTION_DECODING = Decoding(num_beams=5, max_new_tokens=30, min_length=8, length_penalty=1.0, image_size=364)
