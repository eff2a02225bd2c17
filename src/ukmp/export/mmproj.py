"""``gguf --mmproj``: a pruned LLaVA's vision tower and projector as the ``mmproj`` GGUF file llama.cpp's multimodal
library (``libmtmd``, its CLIP loader) reads beside the language model, for LLaVA-1.5-style MLP projectors.

What the file holds (architecture ``clip``, projector type ``mlp``):

- only the vision layers the language model reads: the tower is cut after ``vision_feature_layer`` (LLaVA-1.5
  reads hidden state -2, so the pruned model has already dropped the last layer), and ``clip.vision.feature_layer``
  names the output of the last written layer, so llama.cpp runs every written layer and no post-layernorm (LLaVA
  reads the hidden state before it);
- ``v.patch_embd`` / ``v.class_embd`` / ``v.position_embd``, ``v.pre_ln``, per layer ``v.blk.N.{ln1, attn_q,
  attn_k, attn_v, attn_out, ln2, ffn_up (fc1), ffn_down (fc2)}``, and the projector ``mm.0`` (linear_1) and
  ``mm.2`` (linear_2); the image mean/std of the processor; ``clip.use_gelu`` for a tower with exact GELU (absent:
  llama.cpp's quick GELU, OpenAI CLIP's activation).

llama.cpp's CLIP graph takes one head count for every layer and derives the head size as
``embedding_length / head_count``, so every layer's attention is zero-padded back to the dense head count (zero
q/k/v rows and biases: a zero head attends uniformly to zero values; its out_proj columns are zero too: the
function is unchanged). Its MLPs need no padding: the graph sizes each from its own tensors (checked with the
vendored llama.cpp: MLPs of 122 and 70 channels in one file), except that a layer keeping exactly
``embedding_length`` channels gets one zero channel (:func:`vision_widths`; a zero fc1 row with a zero bias gives
quick-GELU(0) = GELU(0) = 0 before a zero fc2 column). So the file keeps the saving of the dropped layers and of the
MLP channels, not that of the attention heads; the report says how much (``saving_kept``).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from ukmp.export.source import Source, require_gguf

ACTS = {"quick_gelu": False, "gelu": True}  # CLIP hidden_act -> clip.use_gelu


def _processor_stats(src: Source) -> tuple[list[float], list[float]]:
    """The processor's image mean and std (``preprocessor_config.json``, or ``processor_config.json``'s
    ``image_processor``)."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = src.path / name
        if path.is_file():
            d = json.loads(path.read_text())
            d = d.get("image_processor", d)
            if "image_mean" in d and "image_std" in d:
                return [float(x) for x in d["image_mean"]], [float(x) for x in d["image_std"]]
    raise FileNotFoundError(f"{src.path}: no image_mean / image_std in preprocessor_config.json (save the pruned "
                            f"model with its processor)")


def check_mmproj_source(src: Source) -> int:
    """The number of vision layers the language model reads; a one-line error for a model the ``mlp`` projector
    of llama.cpp cannot hold."""
    cfg = src.model.config
    vision = getattr(src.adapter, "vision", None)
    if getattr(cfg, "model_type", None) != "llava" or vision is None:
        raise ValueError(f"--mmproj: {src.path} is a {getattr(cfg, 'model_type', '?')} model; an mmproj file "
                         f"needs a LLaVA (vision tower + projector)")
    fl = cfg.vision_feature_layer
    if not isinstance(fl, int):
        raise ValueError(f"--mmproj: vision_feature_layer {fl!r}: one feature layer only")
    if cfg.vision_feature_select_strategy != "default":
        raise ValueError(f"--mmproj: vision_feature_select_strategy {cfg.vision_feature_select_strategy!r}: "
                         f"llama.cpp's mlp projector drops the class token ('default' only)")
    act = cfg.vision_config.hidden_act
    if act not in ACTS:
        raise ValueError(f"--mmproj: vision hidden_act {act!r} is not one of {', '.join(ACTS)}")
    if cfg.projector_hidden_act != "gelu":
        raise ValueError(f"--mmproj: projector_hidden_act {cfg.projector_hidden_act!r}: llama.cpp's mlp "
                         f"projector applies GELU")
    n = fl if fl >= 0 else vision.n_layers + 1 + fl
    if not 1 <= n <= vision.n_layers:
        raise ValueError(f"--mmproj: vision_feature_layer {fl} reads no layer of the {vision.n_layers} kept")
    return n


