"""Artifacts on disk: atomic writes, and pruned models that reload in one call.

A pruned model directory holds::

    ukmp.json          format marker, version, adapter, plan digest, tied-weight aliases, parameter counts
    plan.json          the PruningPlan (kept unit indices per group, original numbering)
    config.json        the *dense* model config (the plan says how it was cut)
    model.safetensors  the pruned state dict (tied tensors stored once)
    processor files    when a processor was given (tokenizer, image processor)

``load_pruned`` builds the dense structure on the meta device (no memory), applies the plan to shapes only, then
assigns the safetensors tensors: no pickle is involved anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ukmp.files import (  # noqa: F401  (re-exported: ukmp.io is where users and tests find them)
    MARKER,
    AtomicDir,
    atomic_save_tensors,
    atomic_write_json,
    atomic_write_text,
    current_umask,
    is_pruned_dir,
    read_json_file,
)

PRUNED_FORMAT = "ukmp.pruned_model"
PRUNED_VERSION = 1


# ---------------------------------------------------------------------------------------------------- state dicts
def dedup_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with each shared tensor stored once, plus {alias: canonical} for the dropped names."""
    sd = model.state_dict()
    canonical: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for k, v in sd.items():
        key = (v.device.type, v.data_ptr(), tuple(v.shape), v.dtype) if v.numel() else (k,)
        if key in canonical:
            aliases[k] = canonical[key]
        else:
            canonical[key] = k
            out[k] = v
    return out, aliases


def _set_tensor(model: nn.Module, name: str, value: nn.Parameter) -> None:
    mod_path, attr = name.rsplit(".", 1)
    setattr(model.get_submodule(mod_path), attr, value)


