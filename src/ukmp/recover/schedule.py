"""Table A of UKMP as data: the seven sub-stages of progressive distillation, and forward hooks for block features.

Supervised layers come from the model's adapter (:meth:`ModelAdapter.feature_blocks`), so that the full-size
BLIP-2 FlanT5-XL (39 ViT blocks, 24+24 T5 blocks) reproduces Table A exactly:

* ViT (family ``vision``): even blocks ``0, 2, …``; sub-stage 1 supervises the first 3/5 of them (0..22 of 0..38),
  sub-stage 2 all.
* T5 encoder / decoder (families ``encoder`` / ``decoder``): odd blocks ``1, 3, …``; the first half (1..11) joins in
  sub-stage 3 / 5, the second half (13..23) in sub-stage 4 / 6.
* A decoder-only LM (Llama family, OPT) has no encoder: its odd blocks are split in two, the first half takes the
  ``encoder`` role and the second half the ``decoder`` role (a 30-layer SmolLM2: blocks 1..15 and 17..29), each
  again halved over the two sub-stages of its role (1..7 / 9..15 in 3 / 4, 17..23 / 25..29 in 5 / 6). A model
  without a vision tower (a plain LM) supervises nothing in sub-stages 1-2.
* Sub-stage 7 (τ3): CE + KL on the logits, no MSE.

Sample counts 20K, 20K, 80K, 40K, 80K, 80K and "the rest" are scaled by ``ScheduleConfig.sample_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import nn


MODES = ("progressive", "mse_kl_task_all", "kl_task", "task", "no_progressive")
BASE_SAMPLES = (20_000, 20_000, 80_000, 40_000, 80_000, 80_000)  # sub-stages 1..6; 7 takes the rest
VIT_FIRST_FRACTION = Fraction(12, 20)  # sub-stage 1: 12 of the 20 even ViT blocks of the 39-block ViT
FAMILIES = ("vision", "encoder", "decoder")


@dataclass(frozen=True)
class ScheduleConfig:
    mode: str = "progressive"
    sample_scale: float = 1.0  # multiplies every count of Table A
    total_samples: int | None = None  # when set, sub-stage 7 gets total - (sum of 1..6); else the loader's rest

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"schedule.mode: unknown value {self.mode!r} (choose from {list(MODES)})")
        if not self.sample_scale > 0:
            raise ValueError(f"schedule.sample_scale: must be positive, got {self.sample_scale}")


@dataclass(frozen=True)
class Stage:
    index: int  # 0-based sub-stage index (Table A's sub-stage = index + 1)
    phase: str  # "tau1" / "tau2" / "tau3"
    mse_layers: dict[str, tuple[int, ...]] = field(default_factory=dict)  # family -> supervised block indices
    use_task: bool = False
    use_kl: bool = False
    n_samples: int | None = None  # None: the rest of the data
    sample_offset: int = 0  # start of this sub-stage's disjoint slice of the shuffled data

    def tapped_layers(self) -> dict[str, tuple[int, ...]]:
        return {k: v for k, v in self.mse_layers.items() if v}

    @property
    def has_loss(self) -> bool:
        """False for a sub-stage with nothing to learn from (the vision sub-stages of a model without a vision
        tower): such a sub-stage is skipped and gets no samples."""
        return bool(self.tapped_layers()) or self.use_task or self.use_kl


def _blocks(config) -> dict[str, list]:
    from ukmp.models import adapter_for

    out: dict[str, list] = {f: [] for f in FAMILIES}
    for b in adapter_for(config).feature_blocks():
        out[b.family].append(b)
    return out


def supervised_layers(config) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """family -> (first group, second group) of supervised blocks, from the model adapter's feature blocks."""
    out = {}
    for fam, blocks in _blocks(config).items():
        idx = tuple(b.index for b in blocks)
        if fam == "vision":
            k = max(1, int(len(idx) * VIT_FIRST_FRACTION + Fraction(1, 2))) if idx else 0
        else:
            k = (len(idx) + 1) // 2
        out[fam] = (idx[:k], idx[k:])
    return out


def build_schedule(config, cfg: ScheduleConfig = ScheduleConfig()) -> list[Stage]:
    """The seven sub-stages for ``config`` under the chosen loss ``mode``."""
    sup = supervised_layers(config)
    v1, v2 = sup["vision"]
    e1, e2 = sup["encoder"]
    d1, d2 = sup["decoder"]
    cumulative = [
        {"vision": v1},
        {"vision": v1 + v2},
        {"vision": v1 + v2, "encoder": e1},
        {"vision": v1 + v2, "encoder": e1 + e2},
        {"vision": v1 + v2, "encoder": e1 + e2, "decoder": d1},
        {"vision": v1 + v2, "encoder": e1 + e2, "decoder": d1 + d2},
    ]
    every = {"vision": v1 + v2, "encoder": e1 + e2, "decoder": d1 + d2}
    counts = [int(round(n * cfg.sample_scale)) for n in BASE_SAMPLES]
    rest = None if cfg.total_samples is None else max(0, int(cfg.total_samples) - sum(counts))
    offsets = [sum(counts[:i]) for i in range(7)]
    phases = ["tau1", "tau1", "tau2", "tau2", "tau2", "tau2", "tau3"]
    stages = []
    for i in range(7):
        n = counts[i] if i < 6 else rest
        if cfg.mode == "progressive":
            mse, task, kl = (cumulative[i], False, False) if i < 6 else ({}, True, True)
        elif cfg.mode == "no_progressive":
            mse, task, kl = (every, False, False) if i < 6 else ({}, True, True)
        elif cfg.mode == "mse_kl_task_all":
            mse, task, kl = (cumulative[i] if i < 6 else every), True, True
        elif cfg.mode == "kl_task":
            mse, task, kl = {}, True, True
        else:  # "task"
            mse, task, kl = {}, True, False
        stages.append(Stage(i, phases[i], dict(mse), task, kl, n, offsets[i]))
    return stages


def _stacks(model: nn.Module) -> dict[str, str]:
    """{family: stack path} from the model's adapter (block ``i`` of a family is ``f"{path}.{i}"``)."""
    from ukmp.models import adapter_for

    return adapter_for(model).family_stacks()


class FeatureTaps:
    """Forward hooks storing each requested block's output hidden state (element [0] of a tuple output).

    ``feats`` maps ``"{family}.{i}"`` to the latest output; use as a context manager or call :meth:`remove`.
    """

    def __init__(self, model: nn.Module, layers: dict[str, tuple[int, ...] | list[int]]):
        self.feats: dict[str, torch.Tensor] = {}
        self._handles = []
        stacks = _stacks(model) if any(layers.values()) else {}
        for family, idx in layers.items():
            if family not in FAMILIES:
                raise ValueError(f"layers: unknown feature family {family!r} (choose from {list(FAMILIES)})")
            for i in idx:
                if family not in stacks:
                    raise ValueError(f"layers: the model has no {family!r} blocks")
                mod = model.get_submodule(f"{stacks[family]}.{int(i)}")
                self._handles.append(mod.register_forward_hook(self._hook(f"{family}.{int(i)}")))

    def _hook(self, key: str):
        def fn(_module: nn.Module, _inputs, output) -> None:
            self.feats[key] = output if isinstance(output, torch.Tensor) else output[0]

        return fn

    def clear(self) -> None:
        self.feats = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.feats = {}

    def __enter__(self) -> "FeatureTaps":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
