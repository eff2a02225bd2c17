"""Cross-entropy with the classes last (``ukmp.nll.token_nll``) against a float64 reference, and the two losses that
use it: the baselines' calibration loss (``lm_loss``) and perplexity.

Tolerance: 2e-5 absolute per token (NLLs of ~15 nats; about 1.3e-6 relative), 5x above what the ``[N, V]`` rows
reach on these logits (3.8e-6 on torch 2.13 CPU) and 3x below the old ``[B, V, T]`` layout's error (6.7e-5, biased
low: mean -4.8e-5). Each test shows the old layout fails the same bound.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ukmp.nll import token_nll

V, T, B = 49152, 64, 2  # SmolLM2's vocabulary, LLM-Pruner's 64-token calibration samples
TOL = 2e-5


@pytest.fixture(scope="module")
def wide():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=g) * 3.0
    labels = torch.randint(0, V, (B, T), generator=g)
    ref = F.cross_entropy(logits.double().reshape(-1, V), labels.reshape(-1), reduction="none").view(B, T)
    return logits, labels, ref


def old_layout(logits, labels):
    return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")


def test_token_nll_matches_float64_and_the_old_layout_does_not(wide):
    logits, labels, ref = wide
    err = (token_nll(logits, labels).double() - ref).abs()
    assert float(err.max()) <= TOL
    assert float((old_layout(logits, labels).double() - ref).abs().max()) > TOL  # not vacuous


def test_token_nll_ignores_masked_targets_and_keeps_fp64(wide):
    logits, labels, ref = wide
    masked = labels.clone()
    masked[:, :5] = -100
    got = token_nll(logits, masked)
    assert got.dtype == torch.float32 and bool((got[:, :5] == 0).all())
    assert torch.allclose(got[:, 5:].double(), ref[:, 5:], atol=TOL, rtol=0)
    assert token_nll(logits[:1, :3].double(), labels[:1, :3]).dtype == torch.float64
    assert token_nll(logits[:1, :3].bfloat16(), labels[:1, :3]).dtype == torch.float32
    with pytest.raises(ValueError, match="token_nll"):
        token_nll(logits, labels[:, :-1])


def test_lm_loss_is_within_tolerance_of_float64(wide, monkeypatch):
    """``lm_loss`` over wide logits (the model's forward stubbed): per-sample token means, summed."""
    import ukmp.models
    from ukmp.baselines.primitives import lm_loss

    logits, labels, ref = wide
    labels = labels.clone()
    labels[1, 40:] = -100
    monkeypatch.setattr(ukmp.models, "forward_batch", lambda model, batch: types.SimpleNamespace(logits=logits))
    valid = labels != -100
    want = sum(float(ref[i][valid[i]].mean()) for i in range(B))
    got = float(lm_loss(None, {"labels": labels}, per_sample=True))
    assert abs(got - want) <= TOL
    old = sum(float(old_layout(logits, labels.masked_fill(~valid, 0))[i][valid[i]].mean()) for i in range(B))
    assert abs(old - want) > TOL  # the layout lm_loss used before


class _Windows:
    name = "stub"

    def __init__(self, ids):
        self.ids = ids

    def windows(self, tokenizer):
        return [(0, self.ids)]


def test_perplexity_is_within_tolerance_of_float64(wide, monkeypatch):
    """Perplexity of one 65-token window whose logits are the wide ones (the language model stubbed)."""
    import ukmp.models
    from ukmp.eval.perplexity import evaluate_perplexity

    logits, labels, ref = wide
    ids = [0] + labels[0].tolist()  # position t predicts ids[t + 1] = labels[0, t]
    lm = lambda input_ids, attention_mask: types.SimpleNamespace(  # noqa: E731
        logits=torch.cat([logits[:1], torch.zeros(1, 1, V)], 1))
    adapter = types.SimpleNamespace(batch_layout=lambda: types.SimpleNamespace(decoder_only=True),
                                    language_model=lambda model: lm, name="stub")
    monkeypatch.setattr(ukmp.models, "adapter_for", lambda model: adapter)
    metrics, _ = evaluate_perplexity(nn.Linear(1, 1), None, _Windows(ids), batch_size=1, progress=False)
    want = float(ref[0].mean())
    assert metrics["tokens"] == T and abs(metrics["nll"] - want) <= TOL / 10  # a mean: the errors average out
    old = float(old_layout(logits[:1], labels[:1]).double().mean())
    assert abs(old - want) > TOL / 10  # the old layout's bias does not average out
    assert math.isclose(metrics["perplexity"], math.exp(metrics["nll"]))
