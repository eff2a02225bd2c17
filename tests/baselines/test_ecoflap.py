"""ECoFLaP_sp (BASELINES.md §3.7): the zeroth-order estimate, restoration, cap and the fine step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ukmp.baselines.ecoflap import block_tensors, sparsity_cap, zeroth_order_scores
from ukmp.baselines.primitives import lm_loss
from ukmp.prune.scoring import get_method


def test_quadratic_central_difference_is_exact_and_mean_abs_matches():
    g = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(6, 5, generator=g, dtype=torch.float64))
    w_star = torch.randn(6, 5, generator=g, dtype=torch.float64)
    loss = lambda _b: float(0.5 * ((w - w_star) ** 2).sum())  # noqa: E731
    # one draw per "batch": s = Σ_b |ĝ_b|, and each ĝ_b = zᵀ(W − W*) exactly
    n = 10_000
    s, _ = zeroth_order_scores({"w": w}, loss, list(range(n)), eps=1e-3, seed=1)
    norm = float((w.detach() - w_star).norm())
    assert s["w"] / n == pytest.approx(math.sqrt(2 / math.pi) * norm, rel=0.03), "E|ĝ| = √(2/π)‖W − W*‖ (3%)"
    one, _ = zeroth_order_scores({"w": w}, loss, [0], eps=1e-3, seed=1)
    z = torch.randn(6, 5, generator=torch.Generator().manual_seed(1 * 1_000_003), dtype=torch.float32).double()
    assert one["w"] == pytest.approx(abs(float((z * (w.detach() - w_star)).sum())), rel=1e-6, abs=1e-9)
    assert one["w"] != pytest.approx(abs(float((z * w.detach()).sum())), rel=1e-3)  # W* matters


def test_zeroth_order_sign_agrees_with_true_gradient_on_smooth_toy():
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)  # the layers' init must not depend on what ran before
    lin1, lin2 = nn.Linear(4, 8).double(), nn.Linear(8, 1).double()
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    f = lambda: (torch.tanh(lin1(x)) @ lin2.weight.t()).pow(2).mean()  # noqa: E731
    grad, = torch.autograd.grad(f(), lin1.weight)
    eps = 1e-4
    for k in range(20):
        z = torch.randn(lin1.weight.shape, generator=g, dtype=torch.float64)
        saved = lin1.weight.detach().clone()
        with torch.no_grad():
            lin1.weight.copy_(saved + eps * z)
            lp = float(f())
            lin1.weight.copy_(saved - eps * z)
            lm = float(f())
            lin1.weight.copy_(saved)
        est, true = (lp - lm) / (2 * eps), float((z * grad).sum())
        assert math.copysign(1, est) == math.copysign(1, true)
        # central difference: truncation error eps² · (third directional derivative) / 6 ~ 1e-8 here, plus 1e-5 rel
        assert abs(est - true) <= 1e-5 * abs(true) + 1e-7, f"ĝ {est} vs zᵀ∇L {true} (rel 1e-5 + 1e-7)"
        assert abs(est - (-true)) > 1e-5 * abs(true) + 1e-7 or abs(true) < 1e-7  # not vacuous: the sign matters


def test_weights_are_bit_identical_after_scoring(base, fresh):
    _, _, groups, batches = base
    names = [n for ns in block_tensors(groups).values() for n in ns]
    assert len(names) == 44  # 2 ViT blocks × 4 + 2 encoder blocks × 7 + 2 decoder blocks × 11
    before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    fresh.eval()
    scores, stats = zeroth_order_scores({n: fresh.get_parameter(n) for n in names[:6]},
                                        lambda b: float(lm_loss(fresh, b)), batches[:1], eps=1e-3)
    assert all(torch.equal(before[n], p) for n, p in fresh.named_parameters())
    assert all(v > 0 for v in scores.values()) and stats["zo_min_abs_loss_diff"] > 1e-7
    with torch.no_grad():  # run-to-run noise of the loss is far below |L+ − L−|
        noise = abs(float(lm_loss(fresh, batches[0])) - float(lm_loss(fresh, batches[0])))
    assert noise < 0.01 * stats["zo_min_abs_loss_diff"]


def test_cap_modes():
    assert sparsity_cap(0.5, 0.5327, "corrected") == pytest.approx(0.6327)
    assert sparsity_cap(0.2, 0.2131, "ukmp") == pytest.approx(0.9)
    assert sparsity_cap(0.9, 0.9, "corrected") == 0.95
    with pytest.raises(ValueError, match="cap"):
        sparsity_cap(0.9, 0.96, "corrected")


def test_block_sparsities_respect_cap_and_budget(base, fresh, calib, pcfg):
    _, _, groups, _ = base
    res = get_method("ecoflap_sp")(fresh, groups, calib, pcfg("ecoflap_sp", 0.4, ecoflap={"zo_samples": 4}), 2)
    meta = res.plan.meta
    sizes = {}
    for g in groups:
        blk = g.id.rsplit(".", 1)[0]
        sizes[blk] = sizes.get(blk, 0) + g.total_params
    kept = sum((1 - s) * sizes[b] for b, s in meta["block_sparsity"].items())
    assert kept == pytest.approx(sum(sizes.values()) - 0.4 * 328_512, abs=1.0)
    assert all(0 <= s <= meta["cap"] + 1e-12 for s in meta["block_sparsity"].values())
    assert len(set(round(s, 6) for s in meta["block_sparsity"].values())) > 1, "non-uniform blocks"
