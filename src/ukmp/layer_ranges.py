"""Layer ranges (``prune.layers``): which layers of each tower a method may prune.

A *tower* is the first component of a group id: ``vision`` (the ViT of BLIP-2 / InstructBLIP, the CLIP encoder of
LLaVA), ``lm`` (a decoder-only language model: Llama, Mistral, Qwen2, OPT, alone or inside a VLM), ``text_enc`` and
``text_dec`` (the two T5 stacks). The Q-Former is never pruned, so it is no tower. A range is ``"all"`` or a Python
slice over the tower's layer indices, ``"start:stop[:step]"`` (negative indices count from the end): ``"4:30"`` on 32
layers is LLM-Pruner's layers 4..29.

An empty mapping prunes every layer of every tower. A non-empty one prunes only the towers it lists, in their ranges;
groups outside stay whole, and their parameters count as unprunable in the whole-model ratio. Torch-free, so that
``ukmp.config`` checks the syntax when a config loads.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from ukmp.groups import PrunableGroup

TOWERS = ("vision", "lm", "text_enc", "text_dec")  # tied to the adapters' group ids by tests/core/test_layer_ranges.py
_SLICE = re.compile(r"\s*(-?\d+)?\s*:\s*(-?\d+)?\s*(?::\s*(-?\d+)?\s*)?")


def parse_range(spec: str, key: str = "prune.layers") -> slice:
    """``"all"`` or ``"start:stop[:step]"`` -> a slice; a one-line ``ValueError`` naming ``key`` otherwise."""
    text = str(spec).strip()
    if text == "all":
        return slice(None)
    m = _SLICE.fullmatch(text)
    if m is None:
        raise ValueError(f"{key}: {spec!r} is not 'all' or a Python slice 'start:stop[:step]' in quotes, e.g. "
                         f"'4:30' (unquoted, YAML reads 4:30 as the number 270)")
    start, stop, step = (None if v is None else int(v) for v in m.groups())
    if step == 0:
        raise ValueError(f"{key}: {spec!r} has step 0")
    return slice(start, stop, step)


def check_layers(layers: Mapping[str, str], key: str = "prune.layers") -> None:
    """Tower names and range syntax (no model needed)."""
    for tower, spec in layers.items():
        if tower not in TOWERS:
            raise ValueError(f"{key}.{tower}: unknown tower (towers: {', '.join(TOWERS)})")
        parse_range(spec, f"{key}.{tower}")


def tower_of(group_id: str) -> str:
    return group_id.split(".", 1)[0]


def tower_depths(groups: list["PrunableGroup"]) -> dict[str, int]:
    """Layers per tower, from the groups (``1 + the highest layer index``)."""
    out: dict[str, int] = {}
    for g in groups:
        out[tower_of(g.id)] = max(out.get(tower_of(g.id), 0), g.layer + 1)
    return out


def chosen_layers(groups: list["PrunableGroup"], layers: Mapping[str, str],
                  key: str = "prune.layers") -> dict[str, list[int]]:
    """``{tower: [layer indices]}`` that ``layers`` selects on these groups' towers (every layer when empty)."""
    depth = tower_depths(groups)
    if not layers:
        return {t: list(range(n)) for t, n in depth.items()}
    check_layers(layers, key)
    out = {}
    for tower, spec in layers.items():
        if tower not in depth:
            raise ValueError(f"{key}.{tower}: this model has no such tower (its towers: {', '.join(depth)})")
        picked = list(range(depth[tower]))[parse_range(spec, f"{key}.{tower}")]
        if not picked:
            raise ValueError(f"{key}.{tower}: {spec!r} selects none of its {depth[tower]} layers")
        out[tower] = picked
    return out


def select_layers(groups: list["PrunableGroup"], layers: Mapping[str, str],
                  key: str = "prune.layers") -> list["PrunableGroup"]:
    """The groups inside the ranges, in their order."""
    if not layers:
        return list(groups)
    chosen = {t: set(v) for t, v in chosen_layers(groups, layers, key).items()}
    return [g for g in groups if g.layer in chosen.get(tower_of(g.id), ())]


def layer_spans(groups: list["PrunableGroup"], chosen: list["PrunableGroup"]) -> dict[str, dict[str, int | None]]:
    """``{tower: {"first", "last", "count", "of"}}``: the layers of ``chosen`` (e.g. the scored groups) per tower of
    ``groups`` (``first`` / ``last`` None for a tower left whole); what summaries and ``ukmp compare`` read."""
    out = {}
    for tower, n in tower_depths(groups).items():
        picked = sorted({g.layer for g in chosen if tower_of(g.id) == tower})
        out[tower] = {"first": picked[0] if picked else None, "last": picked[-1] if picked else None,
                      "count": len(picked), "of": n}
    return out


def describe_layers(groups: list["PrunableGroup"], chosen: list["PrunableGroup"]) -> dict[str, str]:
    """``{tower: "first..last (n of N layers)"}`` (``"none (0 of N layers)"`` for a tower left whole): the text of
    :func:`layer_spans` for logs and summaries."""
    return {t: (f"{s['first']}..{s['last']} ({s['count']} of {s['of']} layers)" if s["count"]
                else f"none (0 of {s['of']} layers)") for t, s in layer_spans(groups, chosen).items()}
