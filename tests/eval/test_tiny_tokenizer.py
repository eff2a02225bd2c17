"""The tiny retrieval model's tokenizer is the same in every process (the demo's Flickr30K numbers depend on it)."""

import json
import os
import subprocess
import sys

import pytest

from ukmp.eval.retrieval import build_bert_tokenizer

CODE = ("import json; from ukmp.eval.retrieval import build_bert_tokenizer; "
        "print(json.dumps(sorted(build_bert_tokenizer(vocab_size=128).get_vocab().items())))")


def test_vocabulary_identical_across_processes():
    # tokenizers' trainer broke frequency ties per process (three processes gave three vocabularies); each new
    # process also gets a new hash seed, the usual source of such differences
    # process here (its own hash seed) against one child with another fixed seed: two processes, one spawn
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    child = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True,
                           env={**env, "PYTHONHASHSEED": seed}).stdout
    here = json.dumps(sorted(build_bert_tokenizer(vocab_size=128).get_vocab().items()))
    assert json.loads(child) == json.loads(here) and len(json.loads(here)) > 50


def test_every_word_tokenizes_without_unk():
    tok = build_bert_tokenizer(["a red circle", "the zebra"], vocab_size=64)
    ids = tok("the red zebra circler")["input_ids"]  # circle + ##r
    assert tok.unk_token_id not in ids and tok.convert_ids_to_tokens(ids)[1:3] == ["the", "red"]
    with pytest.raises(ValueError, match="vocab_size"):
        build_bert_tokenizer(["abcdefghijklmnopqrstuvwxyz"], vocab_size=40)
