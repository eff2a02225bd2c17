"""Structure report of a (dense or pruned) model: unit counts per group kind and parameter budgets."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from ukmp.models import adapter_for, count_parameters


def _structure_model(source: str):
    """Build ``source`` on the meta device (no weights are read); pruned directories get their plan applied."""
    from ukmp.files import gguf_files
    from ukmp.io import is_pruned_dir, read_plan
    from ukmp.models.build import SHIPPED_CONFIGS, build_model, load_config

    if source.endswith(".gguf"):
        if not Path(source).is_file():
            raise FileNotFoundError(f"{source}: no such GGUF file")
        config = gguf_config(Path(source))
    elif gguf_files(source):
        raise ValueError(f"{source} holds GGUF weights but no config.json; name the file: "
                         f"ukmp inspect {Path(source) / gguf_files(source)[0]}")
    elif source in SHIPPED_CONFIGS or source.endswith(".json") or Path(source).is_dir():
        config = load_config(source)
    else:  # a hub id: only the config is fetched (or read from the local cache when offline)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source)
    model = build_model(config, device="meta", seed=None)
    plan = None
    if Path(source).is_dir() and is_pruned_dir(source):
        plan = read_plan(source)
        adapter_for(config).apply_(model, plan)
    return model, plan


def gguf_config(path: Path):
    """The config a GGUF file carries, read as ``model.source=DIR model.gguf_file=NAME`` reads it (metadata only)."""
    from transformers import AutoConfig

    from ukmp.models.build import config_from_dict

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as e:
        raise ValueError(f"{path}: reading a GGUF file needs the gguf package (make realparts-install): "
                         f"{str(e).splitlines()[0]}") from None
    except (OSError, ValueError, struct.error) as e:  # struct.error: a file cut short inside its header
        raise ValueError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0]})") from None
    return config_from_dict(config.to_dict(), str(path))


def inspect_model(source: str | os.PathLike) -> dict[str, Any]:
    source = str(source)
    model, plan = _structure_model(source)
    adapter = adapter_for(model.config)
    groups = adapter.groups()
    current = adapter.unit_counts(model)
    notes = adapter.unit_notes()
    kinds: dict[str, dict[str, Any]] = {}
    for kind in adapter.group_kinds:
        gs = [g for g in groups if g.kind == kind]
        if not gs:
            continue
        kinds[kind] = {
            "unit_type": gs[0].unit_type,
            "modality": gs[0].modality,
            "layers": len(gs),
            "units_per_layer": gs[0].n_units,
            "units_total": sum(g.n_units for g in gs),
            "units_kept": sum(current[g.id] for g in gs),
            "params_per_unit": gs[0].params_per_unit,
            "prunable_params": sum(g.total_params for g in gs),
            "unit_note": notes.get(kind),
        }
    dense_total = sum(g.total_params for g in groups)
    total = count_parameters(model)
    removed = plan.removed_params(groups) + plan.dropped_params() if plan is not None else 0
    return {
        "model": source,
        "pruned": plan is not None,
        "group_kinds": kinds,
        "unused_layers": {"vision": adapter.unused_vision_layers()},  # outputs never reach the model's output
        "dropped_layers": dict(plan.drop_layers) if plan is not None else {},
        "parameters": {
            "total": total,
            "prunable": dense_total - removed,
            "prunable_dense": dense_total,
            "not_prunable": total - (dense_total - removed),
            "by_modality": adapter.parameter_breakdown(model),
            "removed": removed,
            "dense_total": total + removed,
            "ratio_removed": removed / (total + removed),
        },
    }


def format_inspect(report: dict[str, Any]) -> str:
    lines = [f"model: {report['model']}{'  (pruned)' if report['pruned'] else ''}", ""]
    lines.append(f"{'group kind':<16}{'type':<10}{'layers':>7}{'units/layer':>13}{'kept/total':>18}"
                 f"{'params/unit':>13}{'prunable':>16}")
    for kind, k in report["group_kinds"].items():
        lines.append(
            f"{kind:<16}{k['unit_type']:<10}{k['layers']:>7}{k['units_per_layer']:>13}"
            f"{str(k['units_kept']) + '/' + str(k['units_total']):>18}{k['params_per_unit']:>13,}"
            f"{k['prunable_params']:>16,}"
        )
    lines += [f"  {kind}: one unit = {k['unit_note']}" for kind, k in report["group_kinds"].items()
              if k.get("unit_note")]
    lines += [f"  {stack} layers {layers} never reach the output (the prune stage drops them)"
              for stack, layers in report.get("unused_layers", {}).items() if layers]
    lines += [f"  {stack}: dropped all layers from {d['keep']} ({d['params']:,} parameters)"
              for stack, d in report.get("dropped_layers", {}).items()]
    p = report["parameters"]
    lines += [
        "",
        f"total parameters      {p['total']:>16,}",
        f"prunable parameters   {p['prunable']:>16,}   (dense {p['prunable_dense']:,})",
        f"never pruned          {p['not_prunable']:>16,}   (bridges, embeddings, norms, lm_head)",
        "by modality           " + ", ".join(f"{m} {v:,}" for m, v in p["by_modality"].items()),
    ]
    if report["pruned"]:
        lines.append(f"removed               {p['removed']:>16,}   ({100 * p['ratio_removed']:.2f}% of the dense model)")
    return "\n".join(lines)