def vision_widths(src: Source, n_layers: int) -> dict[str, Any]:
    """Kept heads and MLP channels per written layer, and the widths the file holds: every layer's heads padded to
    the dense count; its MLP as kept, but for a layer of exactly ``embedding_length`` channels, which gets one zero
    channel more (llama.cpp's loader takes an ``ffn_down`` whose rows are ``embedding_length`` wide for a legacy
    file with ``ffn_up`` and ``ffn_down`` swapped, and swaps them back)."""
    part = src.adapter.vision
    heads = [src.counts[f"{part.gid}.layers.{i}.attn"] for i in range(n_layers)]
    ffn = [src.counts[f"{part.gid}.layers.{i}.mlp"] for i in range(n_layers)]
    written = [c + 1 if c == part.width else c for c in ffn]
    return {"heads": heads, "ffn": ffn, "heads_padded": part.width // part.head_dim, "ffn_written": written}


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``t`` zero-padded along ``dim`` to ``size`` (the kept slots first, in their order)."""
    shape = list(t.shape)
    shape[dim] = size - shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def mmproj_tensors(src: Source, n_layers: int, widths: dict[str, Any]) -> dict[str, torch.Tensor]:
    """GGUF name -> tensor (padded as the module docstring says), in the order they are written."""
    part = src.adapter.vision
    sd = src.model.state_dict()
    v = part.prefix
    full = part.width
    out = {
        "v.class_embd": sd[f"{v}.embeddings.class_embedding"],
        "v.patch_embd.weight": sd[f"{v}.embeddings.patch_embedding.weight"],
        "v.position_embd.weight": sd[f"{v}.embeddings.position_embedding.weight"],
        "v.pre_ln.weight": sd[f"{v}.pre_layrnorm.weight"],
        "v.pre_ln.bias": sd[f"{v}.pre_layrnorm.bias"],
    }
    if f"{v}.embeddings.patch_embedding.bias" in sd:
        out["v.patch_embd.bias"] = sd[f"{v}.embeddings.patch_embedding.bias"]
    for i in range(n_layers):
        L, b, ffn = f"{part.layers_path}.{i}", f"v.blk.{i}", widths["ffn_written"][i]
        attn = part.ATTENTION  # role -> the layer's module (the adapter's names)
        for role in ("q", "k", "v"):
            out[f"{b}.attn_{role}.weight"] = _pad(sd[f"{L}.{attn[role]}.weight"], 0, full)
            out[f"{b}.attn_{role}.bias"] = _pad(sd[f"{L}.{attn[role]}.bias"], 0, full)
        out[f"{b}.attn_out.weight"] = _pad(sd[f"{L}.{attn['out']}.weight"], 1, full)
        out[f"{b}.attn_out.bias"] = sd[f"{L}.{attn['out']}.bias"]
        for ours, theirs in (("ln1", "layer_norm1"), ("ln2", "layer_norm2")):
            out[f"{b}.{ours}.weight"] = sd[f"{L}.{theirs}.weight"]
            out[f"{b}.{ours}.bias"] = sd[f"{L}.{theirs}.bias"]
        out[f"{b}.ffn_up.weight"] = _pad(sd[f"{L}.mlp.fc1.weight"], 0, ffn)
        out[f"{b}.ffn_up.bias"] = _pad(sd[f"{L}.mlp.fc1.bias"], 0, ffn)
        out[f"{b}.ffn_down.weight"] = _pad(sd[f"{L}.mlp.fc2.weight"], 1, ffn)
        out[f"{b}.ffn_down.bias"] = sd[f"{L}.mlp.fc2.bias"]
    proj = "model.multi_modal_projector"
    for idx, lin in ((0, "linear_1"), (2, "linear_2")):
        for p in ("weight", "bias"):
            if f"{proj}.{lin}.{p}" in sd:
                out[f"mm.{idx}.{p}"] = sd[f"{proj}.{lin}.{p}"]
    return {k: t.detach().to("cpu") for k, t in out.items()}


def write_mmproj(src: Source, path, dtype: str, n_layers: int, widths: dict[str, Any]) -> int:
    """Write the mmproj file at ``path``; returns the parameters it holds. ``dtype``: f32 or f16 (matrices;
    1-D tensors stay F32)."""
    gguf = require_gguf()
    cfg = src.model.config
    vc = cfg.vision_config
    mean, std = _processor_stats(src)
    tensors = mmproj_tensors(src, n_layers, widths)
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_name(src.path.name + " (mmproj)")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_llava_projector", True)  # read by older loaders; newer ones read the projector type
    w.add_string("clip.projector_type", "mlp")
    w.add_bool("clip.use_gelu", ACTS[vc.hidden_act])
    w.add_uint32("clip.vision.image_size", int(vc.image_size))
    w.add_uint32("clip.vision.patch_size", int(vc.patch_size))
    w.add_uint32("clip.vision.embedding_length", src.adapter.vision.width)
    w.add_uint32("clip.vision.feed_forward_length", max(widths["ffn_written"]))  # informative: the graph
    # sizes each MLP from its own tensors
    w.add_uint32("clip.vision.projection_dim", int(tensors["mm.2.weight"].shape[0]))
    w.add_uint32("clip.vision.attention.head_count", widths["heads_padded"])
    w.add_float32("clip.vision.attention.layer_norm_epsilon", float(vc.layer_norm_eps))
    w.add_uint32("clip.vision.block_count", n_layers)
    w.add_array("clip.vision.image_mean", mean)
    w.add_array("clip.vision.image_std", std)
    w.add_array("clip.vision.feature_layer", [n_layers])  # hidden state n: the output of written layer n - 1
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    for name, t in tensors.items():
        a = t.to(torch.float32).numpy()
        if a.ndim > 1 and dtype == "f16":
            w.add_tensor(name, a.astype(np.float16), raw_dtype=gguf.GGMLQuantizationType.F16)
        else:
            w.add_tensor(name, a, raw_dtype=gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sum(t.numel() for t in tensors.values())


def vision_counts(src: Source) -> dict[str, int]:
    """Parameters of the vision tower + projector: dense (every layer, the ones a plan dropped included) and
    pruned (the layers kept, without the post-layernorm LLaVA never reads)."""
    from ukmp.io import read_plan
    from ukmp.models.build import build_model, load_config

    def vision_params(model) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("model.language_model")
                   and n != "lm_head.weight")

    part = src.adapter.vision
    dropped = int(read_plan(src.path).drop_layers.get(part.gid, {}).get("params", 0))
    dense = vision_params(build_model(load_config(src.path), device="meta", seed=None)) + dropped
    post = sum(p.numel() for n, p in src.model.named_parameters() if n.startswith(f"{part.prefix}.post_layernorm"))
    return {"dense": dense, "pruned": vision_params(src.model) - post}


def export_mmproj(src: Source, tmp, out, dtype: str) -> dict[str, Any]:
    """Write ``src``'s vision tower and projector to ``tmp`` (the caller renames it to ``out`` with the language
    model's file); returns what the report says of it. ``dtype`` q8_0 writes the matrices in F16."""
    n_layers = check_mmproj_source(src)
    widths = vision_widths(src, n_layers)
    file_dtype = "f32" if dtype == "f32" else "f16"
    in_file = write_mmproj(src, tmp, file_dtype, n_layers, widths)
    c = vision_counts(src)
    saved = c["dense"] - c["pruned"]
    return {"out": str(out), "dtype": file_dtype, "layers": n_layers, **widths,
            "params": {**c, "exported": in_file},
            "saving_kept": 1.0 if saved <= 0 else (c["dense"] - in_file) / saved}
