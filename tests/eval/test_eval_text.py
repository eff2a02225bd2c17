"""LAVIS-compatible text processing and prompts."""

from __future__ import annotations

import pytest

from ukmp.eval.text import VQA_DECODING, blip_caption, blip_question, vqa_prompt


def test_blip_question_removes_characters_and_trailing_spaces():
    # lower-case; . ! " ( ) * # : ; ~ deleted (not spaced); "?" and "'" kept; trailing spaces stripped
    assert blip_question('What is THE man\'s (left) hand "holding"?  ') == "what is the man's left hand holding?"
    assert blip_question("a.b!c#d:e;f~g*h") == "abcdefgh"


def test_blip_caption_spaces_characters_and_collapses_whitespace():
    # "." and "!" become spaces, runs of >= 2 whitespace collapse, the trailing newline is stripped
    assert blip_caption("A  Dog.Running!  fast\n") == "a dog running fast"
    assert blip_caption("a.b") == "a b"  # non-vacuous: blip_question would give "ab"
    assert blip_question("a.b") == "ab"


def test_truncation_to_max_words():
    text = " ".join(f"w{i}" for i in range(60))
    assert blip_caption(text).split(" ") == [f"w{i}" for i in range(50)]
    assert blip_question(text, max_words=3) == "w0 w1 w2"
    assert blip_caption("one two", max_words=5) == "one two"
    with pytest.raises(ValueError, match="max_words"):
        blip_caption("x", max_words=0)


def test_vqa_prompt_and_decoding():
    assert vqa_prompt("What color is it?") == "Question: what color is it? Short answer:"
    assert vqa_prompt("Raw Q", process=False) == "Question: Raw Q Short answer:"
    with pytest.raises(ValueError, match="template"):
        vqa_prompt("q", template="no slot")
    assert (VQA_DECODING.num_beams, VQA_DECODING.max_new_tokens, VQA_DECODING.length_penalty) == (5, 10, -1.0)
