"""UPop (BASELINES.md §5.8): schedule, gate values, module floor, sparsity-weight invariance, gating, binary end."""

from __future__ import annotations

import math

import torch

from ukmp.baselines.primitives import total_prunable
from ukmp.baselines.upop import DEFAULTS, Gates, pi_schedule, select_gates, upop_search
from ukmp.models.blip2 import count_parameters


def test_schedule_monotone_small_start_exact_end():
    T, p = 1000, 0.53
    pis = [pi_schedule(t, T, p) for t in range(T)]
    assert all(b >= a for a, b in zip(pis, pis[1:]))
    assert pis[0] < 0.02 * p and pis[-1] == p
    assert pis[T // 2] == math.sqrt(0.5 * (1 - math.cos(math.pi * (T // 2 + 1) / T))) * p


def run(model, groups, calib, p, **opts):
    o = dict(DEFAULTS, steps=6, update_every=2, **opts)
    return upop_search(model, groups, calib, p, o)


def test_gate_values_floor_and_binary_end(base, fresh, calib):
    _, _, groups, _ = base
    p = 0.4 * count_parameters(fresh) / total_prunable(groups)
    seen = []
    acc = {g.id: torch.randn(g.n_units, generator=torch.Generator().manual_seed(i)) for i, g in enumerate(groups)}
    for t in (1, 3, 5):
        pi = pi_schedule(t, 6, p)
        z = select_gates(acc, groups, pi, p)
        seen.append(pi)
        for g in groups:
            vals = set(z[g.id].tolist())
            assert vals <= {1.0, 1.0 - pi / p} or vals <= {1.0, float(torch.tensor(1.0 - pi / p))}
            assert int((z[g.id] == 1).sum()) >= 1, "every module keeps a unit"
    zeta, _, hist = run(fresh, groups, calib, p)
    assert [t for t, _ in hist] == [1, 3, 5] and hist[-1][1] == p
    kept = sum(int((zeta[g.id] == 1).sum()) * g.params_per_unit for g in groups)
    assert all(set(zeta[g.id].tolist()) <= {0.0, 1.0} for g in groups), "binary at the end"
    assert all(int((zeta[g.id] == 1).sum()) >= 1 for g in groups)
    removed = total_prunable(groups) - kept
    assert abs(removed / count_parameters(fresh) - 0.4) <= 0.005, "target budget (±0.5 pp)"


def test_sparsity_weight_does_not_change_the_mask(base, calib):
    import copy

    _, _, groups, _ = base
    p = 0.25
    masks = []
    for w in (0.0, 1e-3, 1.0):
        m = copy.deepcopy(base[0])
        zeta, _, _ = run(m, groups, calib, p, lr=0.0, w_attn=w, w_mlp=w)  # lr 0: fixed task gradients
        masks.append({k: v.clone() for k, v in zeta.items()})
    assert all(torch.equal(masks[0][k], masks[i][k]) for i in (1, 2) for k in masks[0])


def test_search_trains_weights_and_lora_merges(base, calib):
    import copy

    _, _, groups, _ = base
    name = "language_model.encoder.block.0.layer.0.SelfAttention.q.weight"
    for weights in ("full", "lora"):
        m = copy.deepcopy(base[0])
        run(m, groups, calib, 0.25, lr=1e-2, weights=weights)
        assert not torch.equal(m.get_parameter(name), base[0].get_parameter(name)), weights
        assert not m._forward_hooks and all(not x._forward_hooks and not x._forward_pre_hooks for x in m.modules())


def test_zero_gate_hides_the_heads_value_rows(base, fresh):
    from ukmp.testing import make_inputs

    _, _, groups, _ = base
    g = next(x for x in groups if x.id == "text_enc.block.1.attn")
    vit = next(x for x in groups if x.id == "vision.layers.0.attn")
    gates = Gates(fresh, [g, vit])
    gates.set_({g.id: torch.tensor([1.0, 0.0, 1.0, 1.0]), vit.id: torch.tensor([1.0, 1.0, 0.0, 1.0])})
    inputs = make_inputs(fresh, batch=2)
    with torch.no_grad():
        a = fresh(**inputs).logits
        fresh.get_parameter(g.slices[2].name)[16:32] += 5.0  # v rows of head 1
        fresh.get_parameter(vit.slices[0].name)[2 * 64 + 32: 2 * 64 + 48] += 5.0  # ViT v rows of head 2
        b = fresh(**inputs).logits
        fresh.get_parameter(g.slices[2].name)[0:16] += 5.0  # v rows of the open head 0
        c = fresh(**inputs).logits
    gates.close()
    assert torch.allclose(a, b, atol=1e-5), "a closed gate hides its head's value rows"
    assert not torch.allclose(a, c, atol=1e-3), "an open head's value rows matter"
