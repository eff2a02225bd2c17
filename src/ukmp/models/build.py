"""Building and loading models of every registered architecture, and the processors of the tiny builds.

* :func:`load_model` — a hub id (``Salesforce/blip2-flan-t5-xl``) or a local ``save_pretrained`` directory, in a
  chosen dtype/device; or a shipped config name (``blip2-flan-t5-xl``, ``mid``, ``tiny``) or a config JSON file,
  built offline with random weights or on the meta device (structure only).
* :func:`build_tokenizer` / :func:`build_processor` — an offline T5 tokenizer (Unigram trained on the fly, no
  sentencepiece) and a ``Blip2Processor`` for tests, the demo and the testbed.
"""

from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import torch
from transformers import Blip2Config

from ukmp.models.families import SHIPPED_CONFIGS, TINY  # noqa: E402 (torch-free: config validation reads them)

log = logging.getLogger(__name__)

HUB_DEFAULT = "Salesforce/blip2-flan-t5-xl"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: unknown value {dtype!r} (choose from {sorted(DTYPES)})")
    return DTYPES[dtype]


def shipped_config_path(name: str) -> Path:
    if name not in SHIPPED_CONFIGS:
        raise ValueError(f"config: unknown shipped config {name!r} (choose from {sorted(SHIPPED_CONFIGS)})")
    return Path(str(resources.files("ukmp.models") / "configs" / SHIPPED_CONFIGS[name]))


def load_config(source: str | os.PathLike, **overrides: Any):
    """A model config (``Blip2Config``, ``LlamaConfig``, ...) from a shipped name, a JSON file, or a directory
    holding ``config.json``; its ``model_type`` must be one ukmp has an adapter for."""
    s = str(source)
    if s in SHIPPED_CONFIGS:
        path = shipped_config_path(s)
    else:
        path = Path(s)
        if path.is_dir():
            path = path / "config.json"
    from ukmp.files import read_json_file

    d = read_json_file(path, "model config")
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, got a {type(d).__name__}")
    d.update(overrides)
    return config_from_dict(d, str(path))


def config_from_dict(d: dict, source: str = "model config"):
    """The transformers config class of ``d['model_type']``, refused in one line when ukmp has no adapter for it."""
    from transformers import AutoConfig

    from ukmp.models.registry import MODELS, adapter_for

    t = d.get("model_type")
    if t not in MODELS:
        raise ValueError(f"{source}: model_type {t!r} is not supported (supported: {', '.join(sorted(MODELS))})")
    if t == "blip-2":
        config = Blip2Config.from_dict(d)
    elif t == "instructblip":
        from transformers import InstructBlipConfig

        config = InstructBlipConfig.from_dict(d)
    else:
        kw = {k: v for k, v in d.items() if k not in ("model_type", "quantization_config")}
        config = AutoConfig.for_model(t, **kw)
    try:  # the registry also refuses what only the adapter sees: BLIP-2's language model type, uneven KV groups
        adapter_for(config)
    except ValueError as e:
        raise ValueError(f"{source}: {str(e).removeprefix('model config: ')}") from None
    return config


def _looks_like_path(s: str) -> bool:
    """A source that can only be meant as a local path (a hub id is ``name`` or ``org/name``)."""
    return (s.startswith(("/", ".", "~")) or s.count("/") > 1 or s.endswith(("/", os.sep))
            or (os.sep != "/" and os.sep in s))


def build_model(
    config,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    seed: int | None = 0,
    attn_implementation: str = "sdpa",
) -> torch.nn.Module:
    """A model with random weights (``device='meta'``: structure only, instant, no memory)."""
    from ukmp.models.registry import adapter_for

    cls = adapter_for(config).model_class()
    dt = parse_dtype(dtype)
    if seed is not None:
        torch.manual_seed(seed)
    config._attn_implementation = attn_implementation
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(prev)
    if str(device) == "meta":
        materialize_rotary_buffers_(model)
    if not hasattr(model, "query_tokens"):
        return model.eval()
    if untie_lm_head_(model) and device != "meta":
        with torch.no_grad():  # T5's own init for an untied lm_head; random builds then look like real FlanT5
            model.language_model.lm_head.weight.normal_(0.0, config.text_config.initializer_factor)
    if str(device) != "meta":
        # transformers zero-initialises query_tokens; identical queries get identical gradients and never separate
        # (the Q-Former has no query position embedding). A private generator leaves the global RNG untouched.
        g = torch.Generator().manual_seed(0 if seed is None else int(seed) + 1)
        with torch.no_grad():
            q = torch.randn(model.query_tokens.shape, generator=g) * config.initializer_range
            model.query_tokens.copy_(q.to(model.query_tokens.dtype))
    return model.eval()


