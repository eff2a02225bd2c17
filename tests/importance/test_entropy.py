"""Angle-histogram entropy: numpy references, streaming invariance, hook placement on the tiny BLIP-2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ukmp.groups import ParamSlice, PrunableGroup
from ukmp.importance.entropy import (
    StreamingAngleHistogram,
    bin_edges,
    cosine_counts,
    cosines,
    entropy_modules,
    histogram_counts,
    histogram_entropy,
    inverse_norms,
    unit_entropies,
    unit_entropy,
)

pytestmark = pytest.mark.unit


def _np_entropy(counts: np.ndarray) -> np.ndarray:
    p = counts / counts.sum(axis=-1, keepdims=True)
    return -(p * np.log(p + 1e-12)).sum(axis=-1)


@pytest.mark.parametrize("angle", [False, True])
def test_histogram_counts_equal_numpy(angle):
    g = torch.Generator().manual_seed(0)
    vals = torch.rand(500, 7, generator=g) * 2 - 1
    edges = bin_edges(100, angle)
    vals[:4, 0] = torch.tensor([-1.0, 1.0, 0.0, -0.98])  # range ends and interior edges
    vals[4:104, 1] = edges[:-1].float()  # every left edge (float32-rounded)
    if angle:
        vals = torch.arccos(vals.clamp(-1, 1))
    lo_hi = (0.0, math.pi) if angle else (-1.0, 1.0)
    got = histogram_counts(vals, edges)
    assert got.dtype == torch.float32 and got.shape == (7, 100)
    for j in range(7):
        ref, ref_edges = np.histogram(vals[:, j].double().numpy(), bins=100, range=lo_hi)
        assert np.array_equal(ref_edges, edges.numpy())
        assert np.array_equal(got[j].numpy(), ref.astype(np.float32)), j  # exact, tolerance 0
    # not vacuous: a plain float32 linspace edge set disagrees on the planted edge values
    bad = histogram_counts(vals, torch.linspace(*lo_hi, 101, dtype=torch.float32).double() + 1e-9)
    assert not torch.equal(bad, got)


@pytest.mark.parametrize("angle", [False, True])
def test_histogram_counts_next_to_every_edge_equal_numpy(angle):
    """The fast binning re-bins values within 1e-3 bin widths of an edge against the float64 edges: the float32
    neighbours just below, at and just above every edge land where numpy puts them; values outside the range
    are dropped."""
    edges = bin_edges(100, angle)
    e32 = edges.float()
    near = torch.cat([torch.nextafter(e32, torch.full_like(e32, -9.0)), e32,
                      torch.nextafter(e32, torch.full_like(e32, 9.0))])
    g = torch.Generator().manual_seed(1)
    lo, hi = float(edges[0]), float(edges[-1])
    bulk = torch.rand(794, generator=g) * (hi - lo) + lo
    vals = torch.stack([torch.cat([near, bulk[:397]]), torch.cat([bulk[397:], near])], dim=1)  # [700, 2]
    got = histogram_counts(vals, edges)
    for j in range(2):
        ref, _ = np.histogram(vals[:, j].double().numpy(), bins=100, range=(lo, hi))
        assert np.array_equal(got[j].numpy(), ref.astype(np.float32)), j  # exact, tolerance 0
    assert float(got.sum()) < 1400  # not vacuous: the values just outside the range were dropped
    # not vacuous: plain floor((v - lo) / width) in float32, without the re-binning, differs from numpy here
    naive = ((vals[:, 0] - lo) * (100 / (hi - lo))).long().clamp(0, 99)
    inside = (vals[:, 0].double() >= lo) & (vals[:, 0].double() <= hi)
    naive_counts = torch.bincount(naive[inside], minlength=100).float()
    assert not torch.equal(naive_counts, got[0])


def test_histogram_entropy_equals_numpy_and_is_bounded():
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 20, (9, 100), generator=g).float()
    counts[0] = 0
    counts[0, 17] = 33  # a single occupied bin -> 0
    counts[1] = 5  # uniform -> ln 100
    h = histogram_entropy(counts)
    ref = _np_entropy(counts.double().numpy())
    assert np.abs(h.double().numpy() - ref).max() <= 1e-6
    assert abs(float(h[0])) <= 1e-9 and abs(float(h[1]) - math.log(100)) <= 1e-6
    assert bool((h >= -1e-9).all()) and bool((h <= math.log(100) + 1e-6).all())
    assert float(histogram_entropy(torch.zeros(100))) == 0.0  # empty histogram
    assert abs(float(h[2]) - float(h[3])) > 1e-3  # not vacuous: different histograms differ


class OneLinear(nn.Module):
    def __init__(self, d_in=8, d_out=5):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("angle", [False, True])
def test_streaming_equals_one_shot_and_numpy(angle):
    torch.manual_seed(0)
    model = OneLinear()
    x = torch.randn(3, 40, 8)
    one = StreamingAngleHistogram(model, [], modules=["lin"], angle=angle)
    with torch.no_grad():
        model(x)  # one shot: every token in a single chunk
    one.close()
    chunked = StreamingAngleHistogram(model, [], modules=["lin"], angle=angle, chunk_elements=7)
    with torch.no_grad():
        for part in (x[:1], x[1:, :15], x[1:, 15:]):  # three forwards, each split into 1-token chunks
            model(part)
    chunked.close()
    assert torch.equal(one.counts["lin"], chunked.counts["lin"])  # exact
    assert one.tokens_seen()["lin"] == 120
    # numpy reference on independently computed cosines
    X = x.reshape(-1, 8).double().numpy()
    W = model.lin.weight.detach().double().numpy()
    cos = (X @ W.T) / (np.linalg.norm(X, axis=1)[:, None] * np.linalg.norm(W, axis=1)[None, :])
    ours = cosines(x.reshape(-1, 8), model.lin.weight.detach())
    assert np.abs(ours.double().numpy() - cos).max() <= 1e-5
    vals = torch.arccos(ours) if angle else ours  # np.histogram on the very same values
    lo_hi = (0.0, math.pi) if angle else (-1.0, 1.0)
    ref = np.stack([np.histogram(vals[:, j].double().numpy(), bins=100, range=lo_hi)[0] for j in range(5)])
    assert np.array_equal(one.counts["lin"].numpy(), ref.astype(np.float32))
    h = one.entropy()["lin"]
    assert np.abs(h.double().numpy() - _np_entropy(ref.astype(np.float64))).max() <= 1e-6
    assert bool((h > 0).all()) and bool((h <= math.log(100)).all())
    # not vacuous: fewer tokens give other histograms
    short = StreamingAngleHistogram(model, [], modules=["lin"], angle=angle)
    with torch.no_grad():
        model(x[:1])
    short.close()
    assert not torch.equal(short.counts["lin"], one.counts["lin"])


def test_bias_free_linear_reuses_its_output():
    """A bias-free Linear's histograms come from its own output divided by the norms (no second product): the
    counts are numpy's histogram of exactly those cosines, which agree with float64 cosines to 1e-6."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6, bias=False))
    x = torch.randn(4, 30, 8)
    hist = StreamingAngleHistogram(model, [], modules=["0"], chunk_elements=50)
    calls = []
    import ukmp.importance.entropy as E
    real = E.cosine_counts

    def spy(output, inv_x, inv_w, edges):
        calls.append(output.shape)
        return real(output, inv_x, inv_w, edges)

    E.cosine_counts = spy
    try:
        with torch.no_grad():
            model(x)
    finally:
        E.cosine_counts = real
        hist.close()
    assert sum(c[0] for c in calls) == 120 and len(calls) > 1  # every token, in chunks, from the Linear's output
    X, W = x.reshape(-1, 8), model[0].weight.detach()
    ours = cosines(X, W, output=X @ W.T)
    X64, W64 = X.double().numpy(), W.double().numpy()
    cos64 = (X64 @ W64.T) / (np.linalg.norm(X64, axis=1)[:, None] * np.linalg.norm(W64, axis=1)[None, :])
    assert np.abs(ours.double().numpy() - cos64).max() <= 1e-6
    ref = np.stack([np.histogram(ours[:, j].double().numpy(), bins=100, range=(-1, 1))[0] for j in range(6)])
    assert np.array_equal(hist.counts["0"].numpy(), ref.astype(np.float32))
    with pytest.raises(ValueError, match="output"):
        cosines(X, W, output=(X @ W.T)[:, :3])


