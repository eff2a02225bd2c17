"""Pure LPD losses: normalized MSE and KL by hand, and how lpd_loss combines them."""

from __future__ import annotations

import math

import pytest
import torch

from ukmp.recover.losses import BETAS, kl_teacher_student, lpd_loss, normalized_mse

pytestmark = pytest.mark.unit
TOL = 1e-6


def test_normalized_mse_hand_check_and_scale_invariance():
    fs = torch.tensor([[3.0, 4.0]])  # norm 5 -> [0.6, 0.8]
    ft = torch.tensor([[4.0, 3.0]])  # norm 5 -> [0.8, 0.6]
    assert abs(normalized_mse(fs, ft).item() - 0.04) <= TOL  # ((0.2)^2 + (0.2)^2) / 2
    assert abs(normalized_mse(7.0 * fs, 0.5 * ft).item() - 0.04) <= TOL
    assert normalized_mse(fs, 3.0 * fs).item() <= TOL
    assert normalized_mse(fs, fs + torch.tensor([[0.0, 1.0]])).item() > 1e-4  # not vacuous


def test_normalized_mse_uses_the_whole_batch_norm():
    fs = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])  # B=2; whole-tensor norm sqrt(5), not per sample
    ft = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # norm sqrt(2)
    a, b = fs / math.sqrt(5), ft / math.sqrt(2)
    expected = ((a - b) ** 2).mean().item()
    assert abs(normalized_mse(fs, ft).item() - expected) <= TOL
    per_sample = ((fs / fs.norm(dim=-1, keepdim=True) - ft / ft.norm(dim=-1, keepdim=True)) ** 2).mean().item()
    assert abs(per_sample - expected) > 1e-3  # a per-sample norm would give a different number
    with pytest.raises(ValueError, match="normalized_mse"):
        normalized_mse(fs, ft[:1])


def test_kl_is_zero_on_itself_and_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 11, generator=g)
    assert abs(kl_teacher_student(logits, logits).item()) <= TOL
    assert abs(kl_teacher_student(logits, logits + 5.0).item()) <= TOL  # softmax is shift invariant
    s = torch.tensor([[[0.0, 1.0, 2.0]], [[1.0, 1.0, 1.0]]], dtype=torch.float64)
    t = torch.tensor([[[2.0, 1.0, 0.0]], [[0.0, 0.0, 3.0]]], dtype=torch.float64)
    total = 0.0
    for b in range(2):
        q = [math.exp(x) for x in t[b, 0].tolist()]
        q = [x / sum(q) for x in q]
        p = [math.exp(x) for x in s[b, 0].tolist()]
        p = [x / sum(p) for x in p]
        total += sum(qi * (math.log(qi) - math.log(pi)) for qi, pi in zip(q, p))
    assert abs(kl_teacher_student(s, t).item() - total / 2) <= TOL  # mean over B*L = 2 positions
    assert kl_teacher_student(s, t).item() > 0.1


def test_lpd_loss_weights_families_and_switches_terms():
    g = torch.Generator().manual_seed(1)
    fs = {k: torch.randn(2, 4, 8, generator=g) for k in ("vision.0", "encoder.1", "decoder.1")}
    ft = {k: torch.randn(2, 4, 8, generator=g) for k in fs}
    layers = {"vision": (0,), "encoder": (1,), "decoder": (1,)}
    total, parts = lpd_loss(fs, ft, layers, use_task=False, use_kl=False)
    expected = sum(BETAS[k.split(".")[0]] * normalized_mse(fs[k], ft[k]).item() for k in fs)
    assert abs(total.item() - expected) <= 1e-6 * expected
    assert set(parts) == {"mse_vision", "mse_encoder", "mse_decoder", "loss"}
    sl, tl = torch.randn(2, 5, 9, generator=g), torch.randn(2, 5, 9, generator=g)
    ce = torch.tensor(2.5)
    total, parts = lpd_loss(fs, ft, {}, use_task=True, use_kl=True, ce=ce, student_logits=sl, teacher_logits=tl)
    assert abs(total.item() - (2.5 + kl_teacher_student(sl, tl).item())) <= TOL
    assert set(parts) == {"ce", "kl", "loss"}
    with pytest.raises(ValueError, match="no loss term"):
        lpd_loss(fs, ft, {}, use_task=False, use_kl=False)
    with pytest.raises(ValueError, match="vision.2"):
        lpd_loss(fs, ft, {"vision": (2,)}, use_task=False, use_kl=False)
