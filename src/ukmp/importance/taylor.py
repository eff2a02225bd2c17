"""First-order Taylor importance with token selection (UKMP_METHOD.md §2.2-§2.3).

Pure parts:

* :func:`select_tokens` — the positions the model fits poorly: top-1 confidence ``c_i <= tau`` with
  ``tau = max(T, min_i c_i)`` per sample, so at least one valid position is always selected.
* :func:`selected_loss` — per sample, the mean cross-entropy over its selected positions; the batch loss is
  the **sum** of those per-sample means, so one backward of a batch of B equals B batch-1 backwards added up.
* :func:`unit_reduce` — per-weight saliency -> one score per unit: the mean over every weight the unit owns
  (sum over the unit's weight slices / their number of weights; biases are ignored).

* :func:`partition_groups` — the groups split into parts of about equal accumulator memory, for scoring in
  several passes (``prune.score_passes``).

Stateful shell: :class:`TaylorScorer` keeps fp32 accumulators of the gradients of every Linear weight touched
by the groups (so a bf16 model never sums gradients in bf16). While it is open the scored Linears run as
:class:`_TrackedLinear`, whose backward adds ``grad_out.T @ x`` over the rows that carry a gradient straight into
those accumulators; any other scored weight is read from ``.grad`` after each backward.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ukmp.groups import PrunableGroup
from ukmp.nll import IGNORE_INDEX

TaylorOrder = Literal["first", "second", "mix"]
AccumulateOn = Literal["device", "cpu"]
LossReduction = Literal["per_sample_mean", "token_mean"]


# -------------------------------------------------------------------------------------------- token selection
def token_confidence(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 softmax probability per position, ``[B, L, V] -> [B, L]`` (fp32, no grad)."""
    with torch.no_grad():
        return torch.softmax(logits.detach().float(), dim=-1).amax(dim=-1)


def _check_shapes(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits: expected shape [B, L, V], got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels: shape {tuple(labels.shape)} does not match logits "
                         f"{tuple(logits.shape[:2])}")


