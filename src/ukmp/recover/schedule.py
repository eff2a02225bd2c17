"""Table A of UKMP as data: the seven sub-stages of progressive distillation, and forward hooks for block features.

Supervised layers are derived from the model config so that the full-size BLIP-2 FlanT5-XL (39 ViT blocks, 24+24 T5
blocks) reproduces Table A exactly:

* ViT: even blocks ``0, 2, …``; sub-stage 1 supervises the first 3/5 of them (0..22 of 0..38), sub-stage 2 all.
* T5 encoder / decoder: odd blocks ``1, 3, …``; the first half (1..11) joins in sub-stage 3 / 5, the second half
  (13..23) in sub-stage 4 / 6.
* Sub-stage 7 (τ3): CE + KL on the logits, no MSE.

Sample counts 20K, 20K, 80K, 40K, 80K, 80K and "the rest" are scaled by ``ScheduleConfig.sample_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import nn

from ukmp.models.blip2 import T5_DEC, T5_ENC, VISION

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


def supervised_layers(config) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """family -> (first group, second group) of supervised blocks, derived from the model config."""
    n_vit = config.vision_config.num_hidden_layers
    tc = config.text_config
    n_enc = tc.num_layers
    n_dec = tc.num_decoder_layers if tc.num_decoder_layers is not None else tc.num_layers
    even = tuple(range(0, n_vit, 2))
    k = max(1, int(len(even) * VIT_FIRST_FRACTION + Fraction(1, 2)))
    out = {"vision": (even[:k], even[k:])}
    for fam, n in (("encoder", n_enc), ("decoder", n_dec)):
        odd = tuple(range(1, n, 2)) or (n - 1,)
        h = (len(odd) + 1) // 2
        out[fam] = (odd[:h], odd[h:])
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


def _block(model: nn.Module, family: str, i: int) -> nn.Module:
    prefix = {"vision": VISION, "encoder": T5_ENC, "decoder": T5_DEC}[family]
    return model.get_submodule(f"{prefix}.{i}")


class FeatureTaps:
    """Forward hooks storing each requested block's output hidden state (element [0] of a tuple output).

    ``feats`` maps ``"{family}.{i}"`` to the latest output; use as a context manager or call :meth:`remove`.
    """

    def __init__(self, model: nn.Module, layers: dict[str, tuple[int, ...] | list[int]]):
        self.feats: dict[str, torch.Tensor] = {}
        self._handles = []
        for family, idx in layers.items():
            if family not in FAMILIES:
                raise ValueError(f"layers: unknown feature family {family!r} (choose from {list(FAMILIES)})")
            for i in idx:
                mod = _block(model, family, int(i))
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
