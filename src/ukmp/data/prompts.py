"""Prompt styles: how a prompt and its image become the input ids of a decoder-only language model.

A dataset YAML chooses the style of its task with ``prompt_style`` (:mod:`ukmp.data.config`); left out, the model's
family decides (:func:`ukmp.models.families.instruction_tuned`):

* ``plain`` -- the image tokens, then the prompt as the tokenizer writes it (its own leading special tokens, no
  end-of-sequence): ``[image] <s> Question: ... Short answer:``. BLIP-2's reference layout, the default of the
  families that were never tuned on conversations (BLIP-2, InstructBLIP FlanT5, the plain causal LMs).
* ``template`` -- the processor's chat template (``processor.apply_chat_template``) on one user turn holding the
  image and the prompt, with the generation prompt added: ``USER: <image>\\nQuestion: ... ASSISTANT:`` for
  LLaVA-1.5. The rendered text is tokenised as the processor's own ``apply_chat_template(tokenize=True)`` does (the
  tokenizer's special tokens unless the text already starts with its BOS) and the image placeholder the template
  wrote is replaced by the model's image tokens; a template that writes none gets them in front, as BLIP-2's and
  InstructBLIP's processors place them. The default of the instruction-tuned families (LLaVA-1.5, InstructBLIP
  Vicuna, SmolVLM, ...).

Where the default is ``template`` but the processor has no chat template (the tiny random builds, a local directory
saved without one, a hub processor that ships none), the prompt falls back to ``plain`` and says so once in the
log; a YAML that asks for ``template`` explicitly is refused in one line instead. An encoder-decoder language model
(T5) reads its prompt in the encoder and is always ``plain``.

In both styles the image tokens are ``BatchLayout.image_prefix + [image token] * image_tokens + image_suffix``
(SmolVLM: ``<fake_token_around_image><global-img>`` + image tokens + ``<fake_token_around_image>``, as its processor
expands ``<image>`` for one untiled image).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

STYLES = ("template", "plain")
_FALLBACKS: set[tuple[str, str]] = set()  # (processor class, where) already reported


def check_style(value: Any, where: str) -> str | None:
    """``value`` as a prompt style (``None``: the family's default); anything else in one line naming ``where``."""
    if value is None or value in STYLES:
        return value
    raise ValueError(f"{where}: key 'prompt_style' must be one of {', '.join(STYLES)} (or null for the model "
                     f"family's default), got {value!r}")


def has_chat_template(processor) -> bool:
    return bool(getattr(processor, "chat_template", None))


def family_style(config) -> str:
    """The default style of ``config``'s family: ``template`` for an instruction-tuned one, else ``plain``."""
    from ukmp.models.families import instruction_tuned

    return "template" if instruction_tuned(config.to_dict()) else "plain"


def resolve_style(asked: str | None, processor, config, where: str) -> str:
    """The style a task runs with: ``asked`` (a dataset's ``prompt_style``) or, when ``None``, the family's default
    (``template`` falls back to ``plain`` where the processor has no chat template). ``where`` names the task and
    its dataset file in the one-line errors."""
    from ukmp.models import is_decoder_only

    check_style(asked, where)
    style = asked or family_style(config)
    if style == "plain":
        return style
    if not is_decoder_only(config):
        if asked:
            raise ValueError(f"{where}: prompt_style 'template' needs a decoder-only language model; "
                             f"{config.model_type}'s encoder reads a plain prompt (set prompt_style: plain)")
        return "plain"
    if not has_chat_template(processor):
        if asked:
            raise ValueError(f"{where}: prompt_style 'template' but the processor ({type(processor).__name__}) has "
                             f"no chat template (set prompt_style: plain, or give the processor one)")
        key = (type(processor).__name__, where)
        if key not in _FALLBACKS:
            _FALLBACKS.add(key)
            log.info("%s: %s has no chat template; the prompts are plain", where, type(processor).__name__)
        return "plain"
    return style


def dataset_style(dataset, processor, config, task: str | None = None) -> str:
    """:func:`resolve_style` for a loaded dataset (its YAML's ``prompt_style``), named by ``task`` and its file."""
    source = getattr(dataset, "source", None)
    name = f"eval task {task!r}" if task else f"dataset {getattr(dataset, 'name', '')!r}"
    return resolve_style(getattr(dataset, "prompt_style", None), processor, config,
                         f"{name} ({source})" if source else name)


def token_id(tokenizer, token: str) -> int:
    """The id of a single token the tokenizer knows; an unknown one in one line."""
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or (i == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"tokenizer: has no token {token!r} (the model's image tokens need it; does the processor "
                         f"match the model?)")
    return int(i)


def image_ids(layout, tokenizer, n: int | None = None) -> list[int]:
    """The ids one image becomes: ``image_prefix + [image token] * n + image_suffix`` ([] without one); ``n``
    defaults to the layout's ``image_tokens`` (a ``native_resolution`` layout gives each image its own count)."""
    if not layout.image_tokens:
        return []
    n = layout.image_tokens if n is None else int(n)
    return ([token_id(tokenizer, t) for t in layout.image_prefix] + [int(layout.image_token_id)] * n
            + [token_id(tokenizer, t) for t in layout.image_suffix])


def prompt_ids(tokenizer, text: str, max_length: int | None = None, special: bool = True) -> list[int]:
    """A decoder-only prompt's ids: the tokenizer's own special tokens at the start (OPT's ``</s>``, Llama's
    ``<s>``; none with ``special=False``), never an end-of-sequence token after it (the model must continue the
    prompt, not close it)."""
    ids = list(tokenizer(text, add_special_tokens=special)["input_ids"])
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    while ids and eos is not None and eos != bos and ids[-1] == eos:
        ids.pop()
    return ids[:max_length] if max_length else ids


class PromptIds:
    """``PromptIds(processor, layout, style)(text)`` -> the ids of one prompt with its image (if the layout has
    one) in ``style`` (see the module docstring). ``max_length`` caps the prompt's own tokens: the plain ids after
    the image, the user text before a template renders it (so the generation prompt is never cut)."""

    def __init__(self, processor, layout, style: str = "plain", max_length: int | None = None):
        check_style(style, "prompt")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.style = style or "plain"
        self.max_length = max_length
        self.layout = layout
        self.image = image_ids(layout, self.tokenizer)
        self.image_token_id = layout.image_token_id
        if self.style == "template" and not has_chat_template(processor):
            raise ValueError(f"prompt_style 'template': the processor ({type(processor).__name__}) has no chat "
                             f"template")

    def __call__(self, text: str, image_tokens: int | None = None) -> list[int]:
        """``image_tokens``: this image's own count of image tokens (``None``: the layout's)."""
        image = self.image if image_tokens is None or not self.image else image_ids(self.layout, self.tokenizer,
                                                                                      image_tokens)
        if self.style == "plain":
            return image + prompt_ids(self.tokenizer, text, self.max_length)
        return self.templated(self.user_text(text), image)

    def user_text(self, text: str) -> str:
        """``text`` cut to ``max_length`` tokens (decoded back) when it is longer."""
        if not self.max_length:
            return text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= self.max_length else self.tokenizer.decode(ids[: self.max_length])

    def render(self, text: str) -> str:
        """The chat template's text of one user turn (image first, then ``text``) and the generation prompt."""
        content: Any = ([{"type": "image"}] if self.image else []) + [{"type": "text", "text": text}]
        if not self.image and self.processor is self.tokenizer:  # a plain LM: a tokenizer's template takes a string
            content = text
        return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)

    def templated(self, text: str, image: list[int] | None = None) -> list[int]:
        image = self.image if image is None else image
        rendered = self.render(text)
        bos = self.tokenizer.bos_token
        ids = prompt_ids(self.tokenizer, rendered, special=not (bos and rendered.startswith(bos)))
        if not self.image:
            return ids
        at = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(at) > 1:
            raise ValueError(f"prompt_style 'template': the chat template of {type(self.processor).__name__} wrote "
                             f"{len(at)} image placeholders for one image")
        if not at:  # BLIP-2 / InstructBLIP processors put the image tokens in front of the text
            return image + ids
        return ids[: at[0]] + image + ids[at[0] + 1:]
