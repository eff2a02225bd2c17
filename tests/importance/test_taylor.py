"""Token selection, the selected loss, and Taylor unit scores against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ukmp.groups import ParamSlice, PrunableGroup
from ukmp.importance.taylor import TaylorScorer, select_tokens, selected_loss, unit_reduce

pytestmark = pytest.mark.unit


# -------------------------------------------------------------------------------------------- token selection
def _logits_with_confidence(conf: list[list[float]], vocab: int = 5) -> torch.Tensor:
    """Logits whose top-1 softmax probability is ``conf`` (token 0 carries it, the rest share the rest)."""
    out = torch.empty(len(conf), len(conf[0]), vocab)
    for b, row in enumerate(conf):
        for i, c in enumerate(row):
            assert c > (1 - c) / (vocab - 1)
            p = torch.full((vocab,), (1 - c) / (vocab - 1))
            p[0] = c
            out[b, i] = p.log()
    return out


CONF = [[0.9, 0.3, 0.5, 0.25], [0.9, 0.8, 0.7, 0.25]]
LABELS = torch.tensor([[0, 1, 2, -100], [3, 0, 4, -100]])


def test_select_tokens_hand_made():
    logits = _logits_with_confidence(CONF)
    sel = select_tokens(logits, LABELS, 0.4)
    # sample 0: only 0.3 <= 0.4 (the padded 0.25 is ignored); sample 1: none <= 0.4 -> tau = min = 0.7
    assert sel.tolist() == [[False, True, False, False], [False, False, True, False]]
    # T = 1.0 and no threshold select every valid position, padding excluded
    valid = (LABELS != -100).tolist()
    assert select_tokens(logits, LABELS, 1.0).tolist() == valid
    assert select_tokens(logits, LABELS, None).tolist() == valid
    # not vacuous: if the padded position counted, sample 1 would select it (0.25 <= 0.4)
    all_valid = torch.tensor([[0, 1, 2, 3], [3, 0, 4, 1]])
    expected = [[False, True, False, True], [False, False, False, True]]
    assert select_tokens(logits, all_valid, 0.4).tolist() == expected
    # T = 0 selects exactly the least confident valid position of each sample
    assert select_tokens(logits, LABELS, 0.0).sum(dim=1).tolist() == [1, 1]


def test_selected_loss_hand_computed():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 7, dtype=torch.float64)
    labels = torch.randint(0, 7, (3, 6))
    labels[0, 4:] = -100
    labels[2, 1:] = -100
    T = 0.3
    logp = torch.log_softmax(logits, dim=-1)
    probs = logp.exp()
    expected, n_sel, n_val = 0.0, 0, 0
    for b in range(3):
        valid = [i for i in range(6) if labels[b, i] != -100]
        conf = {i: float(probs[b, i].max()) for i in valid}
        tau = max(T, min(conf.values()))
        chosen = [i for i in valid if conf[i] <= tau]
        n_sel += len(chosen)
        n_val += len(valid)
        expected += sum(-float(logp[b, i, labels[b, i]]) for i in chosen) / len(chosen)
    loss, s, v = selected_loss(logits, labels, T)
    assert (s, v) == (n_sel, n_val) and 0 < s < v
    assert abs(float(loss) - expected) <= 1e-5 * abs(expected), (float(loss), expected)
    # not vacuous: no threshold (all valid tokens, per-sample mean) gives a different value
    loss_all, s_all, _ = selected_loss(logits, labels, None)
    assert s_all == n_val and abs(float(loss_all) - expected) > 1e-3
    keep = labels != -100
    ce = torch.nn.functional.cross_entropy
    plain = sum(float(ce(logits[b][keep[b]], labels[b][keep[b]])) for b in range(3))
    assert abs(float(loss_all) - plain) <= 1e-6 * plain
    loss_tok, _, _ = selected_loss(logits, labels, T, reduction="token_mean")
    assert abs(float(loss_tok) - expected) > 1e-3
    with pytest.raises(ValueError, match="reduction"):
        selected_loss(logits, labels, T, reduction="bogus")
    with pytest.raises(ValueError, match="labels"):
        selected_loss(logits, labels[:, :3], T)


# ---------------------------------------------------------------------------------------------- toy model
D, HEADS, HD, FF = 6, 2, 3, 5


class Toy(nn.Module):
    """One T5-like attention (q, k, v, o), one ViT-like fused qkv + projection, one gated FFN."""

    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({n: nn.Linear(D, D, bias=False) for n in ("q", "k", "v", "o")})
        self.vit = nn.ModuleDict({"qkv": nn.Linear(D, 3 * D), "projection": nn.Linear(D, D)})
        self.ffn = nn.ModuleDict({"wi_0": nn.Linear(D, FF, bias=False), "wi_1": nn.Linear(D, FF, bias=False),
                                  "wo": nn.Linear(FF, D, bias=False)})

    def forward(self, x):
        a = self.attn["o"](torch.tanh(self.attn["q"](x)) * self.attn["k"](x) + self.attn["v"](x))
        q, k, v = self.vit["qkv"](x).chunk(3, dim=-1)
        b = self.vit["projection"](q * torch.sigmoid(k) + v)
        f = self.ffn["wo"](torch.nn.functional.gelu(self.ffn["wi_0"](x)) * self.ffn["wi_1"](x))
        return a + b + f


def toy_groups() -> list[PrunableGroup]:
    heads = PrunableGroup("t.attn", "enc_heads", "heads", "language", 0, HEADS, 4 * D * HD,
                          tuple(ParamSlice(f"attn.{n}", "weight", 0, HD) for n in "qkv")
                          + (ParamSlice("attn.o", "weight", 1, HD),))
    vit = PrunableGroup("v.attn", "vit_heads", "heads", "vision", 0, HEADS, 4 * D * HD + 3 * HD,
                        tuple(ParamSlice("vit.qkv", "weight", 0, HD, off) for off in (0, D, 2 * D))
                        + tuple(ParamSlice("vit.qkv", "bias", 0, HD, off) for off in (0, D, 2 * D))
                        + (ParamSlice("vit.projection", "weight", 1, HD),))
    ffn = PrunableGroup("t.ffn", "enc_ffn", "channels", "language", 0, FF, 3 * D,
                        (ParamSlice("ffn.wi_0", "weight", 0, 1), ParamSlice("ffn.wi_1", "weight", 0, 1),
                         ParamSlice("ffn.wo", "weight", 1, 1)))
    return [heads, vit, ffn]


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def _batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, D, generator=g), torch.randn(4, D, generator=g)) for _ in range(n)]


def _hand_grads(model, batches):
    """Per-batch gradients in float64 of every weight, computed with autograd.grad on a float64 copy."""
    m64 = Toy().double()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    names = [n for n, _ in m64.named_parameters() if n.endswith("weight")]
    params = [m64.get_parameter(n) for n in names]
    out = []
    for x, y in batches:
        gs = torch.autograd.grad(_loss(m64, x.double(), y.double()), params)
        out.append(dict(zip(names, gs)))
    return out, {n: p.detach() for n, p in zip(names, params)}


def _hand_unit_scores(S: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Explicit loops: sum |S| over every weight a unit owns, divided by that count."""
    res: dict[str, list[float]] = {"t.attn": [], "v.attn": [], "t.ffn": []}
    for h in range(HEADS):
        tot, cnt = 0.0, 0
        for n in ("q", "k", "v"):
            for r in range(h * HD, (h + 1) * HD):
                for j in range(D):
                    tot += float(S[f"attn.{n}.weight"][r, j]); cnt += 1
        for c in range(h * HD, (h + 1) * HD):
            for i in range(D):
                tot += float(S["attn.o.weight"][i, c]); cnt += 1
        res["t.attn"].append(tot / cnt)
        tot, cnt = 0.0, 0
        for third in range(3):
            for r in range(third * D + h * HD, third * D + (h + 1) * HD):
                for j in range(D):
                    tot += float(S["vit.qkv.weight"][r, j]); cnt += 1
        for c in range(h * HD, (h + 1) * HD):
            for i in range(D):
                tot += float(S["vit.projection.weight"][i, c]); cnt += 1
        res["v.attn"].append(tot / cnt)
    for c in range(FF):
        tot, cnt = 0.0, 0
        for n in ("wi_0", "wi_1"):
            for j in range(D):
                tot += float(S[f"ffn.{n}.weight"][c, j]); cnt += 1
        for i in range(D):
            tot += float(S["ffn.wo.weight"][i, c]); cnt += 1
        res["t.ffn"].append(tot / cnt)
    return res


