"""The structural vocabulary: prunable groups and the parameter slices that make up one unit.

A *unit* is the smallest thing that is removed: one attention head or one MLP channel. A *group* is the set of
units that compete inside one module (the 16 heads of one ViT attention, the 5120 channels of one T5 FFN). Every
unit of a group owns the same pattern of weights, described by :class:`ParamSlice` entries: unit ``u`` owns indices
``offset + u * unit_size ... offset + (u + 1) * unit_size - 1`` along ``dim`` of the named parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

UnitType = Literal["heads", "channels"]
Modality = Literal["vision", "language", "bridge"]


@dataclass(frozen=True)
class ParamSlice:
    """Unit ``u`` of a group owns ``offset + u*unit_size + arange(unit_size)`` along ``dim`` of ``module.param``."""

    module: str  # dotted path of an nn.Linear inside the model
    param: Literal["weight", "bias"]
    dim: int  # 0 = output rows, 1 = input columns (bias: always 0)
    unit_size: int
    offset: int = 0

    @property
    def name(self) -> str:
        return f"{self.module}.{self.param}"

    def indices(self, units: torch.Tensor) -> torch.Tensor:
        """Flat indices along ``dim`` owned by ``units`` (a 1-D long tensor), in unit order."""
        base = self.offset + units[:, None] * self.unit_size
        return (base + torch.arange(self.unit_size, device=units.device)[None, :]).reshape(-1)


@dataclass(frozen=True)
class PrunableGroup:
    """One set of competing units, e.g. the heads of ``vision.layers.7.attn``."""

    id: str
    kind: str  # e.g. "vit_heads", "enc_ffn"; stable names used in reports and scoring
    unit_type: UnitType
    modality: Modality
    layer: int
    n_units: int
    params_per_unit: int  # weights + biases removed with one unit
    slices: tuple[ParamSlice, ...] = field(default=())

    @property
    def total_params(self) -> int:
        return self.n_units * self.params_per_unit

    def linear_modules(self) -> list[str]:
        """Distinct Linear paths touched by this group, in slice order."""
        seen: list[str] = []
        for s in self.slices:
            if s.module not in seen:
                seen.append(s.module)
        return seen


def groups_by_id(groups: list[PrunableGroup]) -> dict[str, PrunableGroup]:
    out: dict[str, PrunableGroup] = {}
    for g in groups:
        if g.id in out:
            raise ValueError(f"duplicate group id {g.id!r}")
        out[g.id] = g
    return out


def group_kinds(groups: list[PrunableGroup]) -> list[str]:
    """The groups' kinds in order of first appearance (vision before language, attention before MLP)."""
    return list(dict.fromkeys(g.kind for g in groups))
