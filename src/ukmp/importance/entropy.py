"""Entropy of the token-to-weight angle distribution (UKMP_METHOD.md §2.4), language model only.

For a Linear with weight rows ``w_j`` and every input token ``x`` it sees, ``cos = <x, w_j> / (|x| |w_j|)`` is
added to a per-neuron histogram of 100 equal bins on [-1, 1]; the neuron's score is the entropy of that
histogram, ``H_j = -sum_b p_b ln(p_b + 1e-12)``. Histograms are streamed (fixed memory ``d_out x bins`` per
Linear), which gives exactly the counts of histogramming all cosines at once.

Pure parts: :func:`cosines`, :func:`histogram_counts` (numpy ``np.histogram`` bin semantics: half-open bins,
the last one closed), :func:`histogram_entropy`, :func:`unit_entropy`. The stateful shell,
:class:`StreamingAngleHistogram`, holds forward hooks and the count tensors.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn

from ukmp.groups import PrunableGroup

ENTROPY_EPS = 1e-12
DEFAULT_BINS = 100
CHUNK_ELEMENTS = 1 << 22  # cosines materialised at once (tokens x neurons) per hook call


# --------------------------------------------------------------------------------------------- pure functions
def cosines(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-12,
            output: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, d_in] x [d_out, d_in] -> [N, d_out]``: cosine of every token with every weight row.

    fp32, clamped to [-1, 1]; a zero token or zero row gets cosine 0. ``output`` (``[N, d_out]``, optional) is
    ``x @ weight.T`` already computed - a bias-free Linear's own output: the cosines are then that product divided
    by the norms, with no second matrix product (they differ from the normalise-first product by rounding only).
    """
    xf, wf = x.float(), weight.float()
    inv_x, inv_w = inverse_norms(xf, eps), inverse_norms(wf, eps)
    if output is None:
        return ((xf * inv_x[:, None]) @ (wf * inv_w[:, None]).T).clamp_(-1.0, 1.0)
    if tuple(output.shape) != (x.shape[0], weight.shape[0]):
        raise ValueError(f"output: shape {tuple(output.shape)}, expected {(x.shape[0], weight.shape[0])}")
    return (output.float() * inv_x[:, None]).mul_(inv_w[None, :]).clamp_(-1.0, 1.0)


