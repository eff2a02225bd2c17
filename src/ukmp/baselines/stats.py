"""Per-input-channel activation statistics of Linear layers (FLAP fluctuation, Wanda input norms).

:class:`InputStats` hooks the **input** of the named Linears (forward pre-hooks) and keeps, per input channel, an
fp32 running count, mean and sum of squared deviations (Chan/Welford merge of each batch), plus the mean square.
Padded tokens are excluded: ViT tokens are all valid, T5 encoder tokens use ``attention_mask`` and T5 decoder tokens
(self-attention, cross-attention queries and ``o``, FFN) use ``decoder_attention_mask``; the cross-attention ``k``/``v``
read the encoder output and use ``attention_mask``.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from ukmp.baselines.primitives import to_device


def token_mask_key(module_path: str) -> str | None:
    """Which batch mask marks the valid tokens at a module's input (``None``: every token is valid)."""
    if module_path.startswith("language_model.encoder"):
        return "attention_mask"
    if module_path.startswith("language_model.decoder"):
        if module_path.endswith(("EncDecAttention.k", "EncDecAttention.v")):  # they read the encoder output
            return "attention_mask"
        return "decoder_attention_mask"
    return None


class RunningMoments:
    """fp32 count / mean / M2 / sum of squares per channel, merged batch by batch (exact, order independent)."""

    def __init__(self, width: int, device: torch.device):
        self.n = 0
        self.mean = torch.zeros(width, dtype=torch.float32, device=device)
        self.m2 = torch.zeros(width, dtype=torch.float32, device=device)
        self.sq = torch.zeros(width, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        """``x``: [tokens, width] (valid tokens only)."""
        x = x.detach().float()
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(0)
        m2b = ((x - mb) ** 2).sum(0)
        n = self.n + nb
        delta = mb - self.mean
        self.mean += delta * (nb / n)
        self.m2 += m2b + delta * delta * (self.n * nb / n)
        self.sq += (x * x).sum(0)
        self.n = n

    def variance(self) -> torch.Tensor:
        """Unbiased token variance (σ², FLAP's fluctuation)."""
        return self.m2 / max(self.n - 1, 1)

    def mean_square(self) -> torch.Tensor:
        return self.sq / max(self.n, 1)


class InputStats:
    """Context manager: ``with InputStats(model, paths) as st: st.run(batches)``; then ``st.moments[path]``."""

    def __init__(self, model: nn.Module, paths: Sequence[str]):
        self.model = model
        self.paths = list(dict.fromkeys(paths))
        self.moments: dict[str, RunningMoments] = {}
        self._masks: Mapping[str, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, path: str):
        key = token_mask_key(path)

        def pre(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            flat = x.reshape(-1, x.shape[-1])
            if key is not None and key in self._masks:
                m = self._masks[key]
                if tuple(m.shape) != tuple(x.shape[:-1]):
                    raise ValueError(f"{path}: token mask {key} has shape {tuple(m.shape)}, input {tuple(x.shape)}")
                flat = flat[m.reshape(-1).bool()]
            if path not in self.moments:
                self.moments[path] = RunningMoments(x.shape[-1], x.device)
            self.moments[path].add(flat)

        return pre

    def __enter__(self) -> "InputStats":
        for p in self.paths:
            self._handles.append(self.model.get_submodule(p).register_forward_pre_hook(self._hook(p)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.no_grad()
    def run(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> int:
        """Forward every batch (no grad); returns the number of batches."""
        n = 0
        for batch in batches:
            b = to_device(batch, self.model)
            self._masks = {k: b[k] for k in ("attention_mask", "decoder_attention_mask") if k in b}
            self.model(**b)
            n += 1
        self._masks = {}
        return n


def collect_input_stats(model: nn.Module, paths: Sequence[str],
                        batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, RunningMoments]:
    with InputStats(model, paths) as st:
        st.run(batches)
    missing = [p for p in st.paths if p not in st.moments]
    if missing:
        raise ValueError(f"calibration: no input reached {missing[0]} (empty batches?)")
    return st.moments