def materialize_rotary_buffers_(model) -> None:
    """Compute the rotary embeddings' ``inv_freq`` buffers of a meta-built model on the CPU (a few floats).

    They are non-persistent (never saved), so a model built on the meta device whose weights are assigned later
    (:func:`ukmp.io.load_pruned`) would otherwise keep them on meta. transformers' own ``_init_weights`` computes
    them from the config, as ``from_pretrained`` does; other non-persistent buffers stay on meta (and are reported
    by ``load_pruned``). ``position_ids`` tables (``[1, n]`` aranges of the Q-Former's and CLIP's embeddings) are
    rebuilt too."""
    rotary = {}
    for name, buf in list(model.named_non_persistent_buffers()):
        path, _, attr = name.rpartition(".")
        module = model.get_submodule(path)
        if buf.is_meta and attr == "position_ids" and buf.dim() == 2 and buf.shape[0] == 1:  # Q-Former, CLIP: arange
            module.register_buffer(attr, torch.arange(buf.shape[1], dtype=buf.dtype).unsqueeze(0), persistent=False)
        elif buf.is_meta and "RotaryEmbedding" in type(module).__name__:
            module.register_buffer(attr, torch.empty(buf.shape, dtype=buf.dtype, device="cpu"), persistent=False)
            rotary[path] = module
    for module in rotary.values():
        model._init_weights(module)


def untie_lm_head_(model) -> bool:
    """FlanT5 (T5 v1.1) has an ``lm_head`` separate from the token embeddings, but transformers 5 ties every T5
    ``lm_head`` when a model is built from a config. ``scale_decoder_outputs == False`` is transformers' own marker
    of a v1.1 checkpoint; for those give ``lm_head`` its own copy so that shapes, parameter counts and training match
    the real model."""
    lm = model.language_model
    if not hasattr(lm, "shared") or getattr(lm.config, "scale_decoder_outputs", True) or lm.lm_head.weight is not lm.shared.weight:
        return False
    lm.lm_head.weight = torch.nn.Parameter(lm.shared.weight.detach().clone())
    for owner, key in ((model, "language_model.lm_head.weight"), (lm, "lm_head.weight")):
        tied = getattr(owner, "all_tied_weights_keys", None)
        if isinstance(tied, dict):
            tied.pop(key, None)
    return True


def is_local_model_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    random_weights_device: str | None = None,
    gguf_file: str | None = None,
) -> torch.nn.Module:
    """Load a dense model of a registered architecture (BLIP-2 with T5 / OPT / Llama-family LMs, causal LMs).

    ``name_or_path``: a directory written by ``save_pretrained`` (weights must be safetensors), a hub id such as
    ``Salesforce/blip2-flan-t5-xl`` (honours ``HF_HUB_OFFLINE``), a shipped config name, or a config ``.json`` file.
    Config-only sources give random weights (``random_weights_device='meta'`` for structure only). ``gguf_file``:
    a GGUF file inside ``name_or_path`` read by transformers' GGUF loader (dequantised to ``dtype``).
    """
    s = str(name_or_path)
    if s in SHIPPED_CONFIGS or s.endswith(".json"):
        cfg = load_config(s)
        return build_model(cfg, device=random_weights_device or device, dtype=dtype,
                           attn_implementation=attn_implementation)
    gguf_dir = bool(gguf_file) and Path(s).is_dir()  # a local directory holding the GGUF (hub ids pass through)
    if gguf_dir and not Path(s, gguf_file).is_file():
        raise FileNotFoundError(f"{Path(s, gguf_file)}: no such GGUF file (model.source / model.gguf_file)")
    if Path(s).exists() and not is_local_model_dir(s) and not gguf_dir:  # a GGUF file carries its own config
        raise FileNotFoundError(f"{s}: not a model directory (config.json missing)")
    if not Path(s).exists() and _looks_like_path(s):
        raise FileNotFoundError(f"{s}: no such model directory")
    from ukmp.files import is_pruned_dir

    if is_pruned_dir(s):
        raise ValueError(f"{s}: this is a pruned model directory; load it with ukmp.io.load_pruned")
    if is_local_model_dir(s):
        load_config(s)  # another architecture or a malformed config.json: one line naming the file
        weights = ("model.safetensors", "model.safetensors.index.json")
        if not gguf_file and not any(Path(s, f).is_file() for f in weights):
            raise FileNotFoundError(f"{s}: config.json but no model.safetensors (or its index) in the directory")
    from safetensors import SafetensorError
    from transformers import AutoConfig

    from ukmp.models.registry import adapter_for

    kw = {"gguf_file": gguf_file} if gguf_file else {"use_safetensors": True}
    try:
        config = AutoConfig.from_pretrained(s, **({"gguf_file": gguf_file} if gguf_file else {}))
        cls = adapter_for(config).model_class()
        model = cls.from_pretrained(s, dtype=parse_dtype(dtype), attn_implementation=attn_implementation, **kw)
    except (OSError, SafetensorError) as e:  # not in the local cache offline, no such repo, unreadable weights
        raise OSError(f"{s}: cannot load the model ({str(e).splitlines()[0]})") from None
    if gguf_file:  # dequantised plain weights: saved configs must not say GGUF, and save_pretrained must not refuse
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
    if hasattr(model, "query_tokens"):
        untie_lm_head_(model)  # a checkpoint whose lm_head equals its embeddings was tied on load: keep them apart
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------- processors
# The tokenizer and processor builders live in ukmp.models.processors (the adapters call them without importing
# this module, which imports the registry); re-exported here, where callers have always found them.
from ukmp.models.processors import (  # noqa: E402,F401
    TAIL_BAND, build_llava_processor, build_processor, build_tokenizer, canonical_unigram_vocab)


