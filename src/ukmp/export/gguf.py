"""``gguf``: a pruned Llama-family LM (Llama, Mistral, Qwen2; of LLaVA, its language model) as a llama.cpp GGUF
file, written with the ``gguf`` package (the ``export`` extra).

llama.cpp reads per-layer ``feed_forward_length``, ``attention.head_count`` and ``attention.head_count_kv`` arrays,
but only some graphs build each layer from its own widths: the plain ``llama`` graph sizes every layer from layer 0,
the ``deci`` graph (DeciLM / Nemotron-NAS) from its own. So a non-uniformly pruned model is written as ``deci`` with
those arrays and an explicit key/value head size; a uniformly pruned one may also be written as ``llama``. Both use
llama.cpp's interleaved rotary layout, so q/k rows (and biases) are permuted per layer as its converter does for
Llama (:func:`permute_rotary`; :func:`unpermute_rotary` undoes it). Tensor names come from the ``gguf`` package's
own HF-to-GGUF name table. The tokenizer (``tokenizer.json`` of the pruned directory: Unigram or byte-level BPE) is
padded with unused tokens to the embedding's vocabulary size.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch

from ukmp.export.source import Source, build_report, count, require_gguf, staged_output  # require_gguf: re-exported

ARCHES = ("deci", "llama")
QUANT_BLOCK = 32  # q8_0 rows are blocks of 32 values


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's half-split rotary rows of each head -> llama.cpp's interleaved pairs (rows of a weight or a bias)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`permute_rotary`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def layer_widths(src: Source) -> list[dict[str, int]]:
    """Per layer: kept query heads, KV heads and MLP channels (from the pruned weights)."""
    part = src.adapter.lm
    out = []
    for i in range(part.n_layers):
        kv = src.counts[f"{part.gid}.layers.{i}.attn"]
        out.append({"heads": kv * part.per_group, "kv_heads": kv, "ffn": src.counts[f"{part.gid}.layers.{i}.mlp"]})
    return out


def lm_name(part, key: str) -> str | None:
    """``key`` of the whole model's state dict under the name it has in a plain causal LM (``model.layers.0...``,
    ``lm_head.weight``), which the gguf package's table maps; ``None`` for tensors outside the language model (a
    VLM's vision tower and projector)."""
    if not part.prefix or key == "lm_head.weight":
        return key
    return "model." + key[len(part.prefix) + 1:] if key.startswith(part.prefix + ".") else None


