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
def cosines(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``[N, d_in] x [d_out, d_in] -> [N, d_out]``: cosine of every token with every weight row.

    fp32, clamped to [-1, 1]; a zero token or zero row gets cosine 0.
    """
    xf, wf = x.float(), weight.float()
    xn = xf / xf.norm(dim=1, keepdim=True).clamp(min=eps)
    wn = wf / wf.norm(dim=1, keepdim=True).clamp(min=eps)
    return (xn @ wn.T).clamp_(-1.0, 1.0)


def bin_edges(bins: int, angle: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``bins + 1`` float64 edges: [-1, 1] for cosines, [0, pi] for angles.

    Computed as ``lo + i * ((hi - lo) / bins)`` with the last edge set to ``hi``: the same arithmetic as
    ``np.linspace`` (which ``np.histogram`` uses), so bin membership matches numpy bit for bit.
    """
    lo, hi = (0.0, math.pi) if angle else (-1.0, 1.0)
    edges = torch.arange(bins + 1, dtype=torch.float64, device=device) * ((hi - lo) / bins) + lo
    edges[-1] = hi
    return edges


def histogram_counts(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """``values [N, d_out] -> counts [d_out, bins]`` (fp32) with ``np.histogram`` semantics.

    Bin ``b`` holds ``edges[b] <= v < edges[b+1]``; the last bin also holds ``v == edges[-1]``. Values outside
    the range are dropped (cosines are clamped to [-1, 1], so none are).
    """
    bins = edges.numel() - 1
    n, d_out = values.shape
    v = values.to(torch.float64)
    idx = torch.bucketize(v, edges, right=True) - 1  # number of edges <= v, minus one
    idx = torch.where(v == edges[-1], torch.full_like(idx, bins - 1), idx)
    inside = (idx >= 0) & (idx < bins)
    flat = (idx + torch.arange(d_out, device=v.device)[None, :] * bins)[inside]
    counts = torch.bincount(flat, minlength=d_out * bins)
    return counts.view(d_out, bins).to(torch.float32)


def histogram_entropy(counts: torch.Tensor) -> torch.Tensor:
    """``counts [..., bins] -> H [...]``: ``-sum p ln(p + 1e-12)`` with ``p = counts / counts.sum()``.

    Bounded in ``[0, ln(bins)]``; an empty histogram has entropy 0.
    """
    c = counts.double()
    total = c.sum(dim=-1, keepdim=True)
    p = c / total.clamp(min=1.0)
    return (-(p * torch.log(p + ENTROPY_EPS)).sum(dim=-1)).float()


def entropy_modules(groups: list[PrunableGroup]) -> list[str]:
    """Linears whose neurons are histogrammed: the row-pruned weights of language groups (q, k, v, wi_0, wi_1
    or wi). Output projections (o, wo) are column-pruned and excluded; vision groups are excluded."""
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

    A head: the mean over q, k and v of the mean over its ``d_kv`` rows; an FFN channel: the mean of its wi_0
    and wi_1 rows (wi for a non-gated FFN). Modules weigh equally (all slices of a unit have the same size).
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
def _stream_of(group: PrunableGroup, module: str) -> str:
    """Which token stream feeds ``module``: 'encoder' or 'decoder' (cross-attention k/v read the encoder)."""
    if group.kind.startswith("enc"):
        return "encoder"
    if group.kind == "dec_cross_heads" and module.rsplit(".", 1)[-1] in ("k", "v"):
        return "encoder"
    return "decoder"


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
        streams: dict[str, str] = {}
        for g in groups:
            for s in g.slices:
                if s.module in names and s.module not in streams:
                    streams[s.module] = _stream_of(g, s.module)
        self.streams = {n: streams.get(n, "decoder" if ".decoder." in n else "encoder") for n in names}
        self.counts: dict[str, torch.Tensor] = {}
        self._masks: dict[str, torch.Tensor] | None = None
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
        """Masks ``[B, L]`` (1 = real token) for the next forward; ``None`` clears them."""
        both_none = encoder is None and decoder is None
        self._masks = None if both_none else {"encoder": encoder, "decoder": decoder}

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
            self.observe(name, inputs[0], module.weight)
        return hook

    def _tokens(self, name: str, x: torch.Tensor) -> torch.Tensor:
        d_in = x.shape[-1]
        if not self.exclude_padding:
            return x.reshape(-1, d_in)
        stream = self.streams[name]
        mask = None if self._masks is None else self._masks.get(stream)
        if mask is None:
            raise ValueError(f"exclude_padding: no {stream} token mask set for {name!r} (use token_masks())")
        if tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"{stream} token mask: shape {tuple(mask.shape)} does not match the input of "
                             f"{name!r} "
                             f"{tuple(x.shape[:-1])}")
        return x[mask.to(x.device).bool()]

    @torch.no_grad()
    def observe(self, name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
        """Add the tokens ``x [..., d_in]`` seen by Linear ``name`` to its histograms, in chunks."""
        tokens = self._tokens(name, x.detach())
        w = weight.detach().float()
        dev = self.counts[name].device
        if dev not in self._edges:
            self._edges[dev] = bin_edges(self.bins, self.angle, dev)
        edges = self._edges[dev]
        step = max(1, self.chunk_elements // max(w.shape[0], 1))
        for start in range(0, tokens.shape[0], step):
            c = cosines(tokens[start:start + step].to(w.device), w)
            values = torch.arccos(c) if self.angle else c
            self.counts[name] += histogram_counts(values.to(dev), edges)

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
