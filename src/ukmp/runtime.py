"""What the stages share: resolving devices, dense models with their processors, and dataset specs."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ukmp.config import ModelConfig

log = logging.getLogger(__name__)

SAMPLE_PREFIX = "sample:"


def is_main_process() -> bool:
    """Rank 0 of a torchrun / ``accelerate launch`` job (or a plain single process)."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def resolve_device(device: str) -> torch.device:
    if device == "cuda" or device == "auto":
        import os

        if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:  # one GPU per process under a launcher
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_dense(mc: ModelConfig, device: torch.device | None = None):
    """(dense model, processor) for a model config; a plain causal LM's "processor" is its tokenizer. The tiny
    builds (``tiny``, ``tiny-*``) are rebuilt deterministically from ``mc.seed``."""
    from ukmp.models.build import TINY, build_tiny, load_model, random_weights_processor

    device = device or resolve_device(mc.device)
    if mc.source in TINY:
        model, processor = build_tiny(seed=mc.seed, attn_implementation=mc.attn_implementation, name=mc.source)
        from ukmp.io import cast_
        from ukmp.models.build import parse_dtype

        cast_(model, parse_dtype(mc.dtype))
        return model.to(device).eval(), processor
    from ukmp.files import check_dense_source

    check_dense_source(mc.source, mc.gguf_file)
    model = load_model(mc.source, dtype=mc.dtype, device=device, attn_implementation=mc.attn_implementation,
                       gguf_file=mc.gguf_file or None)
    processor = random_weights_processor(mc.source, model.config)
    return model, processor if processor is not None else load_processor(Path(mc.source), mc.gguf_file or None)


def load_processor(model_dir: Path, gguf_file: str | None = None):
    """The processor saved with a model (BLIP-2: ``Blip2Processor``), or its tokenizer alone (a plain LM); with
    ``gguf_file`` the tokenizer stored in that GGUF file."""
    from transformers import AutoProcessor, AutoTokenizer

    path = Path(model_dir)
    if gguf_file:
        return AutoTokenizer.from_pretrained(str(model_dir), gguf_file=gguf_file)
    has_images = (path / "preprocessor_config.json").is_file() or (path / "processor_config.json").is_file()
    if has_images or not path.is_dir():
        from ukmp.models.families import source_config

        model_type = (source_config(str(model_dir)) or {}).get("model_type")
        if model_type in ("qwen2_5_vl", "qwen3_vl"):  # the stock processor cannot load without torchvision
            from ukmp.models.qwen2_5_vl import image_text_processor_class

            return image_text_processor_class(model_type).from_pretrained(str(model_dir))
        return AutoProcessor.from_pretrained(str(model_dir))
    # the class the tokenizer was saved as (AutoTokenizer would pick the model type's own class for some types)
    import json

    import transformers

    saved = path / "tokenizer_config.json"
    name = json.loads(saved.read_text()).get("tokenizer_class") if saved.is_file() else None
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    return (cls or AutoTokenizer).from_pretrained(str(model_dir))


def sample_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "_sample_data"


def resolve_dataset(spec: str, output_dir: str | Path) -> Path:
    """A dataset YAML path; ``sample:<name>`` writes (once) and uses the generated sample data."""
    if spec.startswith(SAMPLE_PREFIX):
        from ukmp.data.sample import write_sample_data

        name = spec[len(SAMPLE_PREFIX):]
        root = sample_root(output_dir)
        marker = root / "configs" / f"{name}.yaml"
        if name == "text":
            if not marker.is_file():
                from ukmp.data.sample import write_sample_text

                return write_sample_text(root)
            return marker
        complete = root / ".complete"  # written last: a generation killed half-way is redone
        if not marker.is_file() or not complete.is_file():
            for stale in root.rglob(".*.tmp") if root.is_dir() else []:  # files of a killed generation
                if stale.is_file():
                    stale.unlink(missing_ok=True)
            paths = write_sample_data(root)
            complete.touch()
            if name not in paths:
                raise ValueError(f"dataset {spec!r}: no sample dataset named {name!r} (have {', '.join(paths)})")
        return marker
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: dataset config not found")
    return path
