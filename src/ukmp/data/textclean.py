"""The reference's text cleaning (LAVIS ``blip_question`` / ``blip_caption``), kept at the data layer so that both the
calibration batches (:mod:`ukmp.data.batches`) and the evaluators (:mod:`ukmp.eval`) may import it.
"""

from __future__ import annotations

import re

__all__ = ["blip_caption", "blip_question"]

_STRIPPED = re.compile(r"[.!\"()*#:;~]")
_WHITESPACE_RUN = re.compile(r"\s{2,}")


def _truncate(text: str, max_words: int) -> str:
    if max_words < 1:
        raise ValueError(f"max_words: must be >= 1, got {max_words}")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def blip_question(text: str, max_words: int = 50) -> str:
    """LAVIS ``blip_question``: lower-case, delete ``.!"()*#:;~``, strip trailing spaces, keep <= max_words words.

    Like the reference, inner runs of spaces are not collapsed and words are split on single spaces.
    """
    return _truncate(_STRIPPED.sub("", text.lower()).rstrip(" "), max_words)


def blip_caption(text: str, max_words: int = 50) -> str:
    """LAVIS ``blip_caption``: lower-case, ``.!"()*#:;~`` become spaces, runs of >= 2 whitespace characters become
    one space, trailing newlines and surrounding spaces are stripped, then at most ``max_words`` words are kept.
    """
    text = _WHITESPACE_RUN.sub(" ", _STRIPPED.sub(" ", text.lower()))
    return _truncate(text.rstrip("\n").strip(" "), max_words)
