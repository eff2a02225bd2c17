"""PruningPlan: a versioned, JSON-serialisable map from group id to the kept unit indices.

Indices always refer to the *original* (dense) numbering of a group's units, so a plan can be applied to a fresh
dense model, replayed, diffed and reloaded. Groups absent from ``keep`` are kept whole.

Version 2 adds ``drop_layers``: ``{stack id: {"keep": n, "params": p}}`` — the stack (a part's group-id prefix such
as ``vision``) keeps its first ``n`` layers and loses the rest outright (``p`` parameters): layers whose output never
reaches the model's output (LLaVA's vision layers after ``vision_feature_layer``). Version 1 plans read as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ukmp.groups import PrunableGroup, groups_by_id

PLAN_FORMAT = "ukmp.pruning_plan"
PLAN_VERSION = 1  # written for plans without drop_layers, so their files stay readable by earlier ukmp
DROP_LAYERS_VERSION = 2  # written for plans with drop_layers
READABLE_VERSIONS = (1, 2)


class PlanError(ValueError):
    """A plan that cannot be applied; the message is one line naming the group or field."""


@dataclass
class PruningPlan:
    keep: dict[str, list[int]]
    units: dict[str, int] = field(default_factory=dict)  # dense unit count per listed group (consistency check)
    meta: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION
    out_bias: list[str] = field(default_factory=list)  # Linear paths that gain an output bias (FLAP compensation)
    drop_layers: dict[str, dict[str, int]] = field(default_factory=dict)  # stack id -> {"keep": n, "params": p}

    # ------------------------------------------------------------------ construction
    @classmethod
    def keep_all(cls, groups: list[PrunableGroup], **meta: Any) -> "PruningPlan":
        return cls(
            keep={g.id: list(range(g.n_units)) for g in groups},
            units={g.id: g.n_units for g in groups},
            meta=dict(meta),
        )

    @classmethod
    def from_masks(cls, groups: list[PrunableGroup], masks: dict[str, Any], **meta: Any) -> "PruningPlan":
        """Build from boolean keep-masks (tensors or lists) indexed by group id."""
        by_id = groups_by_id(groups)
        keep = {}
        for gid, m in masks.items():
            if gid not in by_id:
                raise PlanError(f"plan: unknown group {gid!r}")
            keep[gid] = [i for i, k in enumerate(list(m)) if bool(k)]
        return cls(keep=keep, units={gid: by_id[gid].n_units for gid in keep}, meta=dict(meta))

    # ------------------------------------------------------------------ queries
    def kept(self, group: PrunableGroup) -> list[int]:
        return list(self.keep.get(group.id, range(group.n_units)))

    def is_pruned(self, group: PrunableGroup) -> bool:
        return len(self.kept(group)) < group.n_units

    def removed(self, group: PrunableGroup) -> list[int]:
        k = set(self.kept(group))
        return [i for i in range(group.n_units) if i not in k]

    def removed_params(self, groups: list[PrunableGroup]) -> int:
        """Parameters of the removed units (the layers of ``drop_layers`` are counted by :meth:`dropped_params`)."""
        return sum(len(self.removed(g)) * g.params_per_unit for g in groups if g.id in self.keep)

    def dropped_params(self) -> int:
        """Parameters of the layers that ``drop_layers`` removes outright."""
        return sum(int(d["params"]) for d in self.drop_layers.values())

    def digest(self) -> str:
        """Stable hash of the structural content (not of ``meta``)."""
        content: dict[str, Any] = {"keep": self.keep, "units": self.units}
        if self.out_bias:
            content["out_bias"] = sorted(self.out_bias)
        if self.drop_layers:
            content["drop_layers"] = self.drop_layers
        blob = json.dumps(content, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # ------------------------------------------------------------------ validation
    def validate(self, groups: list[PrunableGroup]) -> None:
        """Raise :class:`PlanError` (one line, naming the group/index) unless the plan fits ``groups``."""
        if self.version not in READABLE_VERSIONS:
            raise PlanError(f"plan: unsupported version {self.version!r} (expected one of {READABLE_VERSIONS})")
        for sid, d in self.drop_layers.items():
            if not isinstance(d, dict) or set(d) != {"keep", "params"} or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in d.values()) or d["keep"] < 1:
                raise PlanError(f"plan: drop_layers[{sid!r}] must be {{'keep': n >= 1, 'params': p >= 0}}, got {d!r}")
        by_id = groups_by_id(groups)
        outputs = {s.module for g in groups for s in g.slices if s.dim == 1 and s.param == "weight"}
        for m in self.out_bias:
            if m not in outputs:
                raise PlanError(f"plan: out_bias module {m!r} is not an output projection of a prunable group")
        for gid, idx in self.keep.items():
            if gid not in by_id:
                raise PlanError(f"plan: unknown group {gid!r}")
            g = by_id[gid]
            if gid in self.units and int(self.units[gid]) != g.n_units:
                raise PlanError(
                    f"plan: group {gid!r} has {self.units[gid]} units in the plan but {g.n_units} in the model"
                )
            if not isinstance(idx, (list, tuple)):
                raise PlanError(f"plan: group {gid!r}: kept indices must be a list")
            if len(idx) == 0:
                raise PlanError(f"plan: group {gid!r} keeps nothing (at least one unit must remain)")
            seen: set[int] = set()
            for i in idx:
                if isinstance(i, bool) or not isinstance(i, int):
                    raise PlanError(f"plan: group {gid!r}: index {i!r} is not an integer")
                if not 0 <= i < g.n_units:
                    raise PlanError(f"plan: group {gid!r}: index {i} out of range [0, {g.n_units})")
                if i in seen:
                    raise PlanError(f"plan: group {gid!r}: duplicate index {i}")
                seen.add(i)

    def check_model(self, total_params: int, model_type: str | None = None, source: str = "plan") -> None:
        """Raise :class:`PlanError` when the plan records a model of another size than ``total_params`` (the dense
        model's parameters; the plan's ``meta.total_params`` counts the scored model, after ``drop_layers``): group
        ids alone do not tell BLIP-2 from InstructBLIP. Plans without the field (hand-written) are not checked."""
        recorded = self.meta.get("total_params")
        if recorded is None:
            return
        planned = int(recorded) + self.dropped_params()
        if planned != int(total_params):
            kind = self.meta.get("model_type")
            made = f"{planned:,} parameters" + (f" ({kind})" if kind else "")
            this = f"{int(total_params):,}" + (f" ({model_type})" if model_type else "")
            raise PlanError(f"{source}: the plan was made for a model of {made}, this model has {this}; "
                            "make a plan for this model (ukmp prune CONFIG, then ukmp plan --scores)")

    def normalized(self) -> "PruningPlan":
        """Same plan with sorted indices (slicing keeps units in original order)."""
        return PruningPlan(
            keep={k: sorted(v) for k, v in self.keep.items()}, units=dict(self.units), meta=dict(self.meta),
            version=self.version, out_bias=list(self.out_bias), drop_layers=dict(self.drop_layers),
        )

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": DROP_LAYERS_VERSION if self.drop_layers else self.version,
            "units": dict(self.units),
            "keep": {k: list(v) for k, v in self.keep.items()},
            "out_bias": list(self.out_bias),
            **({"drop_layers": self.drop_layers} if self.drop_layers else {}),
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "plan") -> "PruningPlan":
        if not isinstance(d, dict):
            raise PlanError(f"{source}: top level must be a JSON object")
        if d.get("format") != PLAN_FORMAT:
            raise PlanError(f"{source}: field 'format' must be {PLAN_FORMAT!r}, got {d.get('format')!r}")
        for key in ("version", "keep"):
            if key not in d:
                raise PlanError(f"{source}: missing field {key!r}")
        if d.get("drop_layers") and d["version"] != DROP_LAYERS_VERSION:
            raise PlanError(f"{source}: field 'drop_layers' needs version {DROP_LAYERS_VERSION}, got {d['version']!r}")
        if not isinstance(d["keep"], dict):
            raise PlanError(f"{source}: field 'keep' must be an object of group id -> index list")
        return cls(
            keep={str(k): list(v) if isinstance(v, (list, tuple)) else v for k, v in d["keep"].items()},
            units={str(k): int(v) for k, v in d.get("units", {}).items()},
            meta=dict(d.get("meta", {})),
            version=d["version"],
            out_bias=[str(m) for m in d.get("out_bias", [])],
            drop_layers={str(k): dict(v) if isinstance(v, dict) else v for k, v in d.get("drop_layers", {}).items()},
        )

    def save(self, path: str | os.PathLike) -> None:
        from ukmp.files import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1, sort_keys=False))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PruningPlan":
        from ukmp.files import read_json_file

        p = Path(path)
        return cls.from_dict(read_json_file(p, "plan file", PlanError), source=str(p))