def _rel(a: torch.Tensor, b) -> float:
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a.double() - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("order", ["first", "second", "mix"])
def test_unit_scores_equal_hand_computation(order):
    torch.manual_seed(0)
    model, groups, batches = Toy(), toy_groups(), _batches()
    per_batch, W = _hand_grads(model, batches)
    G = {n: sum(gb[n] for gb in per_batch) for n in W}
    Fi = {n: sum(gb[n] ** 2 for gb in per_batch) / len(per_batch) for n in W}
    if order == "first":
        S = {n: (W[n] * G[n]).abs() for n in W}
    elif order == "second":
        S = {n: (W[n] * Fi[n] * W[n]).abs() for n in W}
    else:
        S = {n: (W[n] * G[n] / len(per_batch) - 0.5 * W[n] * Fi[n] * W[n]).abs() for n in W}
    hand = _hand_unit_scores(S)

    with TaylorScorer(model, groups, order=order) as scorer:
        for x, y in batches:
            scorer.backward(_loss(model, x, y))
        got = scorer.scores()
    tol = 1e-5
    for gid in hand:
        assert got[gid].shape == (len(hand[gid]),)
        assert _rel(got[gid], hand[gid]) <= tol, (gid, got[gid], hand[gid])
    # not vacuous: the first batch alone, or swapped units, fail the same check
    S1 = {n: (W[n] * per_batch[0][n]).abs() for n in W}
    first_only = _hand_unit_scores(S1)
    assert any(_rel(got[g], first_only[g]) > 1e-2 for g in hand)
    assert _rel(got["t.ffn"].flip(0), hand["t.ffn"]) > 1e-2