def test_cosine_counts_equal_two_step_route_next_to_edges():
    """``cosine_counts`` (bins straight from a Linear's output) equals ``histogram_counts(cosines(...))``
    exactly, including cosines planted next to every bin edge and at +-1."""
    edges = bin_edges(100, False)
    e32 = edges.float()
    planted = torch.cat([torch.nextafter(e32, torch.full_like(e32, -9.0)), e32,
                         torch.nextafter(e32, torch.full_like(e32, 9.0))]).clamp(-1, 1)
    g = torch.Generator().manual_seed(2)
    y = torch.rand(303, 4, generator=g) * 2 - 1
    y[:, 1] = planted  # unit norms below: the output is the cosine itself
    ones_x, ones_w = torch.ones(303), torch.ones(4)
    got = cosine_counts(y, ones_x, ones_w, edges)
    ref = histogram_counts(y.clamp(-1, 1), edges)  # inverse norms 1: the cosines are the output itself
    assert torch.equal(got, ref)  # exact, tolerance 0
    # general norms: equal to the route through cosines() on a real product
    x, w = torch.randn(50, 8, generator=g), torch.randn(6, 8, generator=g)
    out = x @ w.T
    assert torch.equal(cosine_counts(out, inverse_norms(x), inverse_norms(w), edges),
                       histogram_counts(cosines(x, w, output=out), edges))
    # not vacuous: the planted column is not what plain floor((c + 1) * 50) gives
    naive = torch.bincount(((y[:, 1] + 1) * 50).long().clamp(0, 99), minlength=100).float()
    assert not torch.equal(naive, got[1])


