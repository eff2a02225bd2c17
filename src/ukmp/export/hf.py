"""``hf``: a stock transformers checkpoint (``save_pretrained`` layout) that loads without ukmp.

transformers has no model class with per-layer widths, so every layer is zero-padded to the widest kept width of
its kind. Zero units are exactly inert: a zero gate/up row gives ``silu(0)·0 = 0`` before a zero ``down`` column; a
KV group with zero q/k/v rows (and biases) and zero ``o`` columns adds nothing. Kept units keep their order and are
followed by the padding, so rotary embeddings (per head) and the grouped-query pairing (query head ``h`` reads KV
head ``h // r``) see what the pruned model saw. Head counts are snapped up to values the stock config accepts (its
``num_attention_heads`` must divide ``hidden_size``, even with an explicit ``head_dim``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ukmp.export.source import Source, build_report, count, staged_output
from ukmp.export.tables import BIAS_FLAGS, CLIP_KEYS
from ukmp.models.parts.clip import ClipVisionPart


def config_accepts(config, keys, kv_groups: int, per_group: int, head_dim: int) -> bool:
    """Whether ``config``'s class accepts these head counts (``LlamaConfig`` wants ``num_attention_heads`` to divide
    ``hidden_size`` even with an explicit ``head_dim``; Mistral's and Qwen2's accept any)."""
    try:
        type(config)(**{keys.hidden: getattr(config, keys.hidden), keys.heads: kv_groups * per_group,
                        keys.kv_heads: kv_groups, keys.head_dim: head_dim})
    except Exception:  # noqa: BLE001  (huggingface_hub's StrictDataclassClassValidationError is no ValueError)
        return False
    return True


def snap_kv_groups(kept: int, part, keys) -> int:
    """The smallest KV-group count ``>= kept`` that the stock config accepts (the dense count always is)."""
    for k in range(max(kept, 1), part.n_kv):
        if config_accepts(part.config, keys, k, part.per_group, part.head_dim):
            return k
    return part.n_kv


def part_widths(part, counts: dict[str, int], keys) -> dict[str, int]:
    """Group kind -> units per layer in the exported stack: the widest kept count (heads snapped)."""
    groups = part.groups()
    widest = {}
    for g in groups:
        widest[g.kind] = max(widest.get(g.kind, 0), counts[g.id])
    head_kind = next(g.kind for g in groups if g.unit_type == "heads")
    if isinstance(part, ClipVisionPart):  # head_dim = hidden_size / num_attention_heads: every head stays
        widest[head_kind] = part.n_heads
    else:
        widest[head_kind] = snap_kv_groups(widest[head_kind], part, keys)
    return widest


def set_widths_(part, keys, widths: dict[str, int]) -> dict[str, int]:
    """State ``widths`` (kind -> units) in the part's config; returns what was set."""
    heads = next(w for k, w in widths.items() if k.endswith("heads"))
    mlp = next(w for k, w in widths.items() if k.endswith("mlp"))
    if isinstance(part, ClipVisionPart):
        new = {CLIP_KEYS.heads: heads, CLIP_KEYS.mlp: mlp}
    else:
        new = {keys.kv_heads: heads, keys.heads: heads * part.per_group, keys.head_dim: part.head_dim, keys.mlp: mlp}
    for k, v in new.items():
        setattr(part.config, k, v)
    return new


def pad_(model: nn.Module, groups, counts: dict[str, int], widths: dict[str, int]) -> None:
    """Append zero units to every group narrower than ``widths`` (its slices' parameters and the Linears' feature
    counts follow). Needs one slice per parameter, at offset 0 (separate q/k/v Linears)."""
    with torch.no_grad():
        for g in groups:
            extra = widths[g.id] - counts[g.id]
            if extra < 0:
                raise ValueError(f"group {g.id!r}: {counts[g.id]} units kept, cannot pad to {widths[g.id]}")
            if not extra:
                continue
            seen: set[tuple[str, str]] = set()
            for s in g.slices:
                if s.offset or (s.module, s.param) in seen:
                    raise ValueError(f"group {g.id!r}: {s.name} is fused with other units; padding needs one "
                                     f"slice per parameter")
                seen.add((s.module, s.param))
                lin = model.get_submodule(s.module)
                t = getattr(lin, s.param)
                shape = list(t.shape)
                shape[s.dim] = extra * s.unit_size
                setattr(lin, s.param, nn.Parameter(torch.cat([t, t.new_zeros(shape)], dim=s.dim),
                                                   requires_grad=False))
                if s.param == "weight":
                    lin.out_features, lin.in_features = lin.weight.shape


def _stock_tensors(model: nn.Module) -> dict[str, tuple]:
    """{name: shape} of the stock model that ``model.config`` describes (built on meta)."""
    with torch.device("meta"):
        stock = type(model)(model.config)
    return {k: tuple(v.shape) for k, v in stock.state_dict().items()}


def fit_stock_(model: nn.Module) -> None:
    """Make ``model``'s tensors exactly those of the stock model its config describes: biases the pruned model
    gained (FLAP's output-bias compensation) are stated with the config's bias flags, the biases those flags add
    elsewhere are zero; anything else that differs is a one-line error (nothing would load it back faithfully)."""
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stock = _stock_tensors(model)
    extra = [k for k in ours if k not in stock]
    cfgs = [c for c in (model.config, getattr(model.config, "text_config", None)) if c is not None]
    for k in extra:
        flag = next((f for block, f in BIAS_FLAGS.items() if f".{block}." in k and k.endswith(".bias")), None)
        cfg = next((c for c in cfgs if flag and hasattr(c, flag)), None)
        if cfg is None:
            raise ValueError(f"{k}: the stock {model.config.model_type} config cannot state this tensor (an output "
                             f"bias of FLAP's compensation?); gguf and onnx hold it")
        setattr(cfg, flag, True)
    if extra:
        stock = _stock_tensors(model)
        with torch.no_grad():
            for k in stock.keys() - ours.keys():
                if not k.endswith(".bias"):
                    continue
                lin = model.get_submodule(k.rsplit(".", 1)[0])
                lin.bias = nn.Parameter(lin.weight.new_zeros(lin.weight.shape[0]), requires_grad=False)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = sorted(k for k in ours.keys() | stock.keys() if ours.get(k) != stock.get(k))
    if bad:
        raise ValueError(f"{bad[0]}: shape {ours.get(bad[0])} but the stock config gives {stock.get(bad[0])} "
                         f"({len(bad)} tensor(s) differ)")


def export_hf(src: Source, out) -> dict[str, Any]:
    """Write ``src`` as a stock checkpoint directory at ``out`` (absent); returns what it kept of the saving."""
    import shutil

    pruned = count(src.model)
    padded, stated = False, {}
    for part in src.adapter.parts:
        kinds = part_widths(part, src.counts, src.keys)
        groups = part.groups()
        widths = {g.id: kinds[g.kind] for g in groups}
        padded |= any(widths[g.id] != src.counts[g.id] for g in groups)
        pad_(src.model, groups, src.counts, widths)
        stated.update({f"{part.modality}.{k}": v for k, v in set_widths_(part, src.keys, kinds).items()
                       if not k.endswith("head_dim")})
    fit_stock_(src.model)
    exported = count(src.model)
    with staged_output(out, is_dir=True) as tmp:
        src.model.save_pretrained(str(tmp))
        for f in src.processor_files():
            shutil.copy2(f, tmp / f.name)
    return build_report(src, "hf", out, pruned, exported, padded=padded, widths=stated)
