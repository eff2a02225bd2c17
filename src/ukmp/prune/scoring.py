"""Calibration passes and the UKMP, random and magnitude methods (registered in :mod:`ukmp.prune.methods`).

A method turns a model plus calibration batches into per-unit scores (higher = more important) and may override
the allocation (scope, normalisation). UKMP is two passes: angle-entropy histograms (forward only, language units)
and selected-token first-order Taylor (forward + backward), combined as I = T x H for language units.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ukmp.config import PruneConfig
from ukmp.groups import PrunableGroup
from ukmp.models import forward_batch
from ukmp.prune.methods import DATA_FREE, METHODS, Batches, ScoreResult, get_method, is_data_free, register_method

log = logging.getLogger(__name__)


def _to(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.items():
        v = v.to(device)
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def _progress(it: Iterable, desc: str, total: int | None) -> Iterator:
    return iter(tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True))


def compute_context(device: torch.device, compute_dtype: torch.dtype | None):
    """Autocast to ``compute_dtype`` (matrix products in bf16/fp16, the model's weights and the fp32 gradient
    and histogram accumulators untouched); a no-op for ``None``."""
    if compute_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute_dtype)


def parse_compute_dtype(name: str) -> torch.dtype | None:
    """``prune.compute_dtype``: '' (the model's dtype) | bfloat16 | float16 (names as :data:`DTYPES`)."""
    from ukmp.models.build import DTYPES

    if name in ("", "model"):
        return None
    if DTYPES.get(name) not in (torch.bfloat16, torch.float16):
        raise ValueError(f"prune.compute_dtype: unknown value {name!r} (choose '', bfloat16 or float16)")
    return DTYPES[name]


def _padding_masks(hist, model: nn.Module, batch: dict[str, torch.Tensor], exclude_padding: bool):
    """The histograms' token masks for ``batch`` while the model runs (a no-op when padding is counted)."""
    if hist is None or not exclude_padding:
        return contextlib.nullcontext()
    from ukmp.models import adapter_for

    return hist.stream_masks(adapter_for(model).stream_masks(batch))


def _selected_backward(model: nn.Module, scorer, batches: Iterable[dict], threshold: float | None, desc: str,
                       total: int | None, compute_dtype: torch.dtype | None, hist=None,
                       exclude_padding: bool = False) -> dict[str, int]:
    """Forward every batch (feeding ``hist``'s hooks when given), back-propagate the selected-token loss into
    ``scorer``; returns the token counts."""
    from ukmp.importance.taylor import selected_loss

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    n_sel = n_valid = 0
    for batch in _progress(batches, desc, total):
        b = _to(batch, device, dtype)
        with _padding_masks(hist, model, b, exclude_padding), compute_context(device, compute_dtype):
            logits = forward_batch(model, b).logits
        loss, sel, valid = selected_loss(logits, b["labels"], threshold)
        scorer.backward(loss)
        n_sel += int(sel)
        n_valid += int(valid)
    return {"tokens_selected": n_sel, "tokens_total": n_valid}


@contextlib.contextmanager
def _vocabulary_skipped(model: nn.Module, histogrammed: Iterable[str]) -> Iterator[None]:
    """The entropy pass needs no logits: while open, the vocabulary projection (when it is a bias-free Linear that
    is not histogrammed) returns zeros of the logits' shape instead of its product."""
    from ukmp.importance.taylor import ForwardPatches, output_projection

    head = output_projection(model)
    patches = ForwardPatches()
    if head is not None and not any(model.get_submodule(n) is head for n in histogrammed):
        patches.install(head, lambda x: x.new_zeros(*x.shape[:-1], head.out_features))
    try:
        yield
    finally:
        patches.remove()


def entropy_pass(model: nn.Module, groups: list[PrunableGroup], batches: Iterable[dict], angle: bool = False,
                 exclude_padding: bool = True, total: int | None = None,
                 compute_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Per-unit angle entropy of the language groups (forward passes only, streaming histograms)."""
    from ukmp.importance.entropy import StreamingAngleHistogram, unit_entropies

    language = [g for g in groups if g.modality == "language"]
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    with StreamingAngleHistogram(model, language, angle=angle, exclude_padding=exclude_padding) as hist, \
            _vocabulary_skipped(model, hist.counts):
        with torch.no_grad(), compute_context(device, compute_dtype):
            for batch in _progress(batches, "entropy pass", total):
                b = _to(batch, device, dtype)
                with _padding_masks(hist, model, b, exclude_padding):
                    forward_batch(model, b)
        neuron = hist.entropy()
    return unit_entropies(neuron, language)


def taylor_pass(model: nn.Module, groups: list[PrunableGroup], batches: Iterable[dict], threshold: float | None,
                order: str = "first", total: int | None = None, compute_dtype: torch.dtype | None = None,
                ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Per-unit Taylor scores with the selected-token loss; gradients summed over samples in fp32."""
    from ukmp.importance.taylor import TaylorScorer, row_sparse_head

    with TaylorScorer(model, groups, order=order) as scorer, row_sparse_head(model):
        stats = _selected_backward(model, scorer, batches, threshold, "taylor pass", total, compute_dtype)
        return scorer.scores(), stats


def fused_pass(model: nn.Module, groups: list[PrunableGroup], batches: Iterable[dict], threshold: float | None,
               order: str = "first", angle: bool = False, exclude_padding: bool = True, total: int | None = None,
               compute_dtype: torch.dtype | None = None):
    """Both UKMP passes over one stream of batches: the entropy hooks read the activations of the Taylor forward.

    Equal to the two separate passes when both see the same inputs (augmentation off, or the same epoch); saves one
    forward per sample."""
    from ukmp.importance.entropy import StreamingAngleHistogram, unit_entropies
    from ukmp.importance.taylor import TaylorScorer, row_sparse_head

    language = [g for g in groups if g.modality == "language"]
    with StreamingAngleHistogram(model, language, angle=angle, exclude_padding=exclude_padding) as hist, \
            TaylorScorer(model, groups, order=order) as scorer, row_sparse_head(model):
        stats = _selected_backward(model, scorer, batches, threshold, "fused pass", total, compute_dtype, hist,
                                   exclude_padding)
        return scorer.scores(), unit_entropies(hist.entropy(), language), stats


# ---------------------------------------------------------------------------------------------------- methods
def score_ukmp(model, groups, batches: Batches, pc: PruneConfig, n_batches: int) -> ScoreResult:
    from ukmp.prune.allocate import combine

    threshold = 1.0 if pc.taylor == "first_no_threshold" else pc.threshold
    order = "first" if pc.taylor == "first_no_threshold" else pc.taylor
    entropy = None
    cdt = parse_compute_dtype(pc.compute_dtype)
    if pc.fused_passes and pc.entropy != "none":
        taylor, entropy, stats = fused_pass(model, groups, batches(1), threshold, order=order,
                                            angle=pc.entropy == "arccos", exclude_padding=pc.entropy_exclude_padding,
                                            total=n_batches, compute_dtype=cdt)
    else:
        if pc.entropy != "none":
            entropy = entropy_pass(model, groups, batches(0), angle=pc.entropy == "arccos",
                                   exclude_padding=pc.entropy_exclude_padding, total=n_batches, compute_dtype=cdt)
        taylor, stats = taylor_pass(model, groups, batches(1), threshold, order=order, total=n_batches,
                                    compute_dtype=cdt)
    combined = combine(taylor, entropy, groups, mode="product" if entropy is not None else "taylor_only")
    parts = {"taylor": taylor, "combined": combined}
    if entropy is not None:
        parts["entropy"] = entropy
    return ScoreResult(combined, parts, stats)


def score_random(model, groups, batches: Batches, pc: PruneConfig, n_batches: int) -> ScoreResult:
    g = torch.Generator().manual_seed(pc.num_samples * 7 + 13)
    scores = {gr.id: torch.rand(gr.n_units, generator=g, dtype=torch.float64).float() for gr in groups}
    return ScoreResult(scores, {"random": scores}, {}, {"normalization": "none"})


def score_magnitude(model, groups, batches: Batches, pc: PruneConfig, n_batches: int) -> ScoreResult:
    """Mean |w| per weight of each unit (data-free); ranked per modality-normalised like UKMP unless overridden."""
    from ukmp.importance.taylor import unit_reduce

    per_weight = {}
    for gr in groups:
        for s in gr.slices:
            if s.param == "weight" and s.name not in per_weight:
                per_weight[s.name] = model.get_parameter(s.name).detach().float().abs()
    scores = {gr.id: unit_reduce(per_weight, gr).cpu() for gr in groups}
    return ScoreResult(scores, {"magnitude": scores})


def register_builtin() -> None:
    """Register UKMP, random and magnitude (idempotent; also the ``ukmp.methods`` entry point ``ukmp``)."""
    for name, fn, data_free in (("ukmp", score_ukmp, False), ("random", score_random, True),
                                ("magnitude", score_magnitude, True)):
        if name not in METHODS:
            register_method(name, fn, data_free=data_free)


register_builtin()

__all__ = ["DATA_FREE", "METHODS", "Batches", "ScoreResult", "entropy_pass", "fused_pass", "get_method",
           "is_data_free", "register_builtin", "register_method", "taylor_pass"]
