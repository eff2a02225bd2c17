"""Per-input-channel activation statistics of Linear layers (FLAP fluctuation, Wanda input norms).

:class:`InputStats` hooks the **input** of the named Linears (forward pre-hooks) and keeps, per input channel, an
fp32 running count, mean and sum of squared deviations (Chan/Welford merge of each batch), plus the mean square.
Padded tokens are excluded: each Linear reads one token stream of the model's adapter (ViT tokens are all valid;
T5 encoder tokens use ``attention_mask`` and T5 decoder tokens ``decoder_attention_mask``, the cross-attention ``k``/``v``
reading the encoder output; a decoder-only LM's tokens use ``attention_mask``).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from ukmp.baselines.primitives import to_device


def token_mask_key(module_path: str, model: nn.Module | None = None) -> str | None:
    """The token stream a module's input belongs to (its key in the adapter's ``stream_masks``); ``None`` for a
    module outside the prunable groups. Without ``model`` the tiny BLIP-2 T5 structure is assumed."""
    from ukmp.models import adapter_for
    from ukmp.models.build import load_config

    config = model.config if model is not None else load_config("tiny")
    stream = adapter_for(config).streams().get(module_path)
    if model is not None:
        return stream
    return {"encoder": "attention_mask", "decoder": "decoder_attention_mask"}.get(stream)  # the T5 batch keys


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
        from ukmp.models import adapter_for

        self.adapter = adapter_for(model)
        self.streams = self.adapter.streams()
        self._masks: Mapping[str, torch.Tensor | None] = {}
        self._handles: list = []

    def _hook(self, path: str):
        key = self.streams.get(path)

        def pre(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            flat = x.reshape(-1, x.shape[-1])
            m = self._masks.get(key) if key is not None else None
            if m is not None:
                flat_ok = x.dim() == 2 and m.numel() == x.shape[0]  # a stack that flattens tokens (OPT's MLP)
                if tuple(m.shape) != tuple(x.shape[:-1]) and not flat_ok:
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
            from ukmp.models import forward_batch

            b = to_device(batch, self.model)
            self._masks = self.adapter.stream_masks(b)
            forward_batch(self.model, b)
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
