"""Weight-recalling LoRA (UKMP Eq. 12) for pruned Linears, plus injection, merging and adapter (de)serialisation.

A pruned Linear kept ``W^r`` (``d_out x d_in``). What pruning cut away is recalled, frozen, as

* ``p_out``: removed output rows restricted to the kept inputs (``[n_removed_rows, d_in]``), when rows were cut;
* ``p_in``: removed input columns restricted to the kept outputs (``[d_out, n_removed_cols]``), when columns were cut.

The forward pass is ``y = W^r x + b + s·B1 A1 drop(x) + s·B2 A2 (p_out x) + s·p_in (B3 A3 x)`` with ``s = alpha / r``;
every ``A`` is Kaiming-uniform(a=√5), every ``B`` zero, so a fresh layer reproduces the pruned one exactly.
:meth:`WRLoRALinear.merge` folds the three branches into one plain ``nn.Linear`` of the pruned shape.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from ukmp.models.base import RemovedSlice, RemovedWeights

# (parameter name, branch) of every trainable factor; the names are the keys of adapter state dicts
FACTORS = ("lora_A", "lora_B", "recall_out_A", "recall_out_B", "recall_in_A", "recall_in_B")


def _new_factor(rows: int, cols: int, device: torch.device, dtype: torch.dtype, kaiming: bool) -> nn.Parameter:
    t = torch.empty(rows, cols, device=device, dtype=dtype)
    if kaiming:
        nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    else:
        nn.init.zeros_(t)
    return nn.Parameter(t)


class WRLoRALinear(nn.Module):
    """A frozen pruned ``nn.Linear`` (``base_layer``) with a standard LoRA branch and up to two recall branches."""

    def __init__(
        self,
        base_layer: nn.Linear,
        p_out: torch.Tensor | None = None,
        p_in: torch.Tensor | None = None,
        r: int = 8,
        r_recall: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.05,
        factor_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"base_layer: expected nn.Linear, got {type(base_layer).__name__}")
        if r <= 0 or r_recall <= 0:
            raise ValueError(f"r / r_recall: ranks must be positive (got {r}, {r_recall})")
        d_out, d_in = base_layer.out_features, base_layer.in_features
        if p_out is not None and (p_out.dim() != 2 or p_out.shape[1] != d_in or p_out.shape[0] == 0):
            raise ValueError(f"p_out: expected shape [n_removed_rows>0, {d_in}], got {tuple(p_out.shape)}")
        if p_in is not None and (p_in.dim() != 2 or p_in.shape[0] != d_out or p_in.shape[1] == 0):
            raise ValueError(f"p_in: expected shape [{d_out}, n_removed_cols>0], got {tuple(p_in.shape)}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.r, self.r_recall, self.alpha = r, r_recall, float(alpha)
        self.scaling = float(alpha) / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev = base_layer.weight.device
        self.lora_A = _new_factor(r, d_in, dev, factor_dtype, kaiming=True)
        self.lora_B = _new_factor(d_out, r, dev, factor_dtype, kaiming=False)
        for name in FACTORS[2:]:
            self.register_parameter(name, None)
        self.register_buffer("p_out", None if p_out is None else p_out.detach().to(dev).clone(), persistent=False)
        self.register_buffer("p_in", None if p_in is None else p_in.detach().to(dev).clone(), persistent=False)
        if p_out is not None:
            self.recall_out_A = _new_factor(r_recall, p_out.shape[0], dev, factor_dtype, kaiming=True)
            self.recall_out_B = _new_factor(d_out, r_recall, dev, factor_dtype, kaiming=False)
        if p_in is not None:
            self.recall_in_A = _new_factor(r_recall, d_in, dev, factor_dtype, kaiming=True)
            self.recall_in_B = _new_factor(p_in.shape[1], r_recall, dev, factor_dtype, kaiming=False)

    @classmethod
    def from_removed(
        cls,
        base: nn.Linear,
        removed_slice: "RemovedSlice | None",
        r: int = 8,
        r_recall: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.05,
    ) -> "WRLoRALinear":
        """Wrap ``base`` with the recall branch matching what ``apply_`` cut from it (rows -> p_out, cols -> p_in)."""
        p_out = p_in = None
        if removed_slice is not None and removed_slice.weight.numel() > 0:
            if removed_slice.dim == 0:
                p_out = removed_slice.weight
            elif removed_slice.dim == 1:
                p_in = removed_slice.weight
            else:
                raise ValueError(f"removed_slice.dim: must be 0 or 1 for {removed_slice.module}, "
                                 f"got {removed_slice.dim}")
        return cls(base, p_out=p_out, p_in=p_in, r=r, r_recall=r_recall, alpha=alpha, dropout=dropout)

    # ---------------------------------------------------------------- attributes read by host modules
    @property
    def weight(self) -> torch.Tensor:  # e.g. T5DenseGatedActDense reads ``wo.weight.dtype``
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def factors(self) -> dict[str, nn.Parameter]:
        return {n: getattr(self, n) for n in FACTORS if getattr(self, n) is not None}

    # ---------------------------------------------------------------- math
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        fd = self.lora_A.dtype
        s = self.scaling
        delta = F.linear(F.linear(self.lora_dropout(x).to(fd), self.lora_A), self.lora_B)
        if self.p_out is not None:
            recalled = F.linear(x.to(self.p_out.dtype), self.p_out).to(fd)
            delta = delta + F.linear(F.linear(recalled, self.recall_out_A), self.recall_out_B)
        if self.p_in is not None:
            virtual = F.linear(F.linear(x.to(fd), self.recall_in_A), self.recall_in_B)
            delta = delta + F.linear(virtual.to(self.p_in.dtype), self.p_in).to(fd)
        return y + (s * delta).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``s·(B1A1 + B2A2 p_out + p_in B3A3)`` in fp32, shape ``[d_out, d_in]``."""
        f = torch.float32
        d = self.lora_B.to(f) @ self.lora_A.to(f)
        if self.p_out is not None:
            d = d + self.recall_out_B.to(f) @ (self.recall_out_A.to(f) @ self.p_out.to(f))
        if self.p_in is not None:
            d = d + (self.p_in.to(f) @ self.recall_in_B.to(f)) @ self.recall_in_A.to(f)
        return self.scaling * d

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` (base dtype and device) computing the same function as this layer in eval mode."""
        w = self.base_layer.weight
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        out.weight.copy_((w.to(torch.float32) + self.delta_weight()).to(w.dtype))
        if self.bias is not None:
            out.bias.copy_(self.bias)
        out.weight.requires_grad_(False)
        if out.bias is not None:
            out.bias.requires_grad_(False)
        return out

    def extra_repr(self) -> str:
        rec = [k for k, v in (("out", self.p_out), ("in", self.p_in)) if v is not None]
        return f"r={self.r}, r_recall={self.r_recall}, scaling={self.scaling}, recall={rec or 'none'}"


# -------------------------------------------------------------------------------------------- whole-model helpers
def _set_child(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _is_peft_lora(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a declared dependency
        return False
    return isinstance(module, LoraLayer)


def inject_wr_lora_(
    model: nn.Module,
    removed: "RemovedWeights | None",
    targets: list[str],
    r: int = 8,
    r_recall: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.05,
    plain_lora: bool = False,
) -> list[nn.Parameter]:
    """Wrap every target Linear, freeze everything else, return the trainable LoRA factors (in model order).

    ``plain_lora=True`` injects peft's standard LoRA on the same modules instead (the ablation without recall).
    """
    if not targets:
        raise ValueError("targets: empty list of LoRA target modules")
    for t in targets:
        try:
            mod = model.get_submodule(t)
        except AttributeError:
            raise ValueError(f"targets: module {t!r} not found in the model") from None
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"targets: {t!r} is a {type(mod).__name__}, not an nn.Linear")
    for p in model.parameters():
        p.requires_grad_(False)
    if plain_lora:
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
        inject_adapter_in_model(cfg, model)
    else:
        for t in targets:
            base = model.get_submodule(t)
            rs = removed.slices.get(t) if removed is not None else None
            _set_child(model, t, WRLoRALinear.from_removed(base, rs, r=r, r_recall=r_recall, alpha=alpha,
                                                            dropout=dropout))
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return params


def named_lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """LoRA factors only (WR-LoRA factors and peft ``lora_A``/``lora_B`` weights), keyed by their model names."""
    out: dict[str, nn.Parameter] = {}
    for path, mod in model.named_modules():
        if isinstance(mod, WRLoRALinear):
            for n, p in mod.factors().items():
                out[f"{path}.{n}" if path else n] = p
        elif _is_peft_lora(mod):
            for n, p in mod.named_parameters():
                if n.startswith(("lora_A.", "lora_B.")):
                    out[f"{path}.{n}"] = p
    return out


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(named_lora_parameters(model).values())


def merge_wr_lora_(model: nn.Module) -> nn.Module:
    """Replace every WRLoRALinear (and peft LoRA Linear) by its merged plain ``nn.Linear``; returns ``model``."""
    wr = [(p, m) for p, m in model.named_modules() if isinstance(m, WRLoRALinear)]
    for path, mod in wr:
        _set_child(model, path, mod.merge())
    peft_layers = [(p, m) for p, m in model.named_modules() if _is_peft_lora(m) and hasattr(m, "get_base_layer")]
    for path, mod in peft_layers:
        mod.merge()
        _set_child(model, path, mod.get_base_layer())
    return model


# -------------------------------------------------------------------------------------------- adapter weights
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the LoRA factors only (no base weights, no recalled slices)."""
    return {k: v.detach().cpu().clone() for k, v in named_lora_parameters(model).items()}


def load_adapter_state_dict_(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy factors into an injected model; keys and shapes must match exactly."""
    params = named_lora_parameters(model)
    missing = sorted(set(params) - set(sd))
    unexpected = sorted(set(sd) - set(params))
    if missing or unexpected:
        raise ValueError(f"adapter state dict: keys do not match the injected model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    with torch.no_grad():
        for k, p in params.items():
            if tuple(sd[k].shape) != tuple(p.shape):
                raise ValueError(f"adapter state dict: {k} has shape {tuple(sd[k].shape)}, expected {tuple(p.shape)}")
            p.copy_(sd[k].to(device=p.device, dtype=p.dtype))


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    from ukmp.io import atomic_save_tensors

    path = Path(path)
    atomic_save_tensors(path, adapter_state_dict(model), metadata={"format": "pt", "ukmp": "wr_lora_adapter"})
    return path


def load_adapter_(model: nn.Module, path: str | os.PathLike) -> None:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: adapter file not found")
    load_adapter_state_dict_(model, load_file(str(path)))