def test_unit_entropy_hand():
    heads = PrunableGroup("a", "enc_heads", "heads", "language", 0, 2, 4 * 6 * 3,
                          tuple(ParamSlice(f"m.{n}", "weight", 0, 3) for n in "qkv")
                          + (ParamSlice("m.o", "weight", 1, 3),))
    ffn = PrunableGroup("f", "enc_ffn", "channels", "language", 0, 4, 18,
                        (ParamSlice("m.wi_0", "weight", 0, 1), ParamSlice("m.wi_1", "weight", 0, 1),
                         ParamSlice("m.wo", "weight", 1, 1)))
    g = torch.Generator().manual_seed(0)
    H = {f"m.{n}": torch.rand(6, generator=g) for n in "qkv"}
    H.update({"m.wi_0": torch.rand(4, generator=g), "m.wi_1": torch.rand(4, generator=g)})
    got = unit_entropy(H, heads)
    for h in range(2):
        vals = [float(H[f"m.{n}"][r]) for n in "qkv" for r in range(3 * h, 3 * h + 3)]
        assert abs(float(got[h]) - sum(vals) / len(vals)) <= 1e-6
    got_f = unit_entropy(H, ffn)
    for c in range(4):
        assert abs(float(got_f[c]) - (float(H["m.wi_0"][c]) + float(H["m.wi_1"][c])) / 2) <= 1e-6
    assert entropy_modules([heads, ffn]) == ["m.q", "m.k", "m.v", "m.wi_0", "m.wi_1"]  # no o / wo
    with pytest.raises(ValueError, match="m.wi_1"):
        unit_entropy({k: v for k, v in H.items() if k != "m.wi_1"}, ffn)


@pytest.mark.integration
def test_tiny_blip2_hooks_and_token_counts(tiny, make_batch):
    model, processor, groups, images = tiny
    batch = make_batch(processor, images, [0, 1, 2])
    hist = StreamingAngleHistogram(model, groups)
    hist_np = StreamingAngleHistogram(model, groups, exclude_padding=True)
    names = list(hist.counts)
    assert len(names) == 2 * 5 + 2 * 8  # enc q,k,v,wi_0,wi_1; dec self q,k,v, cross q,k,v, wi_0, wi_1
    assert all(n.startswith("language_model.") and n.rsplit(".", 1)[1] in ("q", "k", "v", "wi_0", "wi_1")
               for n in names)
    with torch.no_grad(), hist_np.token_masks(batch["attention_mask"], batch["decoder_attention_mask"]):
        model(**batch)
    hist.close()
    hist_np.close()
    B, Le = batch["input_ids"].shape
    Ld = batch["labels"].shape[1]
    n_enc, n_dec = int(batch["attention_mask"].sum()), int(batch["decoder_attention_mask"].sum())
    for n, seen in hist.tokens_seen().items():
        enc_side = ".encoder." in n or (".EncDecAttention." in n and n[-1] in "kv")
        assert seen == (B * Le if enc_side else B * Ld), n
        assert hist_np.tokens_seen()[n] == (n_enc if enc_side else n_dec), n
        assert torch.equal(hist.counts[n].sum(dim=1), torch.full_like(hist.counts[n][:, 0], seen))
    assert n_enc < B * Le and n_dec < B * Ld  # padding present: excluding it changes the histograms
    H = hist.entropy()
    assert all(bool((h > 0).all()) and bool((h <= math.log(100) + 1e-6).all()) for h in H.values())
    units = unit_entropies(H, groups)
    lang = [g for g in groups if g.modality == "language"]
    assert set(units) == {g.id for g in lang}
    assert all(units[g.id].shape == (g.n_units,) for g in lang)
    with pytest.raises(ValueError, match="token mask"):
        bad = StreamingAngleHistogram(model, groups, exclude_padding=True)
        try:
            with torch.no_grad():
                model(**batch)
        finally:
            bad.close()


