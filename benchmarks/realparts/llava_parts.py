"""The LLaVA of the real-weights testbed, assembled: DINOv2 ViT-S/14 in a ``SiglipVisionModel`` shell, a fresh
two-layer MLP projector and SmolLM2-135M-Instruct in one ``LlavaForConditionalGeneration``.

**Why SigLIP's shell.** transformers' LLaVA builds its tower from ``vision_config`` and ukmp's LLaVA adapter reads
CLIP's module names (``ClipVisionPart``). CLIP's tower has a ``pre_layrnorm`` after the embeddings that DINOv2 does
not (a LayerNorm cannot be made the identity on every input), while SigLIP's is DINOv2's block structure exactly:
a patch convolution with bias, learnt position embeddings, pre-LN layers with biases, a final ``post_layernorm``.
It has no class token. Everything else converts exactly (``convert.convert_state_dict``: LayerScale folded, the key
bias dropped, ImageNet normalisation folded into the patch convolution relative to the CLIP mean/std that ukmp's
LLaVA batches apply -- ``LlavaAdapter.batch_layout`` leaves ``image_mean`` unset, i.e. CLIP's, and the saved
processor says the same); the one deviation is the class token DINOv2 was trained with, which the shell drops
(:func:`cls_deviation` measures it).

**Prompt.** The processor carries a chat template in SmolLM2-Instruct's own turn format without its default system
turn (``<|im_start|>user\\n<image>Question: ... Short answer:<|im_end|>\\n<|im_start|>assistant\\n``): ukmp's
evaluator applies it (LLaVA's default prompt style is ``template``) and the answer ends with ``<|im_end|>``, the
model's end-of-sequence token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import convert

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLM_DIR = "smollm2-135m-instruct-f32"  # under the testbed cache: the GGUF dequantised once (float32 safetensors)


def siglip_config(w: dict[str, torch.Tensor], image_size: int) -> dict[str, Any]:
    """The ``SiglipVisionConfig`` fields of the backbone ``w`` (``convert.read_onnx_backbone`` names)."""
    c = convert.vision_config(w, image_size)
    return {"model_type": "siglip_vision_model", "hidden_size": c["hidden_size"],
            "intermediate_size": c["intermediate_size"], "num_hidden_layers": c["num_hidden_layers"],
            "num_attention_heads": c["num_attention_heads"], "num_channels": 3, "image_size": image_size,
            "patch_size": c["patch_size"], "hidden_act": "gelu", "layer_norm_eps": c["layer_norm_eps"],
            "attention_dropout": 0.0, "vision_use_head": False}


def siglip_state_dict(w: dict[str, torch.Tensor], image_size: int) -> dict[str, torch.Tensor]:
    """``SiglipVisionModel`` weights of ``w``: BLIP-2's exact conversion, its fused ``qkv`` split, the class token
    and its position row dropped."""
    b = convert.convert_state_dict(w, image_size)
    sd = {"embeddings.patch_embedding.weight": b["embeddings.patch_embedding.weight"],
          "embeddings.patch_embedding.bias": b["embeddings.patch_embedding.bias"],
          "embeddings.position_embedding.weight": b["embeddings.position_embedding"][0, 1:].contiguous(),
          "post_layernorm.weight": b["post_layernorm.weight"], "post_layernorm.bias": b["post_layernorm.bias"]}
    n = 1 + max(int(k.split(".")[2]) for k in b if k.startswith("encoder.layers."))
    for i in range(n):
        p = f"encoder.layers.{i}."
        for name in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            for t in ("weight", "bias"):
                sd[f"{p}{name}.{t}"] = b[f"{p}{name}.{t}"]
        for t in ("weight", "bias"):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), b[f"{p}self_attn.qkv.{t}"].chunk(3, 0)):
                sd[f"{p}self_attn.{name}.{t}"] = part.contiguous()
            sd[f"{p}self_attn.out_proj.{t}"] = b[f"{p}self_attn.projection.{t}"]
    return sd


def vision_tower(w: dict[str, torch.Tensor], image_size: int):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = {k: v for k, v in siglip_config(w, image_size).items() if k != "model_type"}
    model = SiglipVisionModel(SiglipVisionConfig(**cfg))
    model.load_state_dict(siglip_state_dict(w, image_size), strict=True)
    return model.eval()


def cls_deviation(w: dict[str, torch.Tensor], pixels: torch.Tensor, image_size: int, layers: list[int]) -> dict:
    """The shell (no class token) vs the exact BLIP-2 conversion (with it) on the same CLIP-normalised
    ``pixels``: per hidden state in ``layers`` (0: embeddings, i: after layer i), the mean and minimum cosine of
    the patch tokens and the relative L2 difference."""
    shell = vision_tower(w, image_size)
    exact = convert.build_vision_model(w, image_size)
    out = {}
    with torch.no_grad():
        a = shell(pixel_values=pixels, output_hidden_states=True).hidden_states
        b = exact(pixel_values=pixels, output_hidden_states=True).hidden_states
        for i in layers:
            x, y = a[i], b[i][:, 1:]
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
            out[str(i)] = {"mean_cosine": round(float(cos.mean()), 5), "min_cosine": round(float(cos.min()), 5),
                           "relative_l2": round(float((x - y).norm() / y.norm()), 5)}
    return out


def load_llm(root: Path):
    """(SmolLM2-135M-Instruct float32, its tokenizer) from the testbed cache."""
    from transformers import AutoTokenizer

    from ukmp.models.build import load_model

    path = Path(root) / LLM_DIR
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: the dequantised SmolLM2 is missing (benchmarks/realparts/language.py "
                                f"writes it)")
    return load_model(str(path), dtype="float32"), AutoTokenizer.from_pretrained(str(path))


def assemble(w: dict[str, torch.Tensor], lm, tokenizer, image_size: int, feature_layer: int, seed: int):
    """(model, processor): the LLaVA of the module docstring, its projector drawn from ``seed``; the language
    model reads the tower's hidden state ``feature_layer`` (every patch: strategy ``full``)."""
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration

    from ukmp.models.processors import build_llava_processor

    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_id = int(tokenizer.convert_tokens_to_ids("<image>"))
    if image_id != lm.config.vocab_size or len(tokenizer) != lm.config.vocab_size + 1:
        raise RuntimeError(f"<image>: expected one new token after the LLM's {lm.config.vocab_size}, got id {image_id}")
    text = {k: v for k, v in lm.config.to_dict().items()
            if k not in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                         "architectures", "dtype")}
    text["vocab_size"] = image_id + 1
    cfg = LlavaConfig(vision_config=siglip_config(w, image_size), text_config=text, image_token_index=image_id,
                      projector_hidden_act="gelu", vision_feature_select_strategy="full",
                      vision_feature_layer=feature_layer, multimodal_projector_bias=True,
                      tie_word_embeddings=bool(lm.config.tie_word_embeddings))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.model.vision_tower.load_state_dict(siglip_state_dict(w, image_size), strict=True)
    emb = lm.get_input_embeddings().weight.detach()
    sd = {k[len("model."):]: v for k, v in lm.state_dict().items() if k.startswith("model.")}
    sd["embed_tokens.weight"] = torch.cat([emb, torch.zeros(1, emb.shape[1], dtype=emb.dtype)], 0)
    model.model.language_model.load_state_dict(sd, strict=True)
    tied = model.lm_head.weight is model.model.language_model.embed_tokens.weight
    if tied != bool(lm.config.tie_word_embeddings):
        raise RuntimeError(f"lm_head: tied {tied} in the LLaVA, {lm.config.tie_word_embeddings} in the language model")
    if not tied:  # the new token's row is zero in the output layer too
        head = lm.get_output_embeddings().weight.detach()
        with torch.no_grad():
            model.lm_head.weight.copy_(torch.cat([head, torch.zeros(1, head.shape[1], dtype=head.dtype)], 0))
    eos = int(tokenizer.eos_token_id)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                                               pad_token_id=int(tokenizer.pad_token_id))
    processor = build_llava_processor(tokenizer, cfg)
    processor.chat_template = CHAT_TEMPLATE
    return model.eval(), processor