def inverse_norms(rows: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``[N, d] -> [N]``: ``1 / max(|row|, eps)`` in fp32 (a zero row gets a finite factor, so cosine 0)."""
    return 1.0 / rows.float().norm(dim=1).clamp(min=eps)


def bin_edges(bins: int, angle: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``bins + 1`` float64 edges: [-1, 1] for cosines, [0, pi] for angles.

    Computed as ``lo + i * ((hi - lo) / bins)`` with the last edge set to ``hi``: the same arithmetic as
    ``np.linspace`` (which ``np.histogram`` uses), so bin membership matches numpy bit for bit.
    """
    lo, hi = (0.0, math.pi) if angle else (-1.0, 1.0)
    edges = torch.arange(bins + 1, dtype=torch.float64, device=device) * ((hi - lo) / bins) + lo
    edges[-1] = hi
    return edges


NEAR_EDGE = 1e-3  # in bin widths: values this close to an edge are re-binned against the float64 edges


def histogram_counts(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """``values [N, d_out] -> counts [d_out, bins]`` (fp32) with ``np.histogram`` semantics.

    Bin ``b`` holds ``edges[b] <= v < edges[b+1]``; the last bin also holds ``v == edges[-1]``. Values outside
    the range are dropped (cosines are clamped to [-1, 1], so none are). ``edges`` must be equally spaced
    (:func:`bin_edges`).

    The bin is ``floor((v - lo) / width)`` in the values' precision (error a few 1e-5 bin widths at most); values
    within ``NEAR_EDGE`` of a bin boundary - a small fraction - are re-binned by a search in the float64 edges,
    so the counts are exactly numpy's while the bulk costs a handful of elementwise passes.
    """
    bins = edges.numel() - 1
    n, d_out = values.shape
    v = values if values.dtype in (torch.float32, torch.float64) else values.float()
    lo, hi = float(edges[0]), float(edges[-1])
    u = (v - lo).mul_(bins / (hi - lo))
    idx = _bin_index(u, edges, lambda pos: v.reshape(-1) if pos is None else v.reshape(-1)[pos])
    if n and (float(v.min()) < lo or float(v.max()) > hi):  # rare (cosines are clamped): keep the inside ones
        v64 = v.double()  # a Python float compared with a float32 tensor would be rounded to float32
        inside = (v64 >= lo) & (v64 <= hi)
        flat = idx[inside] + torch.nonzero(inside)[:, 1].to(torch.int32) * bins
        return torch.bincount(flat, minlength=d_out * bins).view(d_out, bins).to(torch.float32)
    return _count(idx, bins)


def cosine_counts(output: torch.Tensor, inv_x: torch.Tensor, inv_w: torch.Tensor,
                  edges: torch.Tensor) -> torch.Tensor:
    """``histogram_counts(cosines(x, W, output=output), edges)`` without materialising the cosines first.

    ``output [N, d_out]`` is ``x @ W.T``, ``inv_x [N]`` and ``inv_w [d_out]`` the inverse norms as
    :func:`cosines` computes them. The bulk is binned from ``output * (inv_x * bins/2) * inv_w + bins/2``; the
    few values near an edge are re-binned from their cosines, computed exactly as :func:`cosines` does, so the
    counts are identical to the two-step route (``edges`` on [-1, 1])."""
    bins = edges.numel() - 1
    y = output.float()
    half = bins / 2.0
    u = (y * (inv_x * half)[:, None]).mul_(inv_w[None, :]).add_(half).clamp_(0.0, float(bins))
    d_out = y.shape[1]

    def exact(pos: torch.Tensor | None) -> torch.Tensor:  # cosines of these flat positions (None: all), as cosines()
        if pos is None:
            return (y * inv_x[:, None] * inv_w[None, :]).clamp_(-1.0, 1.0).view(-1)
        r, c = pos // d_out, pos % d_out
        return (y.reshape(-1)[pos] * inv_x[r] * inv_w[c]).clamp_(-1.0, 1.0)

    return _count(_bin_index(u, edges, exact), bins)


def _bin_index(u: torch.Tensor, edges: torch.Tensor, exact) -> torch.Tensor:
    """int32 bins from positions ``u`` in bin widths (``>= 0``; error well under ``NEAR_EDGE``); the elements
    within ``NEAR_EDGE`` of a boundary are re-binned from their exact values against the float64 edges.

    ``exact(flat positions)`` gives those values (``exact(None)``: every value, flat). On the CPU only the few
    near-edge positions are looked up; elsewhere (a GPU) every value is searched and the near ones taken with a
    ``where``, since listing the positions would synchronise with the host on every call."""
    bins = edges.numel() - 1
    idx = u.to(torch.int32).clamp_(0, bins - 1)  # u >= 0: truncation is the floor; v == hi -> the last bin
    near = u.round().sub_(u).abs_() < NEAR_EDGE
    e = edges.to(device=u.device, dtype=torch.float64)

    def search(v: torch.Tensor) -> torch.Tensor:
        v = v.to(torch.float64)
        b = torch.bucketize(v, e, right=True) - 1  # number of edges <= v, minus one
        return torch.where(v == e[-1], torch.full_like(b, bins - 1), b).clamp_(0, bins - 1).to(torch.int32)

    if not _host_synchronising(u.device):
        return torch.where(near, search(exact(None)).view_as(idx), idx)
    pos = near.view(-1).nonzero().squeeze(1)
    if pos.numel():
        idx.view(-1)[pos] = search(exact(pos))
    return idx


def _host_synchronising(device: torch.device) -> bool:
    """Whether looking up the near-edge positions (a data-dependent ``nonzero``) is cheap: on the CPU it is."""
    return device.type == "cpu"


def _count(idx: torch.Tensor, bins: int) -> torch.Tensor:
    """Per-column counts ``[d_out, bins]`` (fp32) of the int32 bins ``idx [N, d_out]``."""
    d_out = idx.shape[1]
    idx += torch.arange(0, d_out * bins, bins, dtype=torch.int32, device=idx.device)
    return torch.bincount(idx.view(-1), minlength=d_out * bins).view(d_out, bins).to(torch.float32)


def histogram_entropy(counts: torch.Tensor) -> torch.Tensor:
    """``counts [..., bins] -> H [...]``: ``-sum p ln(p + 1e-12)`` with ``p = counts / counts.sum()``.

    Bounded in ``[0, ln(bins)]``; an empty histogram has entropy 0.
    """
    c = counts.double()
    total = c.sum(dim=-1, keepdim=True)
    p = c / total.clamp(min=1.0)
    return (-(p * torch.log(p + ENTROPY_EPS)).sum(dim=-1)).float()


def entropy_modules(groups: list[PrunableGroup]) -> list[str]:
    """Linears whose neurons are histogrammed: the row-pruned weights of language groups (the query, key and value
    projections; the MLP's input projections). Output projections are column-pruned and excluded; vision groups
    are excluded."""
    out: list[str] = []
    for g in groups:
        if g.modality != "language":
            continue
        for s in g.slices:
            if s.param == "weight" and s.dim == 0 and s.module not in out:
                out.append(s.module)
    return out


def unit_entropy(neuron_entropy: dict[str, torch.Tensor], group: PrunableGroup) -> torch.Tensor:
    """``[n_units]``: mean neuron entropy over each unit's rows in every row-pruned weight of the group.

    A head (or KV group): the mean over its query, key and value projections of the mean over the rows it owns in
    each; an MLP channel: the mean of its rows in the input projections (gate and up, or the single one of a
    non-gated MLP). Modules weigh equally.
    """
    units = torch.arange(group.n_units)
    parts = []
    for s in group.slices:
        if s.param != "weight" or s.dim != 0:
            continue
        if s.module not in neuron_entropy:
            raise ValueError(f"group {group.id!r}: no neuron entropy for module {s.module!r}")
        h = neuron_entropy[s.module].float().cpu()
        idx = s.indices(units)
        if int(idx.max()) >= h.numel():
            raise ValueError(f"group {group.id!r}: {s.module} has {h.numel()} neuron entropies, "
                             f"fewer than needed")
        parts.append(h.index_select(0, idx).view(group.n_units, s.unit_size).mean(dim=1))
    if not parts:
        raise ValueError(f"group {group.id!r}: has no row-pruned weight to take entropies from")
    return torch.stack(parts).mean(dim=0)


def unit_entropies(
    neuron_entropy: dict[str, torch.Tensor], groups: list[PrunableGroup]
) -> dict[str, torch.Tensor]:
    """:func:`unit_entropy` for every language group."""
    return {g.id: unit_entropy(neuron_entropy, g) for g in groups if g.modality == "language"}


# --------------------------------------------------------------------------------------------- stateful shell
def _model_streams(model: nn.Module) -> dict[str, str]:
    """{Linear path: token stream} from the model's adapter (empty for a model ukmp has no adapter for)."""
    from ukmp.models import MODELS, adapter_for

    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in MODELS:
        return {}
    return adapter_for(config).streams()


class StreamingAngleHistogram:
    """Forward hooks that histogram the cosine (or angle) between every input token and every weight row.

    ``groups`` picks the Linears (see :func:`entropy_modules`); ``modules`` overrides the list. With
    ``exclude_padding=True`` the caller supplies token masks around each forward (see :meth:`token_masks`):
    encoder-side Linears (encoder q/k/v/wi and cross-attention k/v) use the encoder mask, the others the
    decoder mask. The class default counts every position; the scoring passes exclude padding by default, which
    reproduces what one-sample (unpadded) batches see. Run the model under
    ``torch.no_grad()``.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: list[PrunableGroup],
        bins: int = DEFAULT_BINS,
        angle: bool = False,
        exclude_padding: bool = False,
        modules: list[str] | None = None,
        chunk_elements: int = CHUNK_ELEMENTS,
    ):
        if bins < 1:
            raise ValueError(f"bins: must be >= 1, got {bins}")
        self.bins, self.angle, self.exclude_padding = bins, angle, exclude_padding
        self.chunk_elements = max(int(chunk_elements), 1)
        names = list(modules) if modules is not None else entropy_modules(groups)
        if not names:
            raise ValueError("groups: no language Linear to histogram")
        streams = _model_streams(model)
        self.streams = {n: streams.get(n, "decoder" if ".decoder." in n else "encoder") for n in names}
        self.counts: dict[str, torch.Tensor] = {}
        self._masks: dict[str, torch.Tensor] | None = None
        self._row_cache: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._handles = []
        for n in names:
            try:
                lin = model.get_submodule(n)
            except AttributeError:
                raise ValueError(f"modules: model has no submodule {n!r}") from None
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"modules: {n!r} is not an nn.Linear")
            self.counts[n] = torch.zeros(lin.out_features, bins, dtype=torch.float32,
                                         device=lin.weight.device)
            self._handles.append(lin.register_forward_hook(self._hook(n)))
        self._edges: dict[torch.device, torch.Tensor] = {}

    # ------------------------------------------------------------------ masks
    def set_token_masks(
        self, encoder: torch.Tensor | None = None, decoder: torch.Tensor | None = None
    ) -> None:
        """Masks ``[B, L]`` (1 = real token) of the T5 streams for the next forward; ``None`` clears them."""
        both_none = encoder is None and decoder is None
        self.set_stream_masks(None if both_none else {"encoder": encoder, "decoder": decoder})

    def set_stream_masks(self, masks: dict[str, torch.Tensor | None] | None) -> None:
        """{stream: mask [B, L] or None (every token real)} for the next forward (the adapter's
        ``stream_masks(batch)``); ``None`` clears them."""
        self._masks = None if masks is None else dict(masks)
        self._row_cache = {}

    @contextlib.contextmanager
    def stream_masks(self, masks: dict[str, torch.Tensor | None]) -> Iterator[None]:
        self.set_stream_masks(masks)
        try:
            yield
        finally:
            self.set_stream_masks(None)

    @contextlib.contextmanager
    def token_masks(self, encoder: torch.Tensor | None, decoder: torch.Tensor | None) -> Iterator[None]:
        self.set_token_masks(encoder, decoder)
        try:
            yield
        finally:
            self.set_token_masks(None, None)

    # ------------------------------------------------------------------ hook
    def _hook(self, name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            # a bias-free Linear's output is x @ W.T: the cosines reuse it instead of a second product
            reuse = module.bias is None and isinstance(output, torch.Tensor)
            self.observe(name, inputs[0], module.weight, output if reuse else None)
        return hook

    def _rows(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """Flat indices of the real (unpadded) tokens of ``x [..., d_in]``; ``None`` = every token."""
        if not self.exclude_padding:
            return None
        stream = self.streams[name]
        if self._masks is None or stream not in self._masks:
            raise ValueError(f"exclude_padding: no {stream} token mask set for {name!r} (use stream_masks())")
        mask = self._masks[stream]
        if mask is None:  # every token of this stream is real
            return None
        flat_ok = x.dim() == 2 and mask.numel() == x.shape[0]  # a stack that flattens tokens (OPT's MLP)
        if tuple(mask.shape) != tuple(x.shape[:-1]) and not flat_ok:
            raise ValueError(f"{stream} token mask: shape {tuple(mask.shape)} does not match the input of "
                             f"{name!r} {tuple(x.shape[:-1])}")
        key = (stream, x.device)
        if key not in self._row_cache:  # one nonzero per stream and forward, shared by that stream's Linears
            self._row_cache[key] = mask.to(x.device).reshape(-1).nonzero().squeeze(1)
        return self._row_cache[key]

    @torch.no_grad()
    def observe(self, name: str, x: torch.Tensor, weight: torch.Tensor,
                output: torch.Tensor | None = None) -> None:
        """Add the tokens ``x [..., d_in]`` seen by Linear ``name`` to its histograms, in chunks.

        ``output`` (optional): ``x @ weight.T`` as the Linear computed it (bias-free), reused for the cosines."""
        rows = self._rows(name, x)
        tokens = x.detach().reshape(-1, x.shape[-1])
        out = None if output is None else output.detach().reshape(-1, output.shape[-1])
        if rows is not None:
            tokens = tokens.index_select(0, rows)
            out = None if out is None else out.index_select(0, rows)
        w = weight.detach().float()
        dev = self.counts[name].device
        if w.device not in self._edges:
            self._edges[w.device] = bin_edges(self.bins, self.angle, w.device)
        edges = self._edges[w.device]
        step = max(1, self.chunk_elements // max(w.shape[0], 1))
        inv_w = inverse_norms(w) if out is not None and not self.angle else None
        for start in range(0, tokens.shape[0], step):
            x = tokens[start:start + step].to(w.device)
            part = None if out is None else out[start:start + step].to(w.device)
            if inv_w is not None:  # cosines binned straight from the Linear's output
                counts = cosine_counts(part, inverse_norms(x), inv_w, edges)
            else:
                c = cosines(x, w, output=part)
                counts = histogram_counts(torch.arccos(c) if self.angle else c, edges)
            self.counts[name] += counts.to(dev)

    # ------------------------------------------------------------------ results
    def entropy(self) -> dict[str, torch.Tensor]:
        """``{module: H [d_out]}`` (fp32, on CPU)."""
        return {n: histogram_entropy(c).cpu() for n, c in self.counts.items()}

    def tokens_seen(self) -> dict[str, int]:
        """Tokens histogrammed per module (the per-neuron count total)."""
        return {n: int(c[0].sum().item()) if c.shape[0] else 0 for n, c in self.counts.items()}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "StreamingAngleHistogram":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