@pytest.mark.integration
def test_entropy_pass_batched_equals_batch1_loop(tiny, make_batch):
    """With padding excluded (the default) a batch gives the batch-1 histograms; with padding it does not."""
    from ukmp.prune.scoring import entropy_pass

    model, processor, groups, images = tiny
    idx = [0, 1, 2, 3]
    full = make_batch(processor, images, idx)
    assert (full["attention_mask"] == 0).any() and (full["labels"] == -100).any()
    batched = entropy_pass(model, groups, [full])
    single = entropy_pass(model, groups, [make_batch(processor, images, [i]) for i in idx])
    # tolerance: a token whose cosine sits within fp32 rounding of a bin edge may change bin between the two
    # shapes of matmul; one such move shifts a neuron's entropy by O(1/tokens) ~ 1e-2 at most here; none occur
    # in practice, so 1e-5 holds
    assert all(torch.allclose(batched[k], single[k], rtol=0, atol=1e-5) for k in single)
    padded = entropy_pass(model, groups, [full], exclude_padding=False)
    assert max(float((padded[k] - single[k]).abs().max()) for k in single) > 1e-3


@pytest.mark.integration
def test_entropy_pass_skips_the_vocabulary_projection(tiny, make_batch):
    """The entropy pass needs no logits: the vocabulary projection returns zeros while it runs (its product is
    skipped), the histograms are unchanged, and the projection is restored afterwards."""
    import contextlib

    from ukmp.prune import scoring

    model, processor, groups, images = tiny
    batch = make_batch(processor, images, [0, 1, 2])
    head = model.get_output_embeddings()
    seen = []
    handle = head.register_forward_hook(lambda m, i, o: seen.append(float(o.abs().max())))
    try:
        skipped = scoring.entropy_pass(model, groups, [batch])
        real = scoring._vocabulary_skipped
        scoring._vocabulary_skipped = lambda m, h: contextlib.nullcontext()
        try:
            full = scoring.entropy_pass(model, groups, [batch])
        finally:
            scoring._vocabulary_skipped = real
    finally:
        handle.remove()
    assert seen[0] == 0.0 and seen[1] > 0  # zeros while skipped; not vacuous: the real logits are not zero
    assert "forward" not in vars(head)
    assert all(torch.equal(skipped[k], full[k]) for k in full)


def test_gpu_style_binning_without_host_sync_gives_the_same_counts(monkeypatch):
    """Off the CPU the near-edge values are re-binned with a ``where`` over every value instead of a looked-up
    position list (no host synchronisation); forced on the CPU here, the counts are identical."""
    import ukmp.importance.entropy as E

    edges = bin_edges(100, False)
    e32 = edges.float()
    planted = torch.cat([torch.nextafter(e32, torch.full_like(e32, -9.0)), e32,
                         torch.nextafter(e32, torch.full_like(e32, 9.0))])
    g = torch.Generator().manual_seed(3)
    vals = torch.stack([planted.clamp(-1, 1), torch.rand(303, generator=g) * 2 - 1], dim=1)
    x, w = torch.randn(40, 8, generator=g), torch.randn(5, 8, generator=g)
    out = x @ w.T
    cpu = (histogram_counts(vals, edges), cosine_counts(out, inverse_norms(x), inverse_norms(w), edges))
    monkeypatch.setattr(E, "_host_synchronising", lambda device: False)
    gpu_style = (histogram_counts(vals, edges), cosine_counts(out, inverse_norms(x), inverse_norms(w), edges))
    assert all(torch.equal(a, b) for a, b in zip(cpu, gpu_style))  # exact, tolerance 0
    assert float(cpu[0][0].sum()) == 303  # not vacuous: the planted column is all counted