def select_tokens(logits: torch.Tensor, labels: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Boolean mask ``[B, L]`` of the selected target positions.

    ``threshold=None`` (or >= 1) selects every valid position (``labels != -100``). Otherwise a valid position
    ``i`` of sample ``b`` is selected when ``c_i <= max(threshold, min_j c_j)`` (``j`` over the valid
    positions of ``b``). A sample without valid positions selects nothing.
    """
    _check_shapes(logits, labels)
    valid = labels != IGNORE_INDEX
    if threshold is None or threshold >= 1.0:
        return valid
    if threshold < 0:
        raise ValueError(f"threshold: must be >= 0 (or None), got {threshold}")
    conf = token_confidence(logits)
    inf = torch.full_like(conf, float("inf"))
    min_conf = torch.where(valid, conf, inf).amin(dim=1, keepdim=True)  # [B, 1]
    tau = torch.clamp(min_conf, min=float(threshold))
    return valid & (conf <= tau)


def selected_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    threshold: float | None = 0.4,
    reduction: LossReduction = "per_sample_mean",
) -> tuple[torch.Tensor, int, int]:
    """Cross-entropy over the selected positions: ``(loss, n_selected, n_valid)``.

    ``reduction="per_sample_mean"`` (the reference at batch size 1, made batch-additive): the sum over samples
    of each sample's mean CE over its selected positions (samples with none contribute 0).
    ``reduction="token_mean"``: one mean over all selected positions of the batch (not batch-additive).
    ``threshold=None`` disables selection (plain mean CE over all valid positions of each sample). The CE is
    computed in fp32 whatever the logits' dtype.
    """
    mask = select_tokens(logits, labels, threshold)
    n_valid = int((labels != IGNORE_INDEX).sum())
    n_sel = int(mask.sum())
    # CE of the selected rows only: unselected positions would add exact zeros (to the loss and, through the
    # indexing, to the logits' gradient), at the cost of a log-softmax over the whole vocabulary each.
    ce = F.cross_entropy(logits[mask].float(), labels[mask], reduction="none")  # [n_sel]
    if reduction == "per_sample_mean":
        per_row = mask.sum(dim=1).clamp(min=1).to(ce.dtype)  # [B]
        loss = (ce / per_row[mask.nonzero()[:, 0]]).sum()
    elif reduction == "token_mean":
        loss = ce.sum() / max(n_sel, 1)
    else:
        raise ValueError(f"reduction: unknown value {reduction!r} (choose 'per_sample_mean' or 'token_mean')")
    return loss, n_sel, n_valid


# -------------------------------------------------------------------------------- row-sparse tracked Linears
SPARSE_ROWS = 0.9  # below this fraction of rows with a gradient, the backward multiplies only those rows
GradSink = Callable[[torch.Tensor, torch.Tensor], None]  # (grad_out rows [n, d_out], inputs [n, d_in])


def _matmul_dtype(x: torch.Tensor, weight: torch.Tensor, at_least_fp32: bool) -> torch.dtype:
    """What the Linear's product runs in: autocast's dtype when autocast is on (as ``F.linear`` would), else the
    promoted input/weight dtype; ``at_least_fp32`` raises it to fp32."""
    dev = x.device.type
    dt = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
          else torch.promote_types(x.dtype, weight.dtype))
    return torch.promote_types(dt, torch.float32) if at_least_fp32 else dt


class _TrackedLinear(torch.autograd.Function):
    """``F.linear(x, W, b)`` whose backward (1) multiplies only the rows of the incoming gradient that are not
    all zero and (2) hands the weight-gradient factors to ``sink`` instead of returning a gradient for ``W``.

    (1) With token selection many positions get an exactly-zero gradient (unselected vocabulary rows; decoder
    positions after a sample's last selected token; padding), so the products shrink to the rows that matter;
    the result is the same up to summation order (zero rows add exact zeros). (2) lets the scorer fold
    ``grad_out.T @ x`` straight into its fp32 accumulator (one ``addmm_``), with no ``.grad`` tensor per batch.
    ``sink=None`` computes no weight gradient at all (a frozen projection such as the vocabulary head).

    Autocast is honoured explicitly (the product runs in :func:`_matmul_dtype`), so the saved inputs are the
    ones the product used. ``sparse``: look for zero rows (True), never (False), or ``None`` = on the CPU only:
    finding them costs a device-to-host synchronisation, which on a GPU would stall every Linear's backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, sink, at_least_fp32, sparse=None):
        if sink is None and weight.requires_grad:
            raise ValueError("weight: needs a gradient, so its Linear needs a sink")
        dt = _matmul_dtype(x, weight, at_least_fp32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xc, wc = x.to(dt), weight.to(dt)
            y = F.linear(xc, wc, None if bias is None else bias.to(dt))
        ctx.save_for_backward(xc if sink is not None else None, wc)
        ctx.sink, ctx.x_dtype = sink, x.dtype
        ctx.sparse = (x.device.type == "cpu") if sparse is None else bool(sparse)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        xc, wc = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(wc.dtype)
        n = g.shape[0]
        if not ctx.sparse:
            rows = None
        elif g.shape[1] == 0:
            rows = torch.zeros(0, dtype=torch.long, device=g.device)
        else:  # rows not all zero; a NaN row counts as non-zero
            rows = (g.amax(dim=1).ne(0) | g.amin(dim=1).ne(0)).nonzero().squeeze(1)
        sparse = rows is not None and rows.numel() < SPARSE_ROWS * n
        g_rows = g.index_select(0, rows) if sparse else g
        gx = None
        if ctx.needs_input_grad[0]:
            if sparse:
                gx = g.new_zeros(n, wc.shape[1])
                if rows.numel():
                    gx.index_copy_(0, rows, g_rows @ wc)
            else:
                gx = g @ wc
            gx = gx.view(*grad.shape[:-1], wc.shape[1]).to(ctx.x_dtype)
        if ctx.sink is not None and (rows is None or rows.numel()):
            x2 = xc.reshape(-1, xc.shape[-1])
            ctx.sink(g_rows, x2.index_select(0, rows) if sparse else x2)
        gb = g_rows.sum(dim=0).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None  # bias trained elsewhere
        return gx, None, gb, None, None, None


def _accumulate_into(acc: torch.Tensor) -> GradSink:
    """A sink adding ``grad_out.T @ x`` to the fp32 ``acc`` (fused into the product when the dtypes agree)."""
    def sink(g: torch.Tensor, x: torch.Tensor) -> None:
        if g.dtype == acc.dtype:
            acc.addmm_(g.T, x)
        else:
            acc.add_((g.T @ x).to(acc.dtype))
    return sink


def _offload_into(acc: torch.Tensor, stage: dict[tuple[int, int], torch.Tensor]) -> GradSink:
    """A sink for an accumulator kept off the weight's device (``accumulate_on="cpu"``): ``grad_out.T @ x`` is formed
    on the device (one layer's product, transient), copied to host memory (through a pinned staging buffer when the
    device is CUDA) and added to the fp32 ``acc`` there."""
    def sink(g: torch.Tensor, x: torch.Tensor) -> None:
        prod = g.T @ x
        if prod.device.type == "cuda":
            buf = stage.get(tuple(prod.shape))
            if buf is None:
                buf = stage[tuple(prod.shape)] = torch.empty(prod.shape, dtype=acc.dtype, pin_memory=True)
            buf.copy_(prod)  # synchronous: the buffer is reused by the next layer's backward
            acc.add_(buf)
        else:
            acc.add_(prod.to(acc.device, acc.dtype))
    return sink


class ForwardPatches:
    """Replaces the ``forward`` of some modules (an instance attribute each) until :meth:`remove`."""

    def __init__(self):
        self.modules: list[nn.Module] = []

    def install(self, module: nn.Module, forward: Callable) -> None:
        module.forward = forward
        self.modules.append(module)

    def track(self, lin: nn.Linear, sink: GradSink | None, at_least_fp32: bool = False,
              sparse: bool | None = None) -> None:
        """Run ``lin`` as :class:`_TrackedLinear`."""
        self.install(lin, lambda x: _TrackedLinear.apply(x, lin.weight, lin.bias, sink, at_least_fp32, sparse))

    def remove(self) -> None:
        for m in self.modules:
            vars(m).pop("forward", None)
        self.modules = []


def output_projection(model: nn.Module) -> nn.Linear | None:
    """The model's vocabulary projection (``get_output_embeddings()``) when it is a bias-free Linear, else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Linear) and head.bias is None else None


class row_sparse_head:
    """Context manager: the model's output projection (``get_output_embeddings()``) back-propagates only the rows
    with a non-zero gradient, and computes its product in fp32 even under autocast (the logits pick the selected
    tokens; bf16 logits, with an 8-bit mantissa, would change that choice wherever two positions' confidences are
    close). A no-op when that projection is not a bias-free Linear or its weight needs a gradient."""

    def __init__(self, model: nn.Module):
        head = output_projection(model)
        self.head = head if head is not None and not head.weight.requires_grad else None
        self._patch = ForwardPatches()

    def __enter__(self) -> "row_sparse_head":
        if self.head is not None:
            self._patch.track(self.head, None, at_least_fp32=True, sparse=True)  # one sync per batch
        return self

    def __exit__(self, *exc) -> None:
        self._patch.remove()


# --------------------------------------------------------------------------------------------- unit reduction
def unit_weight_count(group: PrunableGroup, weight_shapes: dict[str, torch.Size]) -> int:
    """Number of weights (biases excluded) one unit of ``group`` owns."""
    n = 0
    for s in group.slices:
        if s.param != "weight":
            continue
        if s.name not in weight_shapes:
            raise ValueError(f"group {group.id!r}: no weight shape for {s.name!r}")
        n += s.unit_size * weight_shapes[s.name][1 - s.dim]
    return n


def unit_reduce(per_weight_score: dict[str, torch.Tensor], group: PrunableGroup) -> torch.Tensor:
    """``[n_units]``: mean per-weight score over the weights each unit owns (§2.3 step 4).

    ``per_weight_score`` maps ``"<module>.weight"`` to a tensor of that weight's shape. For each weight slice
    the score is summed over the non-pruned dimension, gathered with :meth:`ParamSlice.indices` and summed
    over the unit's rows/columns; the total is divided by the unit's weight count. Bias slices are ignored.
    """
    units = torch.arange(group.n_units)
    total: torch.Tensor | None = None
    shapes: dict[str, torch.Size] = {}
    for s in group.slices:
        if s.param != "weight":
            continue
        if s.name not in per_weight_score:
            raise ValueError(f"group {group.id!r}: no per-weight score for {s.name!r}")
        t = per_weight_score[s.name]
        if t.dim() != 2:
            raise ValueError(f"{s.name}: per-weight score must be 2-D, got shape {tuple(t.shape)}")
        shapes[s.name] = t.shape
        line = t.float().sum(dim=1 - s.dim)  # one value per row (dim 0) or column (dim 1)
        idx = s.indices(units.to(line.device))
        if int(idx.max()) >= line.numel():
            raise ValueError(f"group {group.id!r}: {s.name} has {line.numel()} entries along dim {s.dim}, "
                             f"fewer than the group needs")
        part = line.index_select(0, idx).view(group.n_units, s.unit_size).sum(dim=1)
        total = part if total is None else total + part.to(total.device)
    if total is None:
        raise ValueError(f"group {group.id!r}: has no weight slices to score")
    return total / unit_weight_count(group, shapes)


def partition_groups(groups: list[PrunableGroup], passes: int,
                     weight_bytes: Callable[[str], int]) -> list[list[PrunableGroup]]:
    """``groups`` split into at most ``passes`` parts of about equal accumulator bytes, for scoring in several
    passes over the calibration data (each pass accumulates one part). Groups that share a weight stay in one
    part; parts are filled largest first (ties in input order), each keeps the input order. Deterministic."""
    if passes < 1:
        raise ValueError(f"passes: must be >= 1, got {passes}")
    parent = list(range(len(groups)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, g in enumerate(groups):
        for s in g.slices:
            if s.param == "weight":
                j = owner.setdefault(s.name, i)
                parent[root(i)] = root(j)
    clusters: dict[int, list[int]] = {}
    for i in range(len(groups)):
        clusters.setdefault(root(i), []).append(i)
    sized = [(sum(weight_bytes(n) for n in {s.name for k in c for s in groups[k].slices if s.param == "weight"}), c)
             for c in clusters.values()]
    sized.sort(key=lambda t: (-t[0], t[1][0]))
    load, parts = [0] * passes, [[] for _ in range(passes)]
    for size, c in sized:
        k = min(range(passes), key=lambda j: (load[j], j))
        load[k] += size
        parts[k].extend(c)
    return [[groups[i] for i in sorted(p)] for p in parts if p]


# ---------------------------------------------------------------------------------------- per-weight saliency
def taylor_saliency(
    weight: torch.Tensor,
    grad_sum: torch.Tensor,
    sq_sum: torch.Tensor | None,
    n_batches: int,
    order: TaylorOrder,
) -> torch.Tensor:
    """Per-weight |S| in fp32.

    * ``first``: ``|W * G|`` with ``G`` the **sum** of the accumulated gradients (the reference's non-zeroed
      .grad).
    * ``second``: ``|W * F * W|`` with ``F = sq_sum / n_batches``, the mean of squared per-batch gradients (an
      empirical Fisher diagonal; per-sample only when each batch holds one sample). No 1/2 factor, as
      LLM-Pruner.
    * ``mix``: ``|W * Gm - 0.5 * W * F * W|`` with ``Gm = G / n_batches`` so both terms share one scale.
    """
    w = weight.detach().to(grad_sum.device, torch.float32)
    if order == "first":
        return (w * grad_sum).abs()
    if sq_sum is None or n_batches < 1:
        raise ValueError(f"order: {order!r} needs at least one accumulated batch of squared gradients")
    fisher = sq_sum / n_batches
    second = w * fisher * w
    if order == "second":
        return second.abs()
    if order == "mix":
        return (w * (grad_sum / n_batches) - 0.5 * second).abs()
    raise ValueError(f"order: unknown value {order!r} (choose 'first', 'second' or 'mix')")


# -------------------------------------------------------------------------------------------- stateful scorer
class TaylorScorer:
    """Accumulates fp32 gradients of the groups' Linear weights over many backward passes.

    Usage::

        scorer = TaylorScorer(model, groups)
        for batch in loader:
            loss, _, _ = selected_loss(model(**batch).logits, batch["labels"], 0.4)
            scorer.backward(loss)          # loss.backward(); then collect() reads and clears .grad
        scores = scorer.scores()           # {group id: Tensor[n_units]}
        scorer.close()                     # restores requires_grad flags

    The scored weights get ``requires_grad=True``; with ``freeze_others`` every other parameter is frozen
    while the scorer is open (their gradients are not needed and would only cost memory). Gradients of the
    scored weights do not depend on which other parameters require grad. For ``order="second"/"mix"`` each
    :meth:`collect` adds the square of that batch's gradient; this is the per-sample empirical Fisher only
    when batches hold one sample.

    With ``track_linears`` (the default) a scored weight that belongs to an ``nn.Linear`` never gets a ``.grad``:
    the Linear runs as :class:`_TrackedLinear` while the scorer is open, whose backward adds
    ``grad_out.T @ x`` over the rows with a gradient straight into the fp32 accumulator. Other scored weights
    go through ``.grad`` as usual.

    ``accumulate_on="cpu"`` keeps every accumulator in host memory (pinned for a CUDA model): each Linear's
    product is formed on the device as its backward runs and added on the host, so the device holds the weights,
    the activations and one layer's product, not an fp32 copy of every scored weight. ``accumulator_bytes`` is
    what the accumulators occupy, per device type.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: list[PrunableGroup],
        order: TaylorOrder = "first",
        freeze_others: bool = True,
        track_linears: bool = True,
        accumulate_on: AccumulateOn = "device",
    ):
        if order not in ("first", "second", "mix"):
            raise ValueError(f"order: unknown value {order!r} (choose 'first', 'second' or 'mix')")
        if accumulate_on not in ("device", "cpu"):
            raise ValueError(f"accumulate_on: unknown value {accumulate_on!r} (choose 'device' or 'cpu')")
        self.accumulate_on: AccumulateOn = accumulate_on
        self.model = model
        self.groups = list(groups)
        self.order: TaylorOrder = order
        self.params: dict[str, nn.Parameter] = {}
        for g in self.groups:
            for s in g.slices:
                if s.param == "weight" and s.name not in self.params:
                    try:
                        self.params[s.name] = model.get_parameter(s.name)
                    except AttributeError:
                        raise ValueError(f"group {g.id!r}: model has no parameter {s.name!r}") from None
        self._saved_flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
        tracked = {id(p) for p in self.params.values()}
        for p in model.parameters():
            if id(p) in tracked:
                p.requires_grad_(True)
            elif freeze_others:
                p.requires_grad_(False)
        self.grad_sum = {n: self._zeros(p) for n, p in self.params.items()}
        self.sq_sum = {n: self._zeros(p) for n, p in self.params.items()} if order != "first" else None
        self.n_batches = 0
        # per-batch fp32 gradient of tracked weights when the squares are needed; else straight into grad_sum
        self._batch: dict[str, torch.Tensor] = {}
        self._stage: dict[tuple[int, int], torch.Tensor] = {}  # pinned staging buffers (CUDA, accumulate_on=cpu)
        self._tracked = ForwardPatches()
        if track_linears:
            for n, p in self.params.items():
                owner = model.get_submodule(n.rsplit(".", 1)[0]) if n.endswith(".weight") else None
                if not isinstance(owner, nn.Linear) or owner.weight is not p:
                    continue
                if self.sq_sum is not None:
                    self._batch[n] = torch.zeros_like(self.grad_sum[n])
                acc = self._batch.get(n, self.grad_sum[n])
                self._tracked.track(owner, _offload_into(acc, self._stage) if self.accumulate_on == "cpu"
                                    else _accumulate_into(acc))
        self.accumulator_bytes = self._held_bytes()  # measured from the tensors held, not from arithmetic

    def _zeros(self, p: torch.Tensor) -> torch.Tensor:
        """An fp32 accumulator for ``p``: on ``p``'s device, or in host memory (pinned when ``p`` is on CUDA)."""
        if self.accumulate_on == "cpu":
            return torch.zeros(p.shape, dtype=torch.float32, pin_memory=p.device.type == "cuda")
        return torch.zeros(p.shape, dtype=torch.float32, device=p.device)

    def _held_bytes(self) -> dict[str, int]:
        """Bytes of the accumulators this scorer holds, by device type (``{"cpu": ..., "cuda": ...}``)."""
        out: dict[str, int] = {}
        for d in (self.grad_sum, self.sq_sum or {}, self._batch):
            for t in d.values():
                out[t.device.type] = out.get(t.device.type, 0) + t.numel() * t.element_size()
        return out

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` followed by :meth:`collect`."""
        loss.backward()
        self.collect()

    @torch.no_grad()
    def collect(self) -> None:
        """Close one batch: add the current ``.grad`` of every scored weight (and, for second/mix, the tracked
        Linears' per-batch sums) to the fp32 accumulators, then clear them."""
        for n, p in self.params.items():
            g = None if p.grad is None else p.grad.float()  # None: no part in this loss, or tracked
            p.grad = None
            buf = self._batch.get(n)  # a tracked weight's gradient of this batch (second/mix only)
            if buf is not None:
                g = buf if g is None else buf.add_(g)
            if g is None:
                continue
            g = g.to(self.grad_sum[n].device)  # accumulate_on=cpu: a .grad weight's gradient goes to the host
            self.grad_sum[n].add_(g)
            if self.sq_sum is not None:
                self.sq_sum[n].add_(g * g)
            if buf is not None:
                buf.zero_()
        self.n_batches += 1

    def _saliency(self, name: str) -> torch.Tensor:
        if self.n_batches == 0:
            raise ValueError("TaylorScorer: no batch collected yet (call backward/collect first)")
        sq = None if self.sq_sum is None else self.sq_sum[name]
        return taylor_saliency(self.params[name], self.grad_sum[name], sq, self.n_batches, self.order)

    def per_weight_scores(self) -> dict[str, torch.Tensor]:
        """``{"<module>.weight": |S|}`` in fp32 for the configured order (every scored weight at once)."""
        return {n: self._saliency(n) for n in self.params}

    def scores(self) -> dict[str, torch.Tensor]:
        """``{group id: Tensor[n_units]}`` (fp32, on CPU): the mean |S| per weight of each unit.

        Saliency is formed one group at a time, so the extra memory is one group's weights, not the model's.
        """
        out = {}
        for g in self.groups:
            names = {s.name for s in g.slices if s.param == "weight"}
            out[g.id] = unit_reduce({n: self._saliency(n) for n in names}, g).cpu()
        return out

    def close(self) -> None:
        """Restore every parameter's ``requires_grad`` and drop leftover gradients of the scored weights."""
        self._tracked.remove()
        for p, flag in self._saved_flags.values():
            p.requires_grad_(flag)
        for p in self.params.values():
            p.grad = None

    def __enter__(self) -> "TaylorScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