def _rope_theta(config) -> float:
    rp = getattr(config, "rope_parameters", None) or {}
    kind = rp.get("rope_type", "default")
    if kind != "default":
        raise ValueError(f"model config: rope type {kind!r} is not written to GGUF by ukmp yet (default only)")
    return float(rp.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _tensor_type(gguf, t: np.ndarray, dtype: str):
    """(array, GGML type) of one tensor: 1-D tensors (norms, biases) stay F32, as llama.cpp expects."""
    if t.ndim == 1 or dtype == "f32":
        return t.astype(np.float32, copy=False), gguf.GGMLQuantizationType.F32  # a float32 model's own memory
    if dtype == "f16":
        return t.astype(np.float16), gguf.GGMLQuantizationType.F16
    q = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(t.astype(np.float32), q), q


def check_dtype(src: Source | None, dtype: str) -> None:
    """``dtype`` is one GGUF can hold; for q8_0, every row width of ``src`` (when given) is a multiple of 32."""
    if dtype not in ("f32", "f16", "q8_0"):
        raise ValueError(f"--dtype: {dtype!r} is not one of f32, f16, q8_0 for gguf")
    if dtype == "q8_0" and src is not None:
        bad = sorted({f"{n} ({m.in_features})" for n, m in src.model.named_modules()
                      if isinstance(m, torch.nn.Linear) and m.in_features % QUANT_BLOCK
                      and lm_name(src.adapter.lm, n + ".weight")})
        if bad:
            raise ValueError(f"--dtype q8_0: row widths must be multiples of {QUANT_BLOCK}; not: {', '.join(bad[:4])}"
                             + (f" and {len(bad) - 4} more" if len(bad) > 4 else ""))


def gpt2_split(tok: dict) -> bool:
    """Whether ``tok`` splits text exactly as GPT-2 does before its merges (a lone ``ByteLevel`` pre-tokenizer with
    its regex, no normaliser): llama.cpp's ``gpt-2`` pre-tokenizer then gives the same ids."""
    pre = tok.get("pre_tokenizer") or {}
    return (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
            and not tok.get("normalizer"))


def _is_byte_level(tok: dict) -> bool:
    pre = tok.get("pre_tokenizer") or {}
    return pre.get("type") == "ByteLevel" or any(p.get("type") == "ByteLevel" for p in pre.get("pretokenizers", []))


def add_tokenizer(gguf, writer, src: Source, n_vocab: int) -> None:
    """The pruned directory's ``tokenizer.json`` as llama.cpp reads it: a Unigram model as its ``t5`` tokenizer, a
    byte-level BPE as its ``gpt2`` one (merges included; ``tokenizer.ggml.pre`` ``gpt-2`` when the text is split as
    GPT-2 splits it (:func:`gpt2_split`), else none, and llama.cpp splits text with its default pre-tokenizer); added tokens at their ids, padded to ``n_vocab`` with unused tokens; special ids and
    add-bos/eos from the config files (the ``gguf`` package's SpecialVocab)."""
    path = src.path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer (save the pruned model with its tokenizer)")
    tok = json.loads(path.read_text())
    model = tok.get("model", {})
    kind = model.get("type")
    if kind == "Unigram":
        vocab = {i: (p, float(sc)) for i, (p, sc) in enumerate(model["vocab"])}
    elif kind == "BPE" and _is_byte_level(tok):
        vocab = {i: (p, 0.0) for p, i in model["vocab"].items()}
    else:
        raise ValueError(f"{path}: tokenizer model {kind!r} is not written to GGUF by ukmp yet (Unigram or "
                         f"byte-level BPE)")
    T = gguf.TokenType
    types = {i: T.UNKNOWN if i == model.get("unk_id") else T.NORMAL for i in vocab}
    for a in tok.get("added_tokens", []):
        vocab[a["id"]] = (a["content"], 0.0)
        types[a["id"]] = T.CONTROL if a.get("special") else T.USER_DEFINED
    if max(vocab) >= n_vocab:
        raise ValueError(f"{path}: token id {max(vocab)} but the embeddings hold {n_vocab}")
    pad = [(f"[PAD{i}]", -1e4) for i in range(n_vocab)]
    pieces = [vocab.get(i, pad[i]) for i in range(n_vocab)]
    writer.add_tokenizer_model("t5" if kind == "Unigram" else "gpt2")
    writer.add_token_list([p for p, _ in pieces])
    writer.add_token_scores([sc for _, sc in pieces])
    writer.add_token_types([types.get(i, T.UNUSED) for i in range(n_vocab)])
    if kind == "Unigram":
        writer.add_add_bos_token(False)
    else:
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
        if gpt2_split(tok):
            writer.add_tokenizer_pre("gpt-2")
    gguf.SpecialVocab(src.path, load_merges=False, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)


def write_gguf(src: Source, path, dtype: str, arch: str, widths: list[dict[str, int]]) -> None:
    """Write the GGUF file at ``path`` as ``arch`` without checking that ``arch``'s graph can hold the widths (the
    tests write a mislabelled file with it, to see llama.cpp refuse it)."""
    gguf = require_gguf()
    part = src.adapter.lm
    cfg = part.config  # the language model's (LLaVA: text_config)
    per_layer = (lambda key: [w[key] for w in widths]) if arch == "deci" else (lambda key: widths[0][key])
    theta = _rope_theta(cfg)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI if arch == "deci" else gguf.MODEL_ARCH.LLAMA,
                                     part.n_layers)
    # the model's own tensors; each is converted (float32, then the file's type) only when it is added, so no
    # float32 copy of the whole model is made beside it
    sd = {lm_name(part, k): v.detach() for k, v in src.model.state_dict().items()
          if lm_name(part, k) and not k.endswith("rotary_emb.inv_freq")}
    if getattr(cfg, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # llama.cpp falls back to token_embd
    n_vocab = src.model.get_input_embeddings().weight.shape[0]
    rotary = {}  # q/k weight and bias names (the adapter's table) -> the head count their rows are permuted by
    for i, lw in enumerate(widths):
        attn = lm_name(part, f"{part.layer_path(i)}.{part.table.attn}")
        for p in ("weight", "bias"):
            rotary[f"{attn}.{part.table.q}.{p}"] = lw["heads"]
            rotary[f"{attn}.{part.table.k}.{p}"] = lw["kv_heads"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(src.path.name)
    w.add_block_count(part.n_layers)
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(part.width)
    w.add_feed_forward_length(per_layer("ffn"))
    w.add_head_count(per_layer("heads"))
    w.add_head_count_kv(per_layer("kv_heads"))
    w.add_key_length(part.head_dim)
    w.add_value_length(part.head_dim)
    w.add_rope_dimension_count(part.head_dim)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(n_vocab)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    add_tokenizer(gguf, w, src, n_vocab)
    for key, t in sd.items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{src.path}: tensor {key!r} has no GGUF name for {arch}")
        if key in rotary:
            t = permute_rotary(t, rotary[key])
        data, qtype = _tensor_type(gguf, t.to("cpu", torch.float32).numpy(), dtype)
        w.add_tensor(name, data, raw_dtype=qtype)  # q8_0: the logical shape follows from the byte shape
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def pad_mlp_(src: Source, multiple: int) -> int:
    """Zero-pad every MLP of ``src``'s language model up to a multiple of ``multiple`` channels, in place (the same
    function: a zero gate/up row before a zero down column adds nothing); returns the parameters added. Rows that
    are whole 32-value blocks let llama.cpp quantise every matrix and use its faster matrix kernels
    (BENCHMARKS.md, "Export and serving")."""
    from ukmp.export.hf import pad_

    if multiple < 1:
        raise ValueError(f"--pad-multiple: {multiple} must be >= 1")
    before = sum(p.numel() for p in src.model.parameters())
    groups = [g for g in src.adapter.lm.groups() if g.unit_type != "heads"]
    widths = {g.id: -(-src.counts[g.id] // multiple) * multiple for g in groups}
    pad_(src.model, groups, src.counts, widths)
    src.counts.update(widths)
    return sum(p.numel() for p in src.model.parameters()) - before


def export_gguf(src: Source, out, dtype: str = "f32", arch: str = "deci", pad_multiple: int = 0,
                mmproj=None) -> dict[str, Any]:
    """Write ``src`` as one GGUF file at ``out`` (absent); ``pad_multiple`` > 0: its MLPs zero-padded first
    (:func:`pad_mlp_`); ``mmproj`` (a LLaVA): its vision tower and projector as llama.cpp's mmproj file there too
    (:mod:`ukmp.export.mmproj`; both files are renamed into place only when both are complete)."""
    require_gguf()
    if mmproj is not None:
        from pathlib import Path

        from ukmp.export.mmproj import check_mmproj_source

        mmproj = Path(mmproj)
        check_mmproj_source(src)  # before anything is written
    if arch not in ARCHES:
        raise ValueError(f"--gguf-arch: {arch!r} is not one of {', '.join(ARCHES)}")
    pruned = count(src.model)
    added = pad_mlp_(src, pad_multiple) if pad_multiple else 0
    check_dtype(src, dtype)
    cfg = src.adapter.lm.config
    _rope_theta(cfg)
    widths = layer_widths(src)
    uniform = all(w == widths[0] for w in widths)
    if arch == "llama" and not uniform:
        raise ValueError(f"--gguf-arch llama: llama.cpp's llama graph sizes every layer from layer 0, but the layers "
                         f"differ (ffn {[w['ffn'] for w in widths]}, kv heads {[w['kv_heads'] for w in widths]}); "
                         f"write it as deci")
    writer_log = logging.getLogger("gguf.gguf_writer")  # its INFO lines name the temporary file
    level = writer_log.level
    writer_log.setLevel(logging.WARNING)
    mm = None
    try:
        with staged_output(out, is_dir=False) as tmp:
            write_gguf(src, tmp, dtype, arch, widths)
            if mmproj is not None:
                from ukmp.export.mmproj import export_mmproj

                with staged_output(mmproj, is_dir=False) as tmp_mm:
                    mm = export_mmproj(src, tmp_mm, mmproj, dtype)
    except BaseException:
        if mm is not None:  # the mmproj file was renamed into place but the language model's was not
            mmproj.unlink(missing_ok=True)
        raise
    finally:
        writer_log.setLevel(level)
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    notes = [f"sliding window {window} not in GGUF: the same outputs up to {window} tokens"] if window else []
    if src.adapter.lm.prefix and mm is None:
        notes.append("the language model only: the vision tower and projector are not written (--mmproj PATH "
                     "writes them); the counts above are of the whole model")
    if mm is not None:
        notes.append(f"mmproj {mm['out']} ({mm['dtype']}): the {mm['layers']} vision layer(s) the language model "
                     f"reads, attention zero-padded to {mm['heads_padded']} heads (kept {mm['heads']}: llama.cpp's "
                     f"CLIP graph takes one head count), MLP widths written {mm['ffn_written']} (kept "
                     f"{mm['ffn']}); vision + projector parameters dense {mm['params']['dense']:,}, pruned "
                     f"{mm['params']['pruned']:,}, in the file {mm['params']['exported']:,} (keeps "
                     f"{100 * mm['saving_kept']:.1f} % of the saving)")
    if pad_multiple:
        notes.append(f"MLPs zero-padded to multiples of {pad_multiple} channels: {added:,} parameters added")
    extra = {"mmproj": mm} if mm is not None else {}
    return build_report(src, "gguf", out, pruned, count(src.model), arch=arch, dtype=dtype, padded=bool(added),
                        layers=widths, notes=notes, **extra)