def read_safetensors(path: str | os.PathLike, what: str,
                     device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing, truncated or foreign file is a one-line error naming it."""
    from safetensors import SafetensorError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: {what} unreadable, truncated or not safetensors ({str(e).splitlines()[0]})") \
            from None


def fingerprint(model: nn.Module) -> str:
    """A short hash of tensors no plan ever prunes (the input token embeddings, and BLIP-2's query tokens), rounded to
    bf16 so the same weights loaded in another dtype give the same value: the dense model a pruned one came from."""
    import hashlib

    h = hashlib.sha256()
    tensors = [("embeddings", model.get_input_embeddings().weight)]
    if isinstance(getattr(model, "query_tokens", None), torch.Tensor):
        tensors.append(("query_tokens", model.query_tokens))
    for name, t in tensors:
        flat = t.detach().reshape(-1)[:4096].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(name.encode() + flat.numpy().tobytes())
    return h.hexdigest()[:16]


def dense_model_identity(mc, model: nn.Module) -> dict[str, Any]:
    """What ``ukmp.json`` records of the dense origin (``mc``: the ``ModelConfig`` it was loaded with)."""
    return {"source": mc.source, "seed": mc.seed, "fingerprint": fingerprint(model)}


def check_writable_model_dir(out: Path) -> None:
    """``save_pruned`` replaces only an earlier pruned-model directory (or an empty one), never a file or other data."""
    if out.is_file() or out.is_symlink() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is a file; a pruned model is a directory")
    if out.is_dir() and not is_pruned_dir(out) and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not a ukmp pruned model directory ({MARKER} missing); "
                              f"refusing to replace it")


# ---------------------------------------------------------------------------------------------------- save / load
def save_pruned(
    model: nn.Module, plan, out_dir: str | os.PathLike, processor=None, extra: dict[str, Any] | None = None
) -> Path:
    """Write a pruned model directory atomically (see module docstring). Returns the final path."""
    from ukmp.models import adapter_for, count_parameters

    check_writable_model_dir(Path(out_dir))
    adapter = adapter_for(model.config)
    groups = adapter.groups()
    plan.validate(groups)
    counts = adapter.unit_counts(model)
    for g in groups:
        if counts[g.id] != len(plan.kept(g)):
            raise ValueError(f"save_pruned: group {g.id!r} has {counts[g.id]} units but the plan keeps "
                             f"{len(plan.kept(g))}; pass the plan that was applied to this model")
    tensors, aliases = dedup_state_dict(model)
    marker = {
        "format": PRUNED_FORMAT,
        "version": PRUNED_VERSION,
        "adapter": adapter.name,
        "plan_digest": plan.digest(),
        "aliases": aliases,
        "parameters": count_parameters(model),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        **(extra or {}),
    }
    out = Path(out_dir)
    with AtomicDir(out) as tmp:
        cfg = model.config.to_dict()
        atomic_write_json(tmp / "config.json", cfg)
        atomic_write_json(tmp / "plan.json", plan.to_dict())
        atomic_save_tensors(tmp / "model.safetensors", tensors, metadata={"format": "pt", "ukmp": PRUNED_FORMAT})
        if processor is not None:
            processor.save_pretrained(str(tmp))
        atomic_write_json(tmp / MARKER, marker)  # last: its presence marks a complete directory
    return out


def read_marker(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path) / MARKER
    if not p.is_file():
        raise FileNotFoundError(f"{p}: not a ukmp pruned model directory ({MARKER} missing)")
    d = read_json_file(p, "pruned-model marker")
    if d.get("format") != PRUNED_FORMAT:
        raise ValueError(f"{p}: field 'format' must be {PRUNED_FORMAT!r}")
    if d.get("version") != PRUNED_VERSION:
        raise ValueError(f"{p}: unsupported version {d.get('version')!r}")
    return d


def model_digest(path: str | os.PathLike) -> str:
    """Content hash (sha256, 16 hex digits) of a saved model directory: ``plan.json``, ``config.json`` and the
    weights, so a recovered model and the pruned one it came from differ."""
    import hashlib

    h = hashlib.sha256()
    for name in ("plan.json", "config.json", "model.safetensors"):
        f = Path(path) / name
        if f.is_file():
            h.update(name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def read_plan(path: str | os.PathLike):
    from ukmp.plan import PruningPlan

    return PruningPlan.load(Path(path) / "plan.json")


def load_pruned(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "sdpa",
):
    """Rebuild the stock transformers model (``Blip2ForConditionalGeneration``, ``LlamaForCausalLM``, ...) with the
    pruned shapes and load its weights."""
    from ukmp.models import adapter_for
    from ukmp.models.build import build_model, load_config, parse_dtype

    path = Path(path)
    marker = read_marker(path)
    plan = read_plan(path)
    if plan.digest() != marker.get("plan_digest"):
        raise ValueError(f"{path / 'plan.json'}: plan digest does not match {MARKER} (files from different runs?)")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: weights file missing")
    config = load_config(path)
    model = build_model(config, device="meta", attn_implementation=attn_implementation, seed=None)
    adapter_for(config).apply_(model, plan)
    sd = read_safetensors(weights, "weights file", device=device)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:  # size mismatches: one line, not one per tensor
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise ValueError(f"{weights}: {len(lines)} tensor(s) do not match the shapes plan.json gives "
                         f"(first: {lines[0] if lines else str(e).splitlines()[0]})") from None
    aliases = marker.get("aliases", {})
    bad_missing = [k for k in missing if k not in aliases]
    if bad_missing or unexpected:
        raise ValueError(f"{weights}: state dict does not match the plan's shapes "
                         f"(missing {bad_missing[:3]}, unexpected {list(unexpected)[:3]})")
    for alias, canon in aliases.items():
        _set_tensor(model, alias, model.get_parameter(canon) if canon in dict(model.named_parameters())
                    else model.get_buffer(canon))
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if leftovers:
        raise ValueError(f"{weights}: tensors not restored: {leftovers[:3]}")
    if dtype is not None:
        cast_(model, parse_dtype(dtype))
    return model.to(device).eval()


def cast_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters to ``dtype`` except the modules transformers keeps in fp32 (T5 ``wo``, Q-Former)."""
    keep: set[str] = set()
    for m in model.modules():
        keep |= set(getattr(m, "_keep_in_fp32_modules", None) or [])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            parts = name.split(".")
            target = torch.float32 if (dtype in (torch.float16, torch.bfloat16) and keep & set(parts)) else dtype
            if p.dtype != target:
                p.data = p.data.to(target)
    return model