def test_unit_reduce_matches_scorer_and_checks_input():
    model, groups = Toy(), toy_groups()
    S = {n: torch.rand_like(p) for n, p in model.named_parameters() if n.endswith("weight")}
    hand = _hand_unit_scores(S)
    for g in groups:
        assert _rel(unit_reduce(S, g), hand[g.id]) <= 1e-6
    with pytest.raises(ValueError, match="attn.o.weight"):
        unit_reduce({k: v for k, v in S.items() if k != "attn.o.weight"}, groups[0])


def test_scorer_accumulates_in_fp32_and_clears_grads():
    torch.manual_seed(0)
    model, groups = Toy().to(torch.bfloat16), toy_groups()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.vit["qkv"].bias.requires_grad_(True)
    scorer = TaylorScorer(model, groups)
    assert not model.vit["qkv"].bias.requires_grad  # not scored -> frozen while scoring
    for x, y in _batches(2):
        scorer.backward(_loss(model, x.bfloat16(), y.bfloat16()))
    assert all(a.dtype == torch.float32 for a in scorer.grad_sum.values())
    assert all(p.grad is None for p in scorer.params.values())
    assert scorer.n_batches == 2 and all(bool(torch.isfinite(s).all()) for s in scorer.scores().values())
    scorer.close()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


