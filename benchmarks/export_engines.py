"""The serving engines of ``bench_export.py``: llama.cpp (through llama-cpp-python) and ONNX Runtime, timed and
scored the same way, and the FLOP count that is the ideal speed-up.

Speed: prompt processing (pp: one forward over ``pp`` tokens) and generation (tg: ``tg`` single-token decode steps
after that prompt, greedy) in tokens per second, wall-clock around the engine calls. llama.cpp's own counters
(``llama_perf_context``: the time inside ``llama_decode``) are recorded beside it. ONNX Runtime runs the
full-sequence graph of ``ukmp export --format onnx``: it has no KV cache, so its "tg" is one step that re-reads the
whole prefix (``pp + 1`` tokens) and says so.

Perplexity: the same token windows scored by each engine: exp(mean NLL of tokens 1..n-1 of every window given the
tokens before them in that window), computed from the engine's float32 logits in float64.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

GGML_TYPE_F32 = 0  # llama.cpp's ggml_type for an F32 KV cache (its default is F16)


def have_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


# ---------------------------------------------------------------------------------------------------- llama.cpp
def open_llama(path: Path, n_ctx: int, threads: int, logits_all: bool = False, f32_cache: bool = False):
    import llama_cpp

    kv = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_cache else {}
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all,
                           n_threads=threads, n_threads_batch=threads, verbose=False, **kv)


def quantize_q8_0(src: Path, out: Path, threads: int) -> None:
    """llama.cpp's own quantizer (what ``llama-quantize F32.gguf OUT.gguf Q8_0`` runs) into ``out`` (absent): a
    tensor whose rows are not a whole number of 32-value blocks is written in a fallback type by llama.cpp."""
    import llama_cpp

    if out.exists():
        raise FileExistsError(f"{out}: already exists")
    tmp = out.with_name(f".{out.name}.tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{src}: llama_model_quantize returned {rc}")
    os.replace(tmp, out)


def tensor_types(path: Path) -> dict[str, Any]:
    """GGML types of a GGUF file's tensors: a count per type, and the matrices not stored as the file's main type."""
    import gguf

    reader = gguf.GGUFReader(path)
    count: dict[str, int] = {}
    for t in reader.tensors:
        count[t.tensor_type.name] = count.get(t.tensor_type.name, 0) + 1
    mats = [t for t in reader.tensors if len(t.shape) > 1 and int(np.prod(t.shape)) > 0]
    main = max({t.tensor_type.name for t in mats}, key=lambda n: sum(t.tensor_type.name == n for t in mats))
    other = {}
    for t in mats:
        if t.tensor_type.name != main:
            kind = t.name.split(".", 2)[-1] if t.name.startswith("blk.") else t.name
            other.setdefault(f"{kind} {t.tensor_type.name}", []).append(int(t.name.split(".")[1])
                                                                       if t.name.startswith("blk.") else -1)
    return {"types": count, "main": main, "other": {k: sorted(v) for k, v in other.items()}}


def llama_speed_step(llm, prompt: list[int], tg: int) -> dict[str, float]:
    """One pp + tg measurement on an open model (its KV cache cleared first)."""
    import llama_cpp

    ctx = llm._ctx.ctx
    n_vocab = llm.n_vocab()
    llm.reset()
    llama_cpp.llama_perf_context_reset(ctx)
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for _ in range(tg):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        llm.eval([int(logits.argmax())])
    t2 = time.perf_counter()
    perf = llama_cpp.llama_perf_context(ctx)
    return {"pp_tps": len(prompt) / (t1 - t0), "tg_tps": tg / (t2 - t1),
            "pp_tps_engine": 1e3 * perf.n_p_eval / perf.t_p_eval_ms if perf.t_p_eval_ms else None,
            "tg_tps_engine": 1e3 * perf.n_eval / perf.t_eval_ms if perf.t_eval_ms else None}


def llama_nll(path: Path, windows: list[list[int]], threads: int) -> dict[str, float]:
    """Perplexity of the windows computed by llama.cpp (F32 KV cache, every position's logits)."""
    n_ctx = max(len(w) for w in windows)
    llm = open_llama(path, n_ctx, threads, logits_all=True, f32_cache=True)
    total, n = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w)
        total += window_nll(np.asarray(llm.scores[: len(w)]), w)
        n += len(w) - 1
    llm.close()
    return {"perplexity": float(np.exp(total / n)), "nll": total / n, "tokens": n}


def window_nll(logits: np.ndarray, ids: list[int]) -> float:
    """Summed NLL of ``ids[1:]`` under ``logits[:-1]`` (float64)."""
    x = logits[:-1].astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(x - m).sum(axis=1)))
    return float((lse - x[np.arange(len(ids) - 1), ids[1:]]).sum())


# ---------------------------------------------------------------------------------------------------- ONNX Runtime
def open_ort(onnx_dir: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(onnx_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])


def ort_logits(sess, ids: list[int]) -> np.ndarray:
    x = np.asarray([ids], dtype=np.int64)
    return sess.run(["logits"], {"input_ids": x, "attention_mask": np.ones_like(x)})[0][0]


def ort_speed_step(sess, prompt: list[int]) -> dict[str, float]:
    t0 = time.perf_counter()
    ort_logits(sess, prompt)
    t1 = time.perf_counter()
    ort_logits(sess, prompt + prompt[:1])  # one generation step without a KV cache: the whole prefix again
    t2 = time.perf_counter()
    return {"pp_tps": len(prompt) / (t1 - t0), "tg_tps_no_cache": 1.0 / (t2 - t1)}


def ort_nll(onnx_dir: Path, windows: list[list[int]], threads: int) -> dict[str, float]:
    sess = open_ort(onnx_dir, threads)
    total = sum(window_nll(ort_logits(sess, w), w) for w in windows)
    n = sum(len(w) - 1 for w in windows)
    return {"perplexity": float(np.exp(total / n)), "nll": total / n, "tokens": n}


# ---------------------------------------------------------------------------------------------------- PyTorch, FLOPs
def torch_nll(model, windows: list[list[int]]) -> dict[str, float]:
    import torch

    total = 0.0
    with torch.no_grad():
        for w in windows:
            total += window_nll(model(input_ids=torch.tensor([w])).logits[0].float().numpy(), w)
    n = sum(len(w) - 1 for w in windows)
    return {"perplexity": float(np.exp(total / n)), "nll": total / n, "tokens": n}


def flop_model(model) -> dict[str, Any]:
    """Per-token FLOPs of a causal LM: every Linear (the vocabulary head included; 2 per weight) and, at context
    position ``t``, attention's scores and weighted sum (4 * query heads * head_dim * t per layer). The token
    embedding is a lookup (no FLOPs)."""
    from torch import nn

    linear = sum(2 * m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    q_widths = [layer.self_attn.q_proj.out_features for layer in model.model.layers]
    return {"linear": linear, "attn_per_position": 4 * sum(q_widths)}


def flops(fm: dict[str, Any], start: int, n: int) -> float:
    """FLOPs of the tokens at positions ``start .. start + n - 1`` (each attends to itself and those before)."""
    positions = n * start + n * (n + 1) / 2
    return fm["linear"] * n + fm["attn_per_position"] * positions
