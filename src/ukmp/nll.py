"""Per-token negative log-likelihood with the classes last: the one cross-entropy of the calibration losses and of
perplexity.

``F.cross_entropy`` accepts the logits as ``[B, V, T]`` (classes second) or as ``[N, V]`` (classes last). Both give
the same number in exact arithmetic, but on CPU the ``[B, V, T]`` layout reduces over a strided vocabulary axis and
loses accuracy: against a float64 reference its per-token error reaches ~1e-4 on a 49k vocabulary, biased low,
where the ``[N, V]`` rows stay at fp32 rounding (tests/core/test_nll.py measures both). Every loss over a vocabulary
in ukmp therefore flattens the positions into rows first, here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_nll(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``-log softmax(logits)[target]`` per position, shaped like ``targets`` (``logits``: ``[*targets.shape, V]``).

    Computed in fp32 at least (bf16/fp16 logits are promoted, fp64 stays fp64) on ``[N, V]`` rows; positions whose
    target is ``ignore_index`` are 0."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"token_nll: logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)} + [V]")
    rows = logits.reshape(-1, logits.shape[-1])
    rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
    nll = F.cross_entropy(rows, targets.reshape(-1).to(rows.device), ignore_index=ignore_index, reduction="none")
    return nll.view(targets.shape)