# ---------------------------------------------------------------------------------------------- tiny BLIP-2
def _score(model, groups, batches, T=0.4, reduction="per_sample_mean"):
    counts = [0, 0]
    with TaylorScorer(model, groups) as scorer:
        for b in batches:
            loss, s, v = selected_loss(model(**b).logits, b["labels"], T, reduction=reduction)
            counts[0] += s
            counts[1] += v
            scorer.backward(loss)
        return scorer.scores(), counts


def _max_rel(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


@pytest.mark.integration
def test_batched_scores_equal_batch1_loop(tiny, make_batch):
    model, processor, groups, images = tiny
    idx = [0, 1, 2, 3]
    full = make_batch(processor, images, idx)
    assert (full["labels"] == -100).any() and (full["attention_mask"] == 0).any()  # padding really present
    batched, (n_sel, n_val) = _score(model, groups, [full])
    assert 0 < n_sel < n_val  # T = 0.4 selects a strict subset here
    single, (n_sel1, _) = _score(model, groups, [make_batch(processor, images, [i]) for i in idx])
    assert n_sel1 == n_sel
    assert set(batched) == {g.id for g in groups}
    assert _max_rel(batched, single) <= 1e-5
    halves, _ = _score(model, groups, [make_batch(processor, images, idx[:2]),
                                       make_batch(processor, images, idx[2:])])
    assert _max_rel(halves, batched) <= 1e-5
    # not vacuous: a batch-level token mean is not batch-additive and fails the same check
    token_mean, _ = _score(model, groups, [full], reduction="token_mean")
    assert _max_rel(token_mean, single) > 1e-2
    assert all(float(s.max()) > 0 for s in batched.values())
    assert not any(p.grad is not None for p in model.parameters())
    assert math.isfinite(sum(float(s.sum()) for s in batched.values()))


@pytest.mark.parametrize("sparse", [None, False])
@pytest.mark.parametrize("zero_rows", [0, 4])
def test_tracked_linear_backward_equals_dense(zero_rows, sparse):
    """``_TrackedLinear``: the same output and input gradient as a Linear; the sink's factors give the weight
    gradient; rows with no gradient are skipped (sparse branch below 90 % of rows, dense branch otherwise);
    ``sparse=False`` (a GPU's default: no host synchronisation) multiplies every row."""
    from ukmp.importance.taylor import _TrackedLinear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    up.view(10, 11)[torch.randperm(10, generator=g)[:zero_rows]] = 0
    seen = []
    y = _TrackedLinear.apply(x, w, bias, lambda gr, xr: seen.append((gr.clone(), xr.clone())), False, sparse)
    gx, gb = torch.autograd.grad(y, (x, bias), up)
    gx_d, gw_d, gb_d = torch.autograd.grad(torch.nn.functional.linear(x, w, bias), (x, w, bias), up)
    assert torch.allclose(y, torch.nn.functional.linear(x, w, bias), rtol=0, atol=1e-12)
    assert torch.allclose(gx, gx_d, rtol=0, atol=1e-12)
    assert torch.allclose(gb, gb_d, rtol=0, atol=1e-12)  # a bias that trains still gets its gradient
    (gr, xr), = seen
    # 4 of 10 zero rows: the sparse branch hands on only the other 6; without the search, all 10
    assert gr.shape[0] == (10 if sparse is False else 10 - zero_rows)
    assert torch.allclose(gr.T @ xr, gw_d, rtol=0, atol=1e-12)
    assert w.grad is None  # the weight's gradient goes to the sink only
    assert float(gw_d.abs().max()) > 0 and float(gx_d.abs().max()) > 0  # not vacuous


def test_tracked_linear_no_rows_and_autocast():
    from ukmp.importance.taylor import _TrackedLinear

    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(6, 4, requires_grad=True)
    calls = []
    gx, = torch.autograd.grad(_TrackedLinear.apply(x, w, None, lambda *a: calls.append(a), False), x,
                              torch.zeros(3, 6))
    assert calls == [] and float(gx.abs().max()) == 0  # no row with a gradient: nothing handed on
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = _TrackedLinear.apply(x, w.detach(), None, None, False)
        y32 = _TrackedLinear.apply(x, w.detach(), None, None, True)  # at_least_fp32: the head's fp32 logits
    assert y16.dtype == torch.bfloat16 and y32.dtype == torch.float32
    with pytest.raises(ValueError, match="weight"):  # a trainable weight without a sink would lose its gradient
        _TrackedLinear.apply(x, w, None, None, False)
    gx16, = torch.autograd.grad(y16.float().sum(), x)
    assert gx16.dtype == torch.float32  # the input's dtype, as autocast's cast would give


@pytest.mark.integration
@pytest.mark.parametrize("order", ["first", "second"])
def test_tracked_linears_equal_grad_path(tiny, make_batch, order):
    """The scorer's tracked Linears (sink straight into fp32 sums, zero rows skipped) give the ``.grad`` path's
    scores to rounding (tolerance 1e-5 of each group's largest score)."""
    model, processor, groups, images = tiny
    batches = [make_batch(processor, images, [0, 1, 2]), make_batch(processor, images, [3])]
    lin = model.get_submodule(next(s.module for s in groups[-1].slices))

    def run(track):
        with TaylorScorer(model, groups, order=order, track_linears=track) as sc:
            assert ("forward" in vars(lin)) == track  # installed while open
            for b in batches:
                loss, _, _ = selected_loss(model(**b).logits, b["labels"], 0.4)
                sc.backward(loss)
            return sc.scores()

    tracked, plain = run(True), run(False)
    assert "forward" not in vars(lin)  # removed on close
    assert _max_rel(tracked, plain) <= 1e-5
    assert not any(p.grad is not None for p in model.parameters())
    # not vacuous: one batch fewer changes the scores well beyond the tolerance
    with TaylorScorer(model, groups, order=order) as sc:
        loss, _, _ = selected_loss(model(**batches[0]).logits, batches[0]["labels"], 0.4)
        sc.backward(loss)
        assert _max_rel(sc.scores(), plain) > 1e-3


@pytest.mark.integration
def test_row_sparse_head_leaves_scores_unchanged(tiny, make_batch):
    from ukmp.importance.taylor import row_sparse_head

    model, processor, groups, images = tiny
    batch = make_batch(processor, images, [0, 1, 2, 3])
    head = model.get_output_embeddings()
    dense, _ = _score(model, groups, [batch])
    with TaylorScorer(model, groups) as scorer:
        with row_sparse_head(model) as ctx:
            assert ctx.head is head and "forward" in vars(head)  # patched while open
            loss, _, _ = selected_loss(model(**batch).logits, batch["labels"], 0.4)
            scorer.backward(loss)
        sparse = scorer.scores()
    assert "forward" not in vars(head)  # restored
    assert _max_rel(sparse, dense) <= 1e-6  # the same products, fewer rows: rounding only
    with row_sparse_head(model) as ctx:  # outside a scorer the head weight trains: no patch
        assert ctx.head is None


@pytest.mark.integration
def test_bf16_compute_dtype_scores_close_to_fp32(tiny, make_batch):
    """``compute_dtype=bfloat16`` runs the matmuls in bf16 (accumulators stay fp32): close, not identical."""
    from ukmp.prune.scoring import taylor_pass

    model, processor, groups, images = tiny
    batches = [make_batch(processor, images, [0, 1]), make_batch(processor, images, [2, 3])]
    fp32, st32 = taylor_pass(model, groups, batches, 0.4)
    bf16, st16 = taylor_pass(model, groups, batches, 0.4, compute_dtype=torch.bfloat16)
    assert all(v.dtype == torch.float32 for v in bf16.values())
    diff = _max_rel(bf16, fp32)
    assert 1e-6 < diff <= 0.1, diff  # bf16 has an 8-bit mantissa (~0.4 % per product); > 1e-6: autocast was on
    assert st16["tokens_total"] == st32["tokens_total"]
