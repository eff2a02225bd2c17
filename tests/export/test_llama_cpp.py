"""The GGUF export run by llama.cpp itself (llama-cpp-python): its logits within 1e-4 of PyTorch's with F32 weights
and an F32 KV cache (never its default F16 cache, ~6e-3 off alone), and the same greedy tokens, for a non-uniformly
pruned tiny Llama and a tiny Qwen2 with q/k/v biases and the language model of a tiny LLaVA; the same file labelled ``llama`` fails to
load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ukmp.export import export
from ukmp.export.gguf import layer_widths, write_gguf
from ukmp.export.source import load_source
from ukmp.io import load_pruned

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="needs llama-cpp-python of the export extra (no wheel; pip builds it from source): "
                        "pip install 'ukmp[export]'")

TOL = 1e-4  # float32 weights and KV cache; llama.cpp sums in another order than PyTorch
GGML_TYPE_F32 = 0
N_NEW = 6


def _llama(path):
    return llama_cpp.Llama(str(path), n_ctx=64, n_batch=64, logits_all=True, type_k=GGML_TYPE_F32,
                           type_v=GGML_TYPE_F32, n_threads=1, verbose=False)


def _prompt_logits(path, model) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(llama.cpp's, PyTorch's) logits of one 9-token prompt, and the prompt."""
    g = torch.Generator().manual_seed(5)
    vocab = getattr(model.config, "text_config", model.config).vocab_size
    prompt = torch.randint(3, min(vocab, 150), (9,), generator=g).tolist()  # below LLaVA's image token
    llm = _llama(path)
    llm.eval(prompt)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([prompt])).logits[0].numpy()
    return np.array(llm.scores[:len(prompt)]), ref, prompt


def _greedy_torch(model, ids: list[int]) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(N_NEW):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


@pytest.mark.slow  # ~2 s per case once llama-cpp-python is built
@pytest.mark.parametrize("case", ["llama", "qwen2", "llava"])  # LLaVA: its language model, on text
def test_llama_cpp_logits_and_greedy_tokens_match_pytorch(pruned_lms, tmp_path, case, monkeypatch):
    _, _, path, dense = pruned_lms[case]
    export(path, "gguf", tmp_path / "m.gguf")
    model = load_pruned(path, dtype="float32")
    got, ref, prompt = _prompt_logits(tmp_path / "m.gguf", model)
    assert np.abs(got - ref).max() <= TOL  # measured 1.8e-7 (Llama), 3.0e-7 (Qwen2)
    with torch.no_grad():
        other = dense.float()(input_ids=torch.tensor([prompt])).logits[0].numpy()
    assert np.abs(other - ref).max() > 1e-2  # the tolerance tells the pruned model from the dense one
    llm = _llama(tmp_path / "m.gguf")
    tokens = list(prompt)
    llm.eval(tokens)
    for _ in range(N_NEW):  # greedy through llama.cpp's KV cache
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([tokens[-1]])
    assert tokens == _greedy_torch(model, prompt)
    # not vacuous: without the rotary permutation of q/k rows llama.cpp is off by 4e-3 to 7e-3
    monkeypatch.setattr("ukmp.export.gguf.permute_rotary", lambda t, n_head: t)
    export(path, "gguf", tmp_path / "unpermuted.gguf")
    got, ref, _ = _prompt_logits(tmp_path / "unpermuted.gguf", model)
    assert np.abs(got - ref).max() > 10 * TOL


@pytest.mark.slow
def test_the_same_file_labelled_llama_is_refused(pruned_lms, tmp_path):
    src = load_source(pruned_lms["llama"][2], "gguf")
    write_gguf(src, tmp_path / "bad.gguf", "f32", "llama", layer_widths(src))  # export_gguf would refuse this
    with pytest.raises(ValueError):
        _llama(tmp_path / "bad.gguf")
    # a uniformly pruned model is fine as plain llama
    path = pruned_lms["llama_uniform"][2]
    export(path, "gguf", tmp_path / "uniform.gguf", gguf_arch="llama")
    got, ref, _ = _prompt_logits(tmp_path / "uniform.gguf", load_pruned(path, dtype="float32"))
    assert np.abs(got - ref).max() <= TOL


@pytest.mark.slow
def test_llama_cpp_reads_the_byte_level_bpe_tokenizer(bpe_pruned, tmp_path):
    """The same ids as the HF tokenizer for text with digits (``tokenizer.ggml.pre`` is ``gpt-2``: llama.cpp splits
    text as the lone ByteLevel pre-tokenizer does; without it, llama.cpp cut 12345 into 123 45 and failed this),
    and the model's logits within 1e-4."""
    model, tok, path = bpe_pruned
    export(path, "gguf", tmp_path / "b.gguf")
    llm = llama_cpp.Llama(str(tmp_path / "b.gguf"), n_ctx=64, vocab_only=True, verbose=False)
    text = "a photo of a cat sitting on the green grass; order 12345 of 67890"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text)["input_ids"]
    got, ref, _ = _prompt_logits(tmp_path / "b.gguf", load_pruned(path, dtype="float32"))
    assert np.abs(got - ref).max() <= TOL
