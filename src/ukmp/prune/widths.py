"""Engine-friendly widths: kept MLP widths in multiples of N (``width_multiple``) and one kept width per layer kind
(``scope="uniform"``), both by ranking *blocks* of units with the allocator's own loop.

Serving engines run fastest, or only, on some shapes: llama.cpp quantises an MLP whose width is not a multiple of 32
less well, and every stock model class (and llama.cpp's plain ``llama`` graph) wants the same width in every layer.
Both wishes are the same move: instead of single units, the allocator ranks *blocks* that are removed whole.

* ``width_multiple = N`` (channel groups only: MLP / FFN channels). A group's channels, sorted by score (lowest first,
  ties by unit index), are cut into a first block of ``n mod N`` channels (if any) and then blocks of ``N``, so that
  removing any number of blocks in that order leaves a multiple of ``N`` (a group narrower than ``N`` is one block,
  which the one-unit floor keeps whole). Head groups (attention heads, KV groups) are untouched: a head count is
  already what an engine takes, and the head size never changes.
* ``scope = "uniform"``. For each kind (``lm_mlp``, ``lm_heads``, ``vit_heads``, ``vit_mlp`` ...), block ``j`` is the
  ``j``-th lowest-ranked unit (or block of ``N`` channels with ``width_multiple``) of *every* layer of that kind, so
  each layer keeps the same count; which units a layer keeps still comes from that layer's scores. Every scored group
  of a kind must have the same number of units.

A block's score is the mean of its units' scores (within a group the block means rise with the block index, since
the units are sorted), its cost the sum of its units' parameters (or its unit count with ``budget="units"``); the
per-modality normalisation is affine, so it ranks blocks as it ranks units. Global scope (and uniform) then run the
unchanged global loop of :mod:`ukmp.prune.global_loop` over the blocks (steps, floors, ``exact_stop``, normalisation all
count blocks): the ratio lands within one block of the target, in the direction ``exact_stop`` says. Local scope
removes, in every group, the whole blocks that come closest below ``r * n`` channels (``carry`` passes what was
left over to the next group of the kind, as unit-level ``carry`` does; ``floor`` and ``llm_pruner`` round down).
With ``N = 1`` and the global or local scope nothing here runs: the default allocation is the one without blocks.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from ukmp.groups import PrunableGroup
from ukmp.prune.budget import local_count


@dataclass
class Blocks:
    """Blocks over a flat unit layout: ``owner[u]`` is the block of flat unit ``u``; per block: its (pseudo) group
    index, mean score, parameters, unit count, modality index; ``groups`` the pseudo groups (``n_units`` = blocks)."""

    owner: torch.Tensor
    gidx: torch.Tensor
    score: torch.Tensor
    ppu: torch.Tensor
    count: torch.Tensor
    mod: torch.Tensor
    groups: list[PrunableGroup]
    sizes: list[list[int]]  # per pseudo group, its blocks' unit counts per layer, in removal order


def block_sizes(g: PrunableGroup, multiple: int) -> list[int]:
    """Unit counts of ``g``'s blocks in removal order: ``[n mod N] + [N] * (n // N)`` for channels, else ones."""
    if g.unit_type != "channels" or multiple <= 1:
        return [1] * g.n_units
    head = g.n_units % multiple
    return ([head] if head else []) + [multiple] * (g.n_units // multiple)


def make_blocks(flat: Any, multiple: int, uniform: bool) -> Blocks:
    """Blocks of ``flat`` (a :class:`ukmp.prune.global_loop.Flat`): per group (or, ``uniform``, per kind across its
    groups)."""
    starts, s = [], 0
    for g in flat.order:
        starts.append(s)
        s += g.n_units
    members: dict[str, list[int]] = defaultdict(list)  # pseudo group key -> indices into flat.order
    for i, g in enumerate(flat.order):
        members[g.kind if uniform else g.id].append(i)
    owner = torch.empty(flat.score.numel(), dtype=torch.long)
    gidx, score, ppu, count, mod, groups, sizes = [], [], [], [], [], [], []
    for key, idx in members.items():
        first = flat.order[idx[0]]
        odd = [flat.order[i] for i in idx if flat.order[i].n_units != first.n_units]
        if odd:
            raise ValueError(f"prune.scope: uniform needs every {first.kind} group to have {first.n_units} units "
                             f"({odd[0].id} has {odd[0].n_units})")
        bs = block_sizes(first, multiple)
        ranked = []  # per member group: its flat unit indices, lowest score first (ties: lower unit index)
        for i in idx:
            lo = starts[i]
            order = torch.sort(flat.score[lo: lo + flat.order[i].n_units], stable=True).indices
            ranked.append(order + lo)
        pos = 0
        for size in bs:
            units = torch.cat([r[pos: pos + size] for r in ranked])
            owner[units] = len(score)
            gidx.append(len(groups))
            score.append(float(flat.score[units].mean()))
            ppu.append(int(flat.ppu[units].sum()))
            count.append(units.numel())
            mod.append(int(flat.mod[units[0]]))
            pos += size
        groups.append(replace(first, id=key, n_units=len(bs)))
        sizes.append(bs)
    long = torch.long
    return Blocks(owner, torch.tensor(gidx, dtype=long), torch.tensor(score, dtype=torch.float64),
                  torch.tensor(ppu, dtype=long), torch.tensor(count, dtype=long), torch.tensor(mod, dtype=long),
                  groups, sizes)


def allocate_widths(flat: Any, total: int, prunable: int, cfg: Any,
                    global_loop: Callable[[Any, int, Any, torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]
                    ) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(alive units, meta)`` of a ``width_multiple`` / ``uniform`` allocation of ``flat`` (see the module doc);
    ``global_loop``: the allocator's global loop (:func:`ukmp.prune.global_loop.allocate_global`), run on the
    blocks."""
    uniform = cfg.scope == "uniform"
    b = make_blocks(flat, int(cfg.width_multiple), uniform)
    if cfg.scope == "local":
        alive_b, extra = _local_blocks(b, total, prunable, cfg)
    else:
        bflat = replace(flat, order=b.groups, score=b.score, gidx=b.gidx, uidx=torch.arange(b.score.numel()),
                        ppu=b.ppu, mod=b.mod, count=b.count)
        alive_b, extra = global_loop(bflat, total, cfg, torch.ones(b.score.numel(), dtype=torch.bool))
    alive = alive_b[b.owner]
    cost = b.count if cfg.budget == "units" else b.ppu
    n = flat.score.numel() if cfg.budget == "units" else total
    extra["block_units"] = {"one_unit": int(cost.min()) / n, "largest_unit": int(cost.max()) / n}
    extra["blocks"] = int(b.score.numel())
    if uniform:
        kept: dict[str, int] = {}
        for i, g in enumerate(flat.order):
            kept.setdefault(g.kind, int(alive[flat.gidx == i].sum()))
        extra["uniform_kept"] = kept
    return alive, extra


def _local_blocks(b: Blocks, total: int, prunable: int, cfg: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """Local scope over blocks: each group loses its lowest blocks up to ``r * n`` units (rounded as above)."""
    raw = cfg.local_ratio_mode == "per_module_raw" or cfg.budget == "units"
    r = min(cfg.target_ratio if raw else cfg.target_ratio * total / prunable, 1.0)
    alive = torch.ones(b.score.numel(), dtype=torch.bool)
    carry: dict[str, float] = {}
    capped = False
    first = 0
    for g, bs in zip(b.groups, b.sizes):
        n = sum(bs)
        unit_group = replace(g, n_units=n)
        if cfg.local_rounding == "carry":
            want = r * n + carry.get(g.kind, 0.0)
        else:  # floor / llm_pruner: their own count of units, then down to a block boundary
            want = float(local_count(unit_group, r, cfg.local_rounding, {}))
        cap = min(math.floor(cfg.max_group_prune_ratio * n + 1e-9), n - cfg.min_units_per_group)
        n_blocks, removed = 0, 0
        for size in bs:
            if removed + size > want + 1e-9:
                break
            removed += size
            n_blocks += 1
        carry[g.kind] = want - removed
        while removed > cap:
            capped = True
            n_blocks -= 1
            removed -= bs[n_blocks]
        alive[first: first + n_blocks] = False
        first += len(bs)
    dead = ~alive
    if cfg.budget == "units":
        reached = int(b.count[dead].sum()) >= math.floor(r * int(b.count.sum()) + 1e-9)
    else:
        target = r * prunable / total if raw else cfg.target_ratio
        reached = int(b.ppu[dead].sum()) / total >= target - 1e-12
    return alive, {"steps": 1, "local_unit_ratio": r, "reached_target": reached,
                   "floors_hit": capped and not reached}