def processor_for(config, tokenizer, corpus: Iterable[str] | None = None):
    """The processor of a random-weights build of ``config`` around ``tokenizer`` (its adapter's
    :meth:`~ukmp.models.base.ModelAdapter.build_processor`: the tokenizer alone for a plain LM; InstructBLIP gets a
    second tokenizer trained on ``corpus`` for its Q-Former)."""
    from ukmp.models.registry import adapter_for

    return adapter_for(config).build_processor(tokenizer, corpus)


def build_tiny(seed: int = 0, attn_implementation: str = "sdpa", corpus: Iterable[str] | None = None,
               name: str = "tiny", **text_overrides):
    """(model, processor) for tests and the demo: a shipped tiny config (``tiny`` = BLIP-2 T5, ``tiny-blip2-opt``,
    ``tiny-blip2-llama``; plain causal LMs ``tiny-llama``, ``tiny-opt``, ``tiny-qwen2``, whose "processor" is the
    tokenizer), its vocabulary fitted to a fresh tokenizer (``image_token_index`` = the processor's ``<image>`` id).
    ``text_overrides`` set attributes of the language model's config."""
    if name not in TINY:
        raise ValueError(f"tiny model: unknown name {name!r} (choose from {', '.join(TINY)})")
    tokenizer = build_tokenizer(corpus)
    cfg = load_config(name)
    if not hasattr(cfg, "vision_config"):  # a plain causal LM
        for k, v in text_overrides.items():
            setattr(cfg, k, v)
        if cfg.vocab_size < len(tokenizer):
            raise ValueError(f"{name} config: vocab_size {cfg.vocab_size} must be at least {len(tokenizer)}")
        return build_model(cfg, seed=seed, attn_implementation=attn_implementation), tokenizer
    processor = processor_for(cfg, tokenizer, corpus)
    qformer_tok = getattr(processor, "qformer_tokenizer", None)
    if qformer_tok is not None and cfg.qformer_config.vocab_size < len(qformer_tok):
        raise ValueError(f"{name} config: qformer vocab_size {cfg.qformer_config.vocab_size} must be at least "
                         f"{len(qformer_tok)}")
    image_id = processor.tokenizer.convert_tokens_to_ids(str(getattr(processor, "image_token", None) or "<image>"))
    cfg.image_token_id = int(image_id)  # BLIP-2 / LLaVA configs map it to image_token_index
    for k, v in text_overrides.items():
        setattr(cfg.text_config, k, v)
    if cfg.text_config.vocab_size <= image_id:
        raise ValueError(f"{name} config: text vocab_size {cfg.text_config.vocab_size} must exceed {image_id}")
    model = build_model(cfg, seed=seed, attn_implementation=attn_implementation)
    return model, processor


def random_weights_processor(source: str, config):
    """A throwaway processor (tokenizer for a plain LM) for a config-only source (a shipped name or a ``.json``):
    random weights know no vocabulary. ``None`` for a real model directory or hub id (load its own processor)."""
    if not (source in SHIPPED_CONFIGS or str(source).endswith(".json")):
        return None
    return processor_for(config, build_tokenizer())