def features(model, pixels: torch.Tensor, layer: int, batch: int = 64) -> torch.Tensor:
    """The tower's hidden state ``layer`` (0: embeddings, i: after layer i; the one LLaVA reads), running only the
    layers before it."""
    vt = model.model.vision_tower
    out = []
    with torch.no_grad():
        for s in range(0, len(pixels), batch):
            h = vt.embeddings(pixels[s: s + batch])
            for blk in vt.encoder.layers[:layer]:
                h = blk(h, None)
                h = h[0] if isinstance(h, tuple) else h
            out.append(h)
    return torch.cat(out)


def layer_probe(model, pixels: torch.Tensor, labels: dict[str, list[str]], fit: int, ridge: float = 10.0) -> dict:
    """Which of the tower's hidden states keep colour and shape: per hidden state (0: embeddings ... the last
    block), a ridge-regression classifier on the mean, max and min over the patch tokens (standardised on the first
    ``fit`` images), fitted on the first ``fit`` images of ``pixels``, its accuracy (%) on the rest, per label in
    ``labels`` (name -> one class per image)."""
    pooled: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for s in range(0, len(pixels), 100):
            states = model.model.vision_tower(pixel_values=pixels[s: s + 100], output_hidden_states=True).hidden_states
            pooled.append([torch.cat([h.mean(1), h.amax(1), h.amin(1)], 1).double() for h in states])
    out: dict[str, dict[str, float]] = {}
    for i in range(len(pooled[0])):
        x = torch.cat([p[i] for p in pooled])
        x = (x - x[:fit].mean(0)) / (x[:fit].std(0) + 1e-6)
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        row = {}
        for name, ys in labels.items():
            classes = sorted(set(ys))
            y = torch.tensor([classes.index(c) for c in ys])
            target = torch.nn.functional.one_hot(y, len(classes)).double()
            a = x[:fit]
            w = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1], dtype=a.dtype), a.T @ target[:fit])
            row[name] = round(100 * float(((x[fit:] @ w).argmax(1) == y[fit:]).double().mean()), 1)
        out[str(i)] = row
    return out
