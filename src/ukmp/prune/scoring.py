"""Calibration passes and the UKMP, random and magnitude methods (registered in :mod:`ukmp.prune.methods`).

A method turns a model plus calibration batches into per-unit scores (higher = more important) and may override
the allocation (scope, normalisation). UKMP is two passes: angle-entropy histograms (forward only, language units)
and selected-token first-order Taylor (forward + backward), combined as I = T x H for language units.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ukmp.config import PruneConfig
from ukmp.groups import PrunableGroup
from ukmp.models import forward_batch
from ukmp.prune.methods import METHODS, Batches, ScoreResult, get_method, is_data_free, register_method

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


BatchSource = Iterable[dict] | Callable[[], Iterable[dict]]  # one stream, or a maker of identical fresh streams


def _stream(batches: BatchSource, passes: int) -> Callable[[], Iterable[dict]]:
    if callable(batches):
        return batches
    if passes > 1:
        raise ValueError("score_passes > 1 needs a callable that makes the same calibration batches again")
    return lambda: batches


def _pass_parts(model: nn.Module, groups: list[PrunableGroup], passes: int) -> list[list[PrunableGroup]]:
    from ukmp.importance.taylor import partition_groups

    def weight_bytes(name: str) -> int:
        return model.get_parameter(name).numel() * 4  # fp32 accumulators

    return partition_groups(groups, passes, weight_bytes) if passes > 1 else [list(groups)]


def _score_parts(model: nn.Module, parts: list[list[PrunableGroup]], make: Callable[[], Iterable[dict]],
                 threshold: float | None, order: str, total: int | None, compute_dtype: torch.dtype | None,
                 accumulate_on: str, label: str, hist=None, exclude_padding: bool = False, first: int = 0):
    """One pass over ``make()`` per part, each accumulating that part's groups (``hist``, when given, is fed by
    every forward); ``(scores, token counts per pass, accumulator bytes per pass)``. ``first``: the index of
    ``parts[0]`` among all passes (progress labels)."""
    from ukmp.importance.taylor import TaylorScorer, row_sparse_head

    scores: dict[str, torch.Tensor] = {}
    counts, held = [], []
    n = first + len(parts)
    for k, part in enumerate(parts, start=first):
        desc = label if n == 1 else f"{label} {k + 1}/{n}"
        with TaylorScorer(model, part, order=order, accumulate_on=accumulate_on) as scorer, row_sparse_head(model):
            counts.append(_selected_backward(model, scorer, make(), threshold, desc, total, compute_dtype, hist,
                                             exclude_padding))
            scores.update(scorer.scores())
            held.append(scorer.accumulator_bytes)
    return scores, counts, held


def _pass_stats(counts: list[dict[str, int]], held: list[dict[str, int]]) -> dict[str, int]:
    """Token counts must agree between passes (the same batches, the same model); the accumulators' peak over the
    passes, per device type, as the scorers measured it."""
    if any(c != counts[0] for c in counts[1:]):
        raise RuntimeError(f"scoring passes saw different calibration batches (token counts {counts}): the batches "
                           "must be reproducible for prune.score_passes > 1")
    stats = dict(counts[0])
    for dev in sorted({d for h in held for d in h}):
        stats[f"accumulator_peak_bytes_{dev}"] = max(h.get(dev, 0) for h in held)
    stats["score_passes"] = len(held)
    return stats


def taylor_pass(model: nn.Module, groups: list[PrunableGroup], batches: BatchSource, threshold: float | None,
                order: str = "first", total: int | None = None, compute_dtype: torch.dtype | None = None,
                passes: int = 1, accumulate_on: str = "device") -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Per-unit Taylor scores with the selected-token loss; gradients summed over samples in fp32.

    ``passes`` > 1 runs the calibration data that many times (``batches`` then makes a fresh, identical stream per
    call), each pass accumulating one part of the groups (:func:`~ukmp.importance.taylor.partition_groups`): the
    accumulators take 1/passes of the memory for passes times the compute. ``accumulate_on="cpu"`` keeps them in
    host memory (:class:`~ukmp.importance.taylor.TaylorScorer`)."""
    scores, counts, held = _score_parts(model, _pass_parts(model, groups, passes), _stream(batches, passes),
                                        threshold, order, total, compute_dtype, accumulate_on, "taylor pass")
    return {g.id: scores[g.id] for g in groups}, _pass_stats(counts, held)


def fused_pass(model: nn.Module, groups: list[PrunableGroup], batches: BatchSource, threshold: float | None,
               order: str = "first", angle: bool = False, exclude_padding: bool = True, total: int | None = None,
               compute_dtype: torch.dtype | None = None, passes: int = 1, accumulate_on: str = "device"):
    """Both UKMP passes over one stream of batches: the entropy hooks read the activations of the Taylor forward.

    Equal to the two separate passes when both see the same inputs (augmentation off, or the same epoch); saves one
    forward per sample. With ``passes`` > 1 the first pass also fills the histograms, the others are Taylor only
    (see :func:`taylor_pass`)."""
    from ukmp.importance.entropy import StreamingAngleHistogram, unit_entropies

    make = _stream(batches, passes)
    parts = _pass_parts(model, groups, passes)
    common = (make, threshold, order, total, compute_dtype, accumulate_on, "fused pass")
    language = [g for g in groups if g.modality == "language"]
    with StreamingAngleHistogram(model, language, angle=angle, exclude_padding=exclude_padding) as hist:
        scores, counts, held = _score_parts(model, parts[:1], *common, hist=hist, exclude_padding=exclude_padding)
        entropy = unit_entropies(hist.entropy(), language)
    more, more_counts, more_held = _score_parts(model, parts[1:], *common, first=1)
    scores.update(more)
    return {g.id: scores[g.id] for g in groups}, entropy, _pass_stats(counts + more_counts, held + more_held)


# ---------------------------------------------------------------------------------------------------- methods
def score_ukmp(model, groups, batches: Batches, pc: PruneConfig, n_batches: int) -> ScoreResult:
    from ukmp.prune.allocate import combine

    threshold = 1.0 if pc.taylor == "first_no_threshold" else pc.threshold
    order = "first" if pc.taylor == "first_no_threshold" else pc.taylor
    entropy = None
    cdt = parse_compute_dtype(pc.compute_dtype)
    memory = {"passes": pc.score_passes, "accumulate_on": pc.accumulate_on}
    if pc.fused_passes and pc.entropy != "none":
        taylor, entropy, stats = fused_pass(model, groups, lambda: batches(1), threshold, order=order,
                                            angle=pc.entropy == "arccos", exclude_padding=pc.entropy_exclude_padding,
                                            total=n_batches, compute_dtype=cdt, **memory)
    else:
        if pc.entropy != "none":
            entropy = entropy_pass(model, groups, batches(0), angle=pc.entropy == "arccos",
                                   exclude_padding=pc.entropy_exclude_padding, total=n_batches, compute_dtype=cdt)
        taylor, stats = taylor_pass(model, groups, lambda: batches(1), threshold, order=order, total=n_batches,
                                    compute_dtype=cdt, **memory)
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
    """Register UKMP, random and magnitude (idempotent; also the ``ukmp.methods`` entry point ``ukmp``; their traits
    are declared in :mod:`ukmp.method_traits`)."""
    for name, fn in (("ukmp", score_ukmp), ("random", score_random), ("magnitude", score_magnitude)):
        if name not in METHODS:
            register_method(name, fn)


register_builtin()

__all__ = ["METHODS", "Batches", "ScoreResult", "entropy_pass", "fused_pass", "get_method",
           "is_data_free", "register_builtin", "register_method", "taylor_pass"]
