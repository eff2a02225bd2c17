"""magnitude-sp (BASELINES.md §6.6) and Wanda-sp (§7.6)."""

from __future__ import annotations

import copy

import torch

from ukmp.baselines.magnitude import magnitude_scores, out_proj_norms
from ukmp.baselines.primitives import uniform_local
from ukmp.baselines.stats import RunningMoments
from ukmp.baselines.wanda import out_proj_wanda, sequential_plan


def test_out_proj_hand_example():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    s = out_proj_norms(w, 1)
    assert s.tolist() == [3.0, 4.0]
    from ukmp.groups import ParamSlice, PrunableGroup

    g = PrunableGroup("text_enc.block.0.ffn", "enc_ffn", "channels", "language", 0, 2, 6,
                      (ParamSlice("x.wo", "weight", 1, 1),))
    assert uniform_local({g.id: s}, [g], 0.5).removed(g) == [0]


def test_group_l1_is_mean_over_the_groups_linears(base):
    model = base[0]
    g = next(x for x in base[2] if x.id == "text_dec.block.0.ffn")
    s = magnitude_scores(model, [g], "group", p=1)[g.id]
    wi0, wi1, wo = (model.get_parameter(sl.name).detach() for sl in g.slices)
    c = 17
    want = (wi0[c].abs().sum() + wi1[c].abs().sum() + wo[:, c].abs().sum()) / 3
    assert torch.allclose(s[c], want, rtol=1e-6)
    assert not torch.allclose(s[c + 1], want, rtol=1e-3)


def test_scaling_a_unit_never_lowers_its_rank(base):
    model = copy.deepcopy(base[0])
    g = next(x for x in base[2] if x.id == "vision.layers.1.attn")
    for scope in ("group", "out_proj"):
        before = magnitude_scores(model, [g], scope)[g.id]
        with torch.no_grad():
            for sl in g.slices:
                if sl.param == "weight":
                    w = model.get_parameter(sl.name)
                    idx = sl.indices(torch.tensor([3]))
                    w.index_copy_(sl.dim, idx, w.index_select(sl.dim, idx) * 3.0)
        after = magnitude_scores(model, [g], scope)[g.id]
        assert int((after > after[3]).sum()) <= int((before > before[3]).sum()) and float(after[3]) > float(before[3])
        model = copy.deepcopy(base[0])


def moments_from(x):
    m = RunningMoments(x.shape[-1], torch.device("cpu"))
    m.add(x)
    return m


def test_wanda_uniform_inputs_rank_like_l1_columns_and_scaling_and_zero_input():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 8, generator=g)
    x = torch.randn(100, 8, generator=g)
    x = x / x.pow(2).mean(0).sqrt()  # every ‖X_j‖ equal to 1
    s = out_proj_wanda(w, moments_from(x).mean_square().sqrt(), 1)
    assert torch.equal(torch.argsort(s), torch.argsort(w.abs().sum(0)))
    x2 = x.clone()
    x2[:, 3] *= -2.5
    s2 = out_proj_wanda(w, moments_from(x2).mean_square().sqrt(), 1)
    assert torch.allclose(s2[3], 2.5 * s[3], rtol=1e-5)
    assert torch.allclose(s2[[0, 1, 2, 4, 5, 6, 7]], s[[0, 1, 2, 4, 5, 6, 7]], rtol=1e-6)
    x3 = x.clone()
    x3[:, 6] = 0
    s3 = out_proj_wanda(w, moments_from(x3).mean_square().sqrt(), 1)
    assert float(s3[6]) == 0.0
    from ukmp.groups import ParamSlice, PrunableGroup

    grp = PrunableGroup("text_enc.block.0.ffn", "enc_ffn", "channels", "language", 0, 8, 10,
                        (ParamSlice("x.wo", "weight", 1, 1),))
    assert 6 in uniform_local({grp.id: s3}, [grp], 1 / 8).removed(grp)


def test_sequential_statistics_see_earlier_pruning(base, calib):
    model, _, groups, _ = base
    _, _, trace = sequential_plan(model, groups, calib, 0.5, "out_proj")
    dense = copy.deepcopy(model)
    keep_all_plan, _, dense_trace = sequential_plan(dense, groups, calib, 0.0, "out_proj")
    assert all(len(v) == g.n_units for g in groups for k, v in keep_all_plan.keep.items() if k == g.id)
    first = trace[0]["moments"]
    assert all(torch.allclose(first[k], dense_trace[0]["moments"][k]) for k in first), "block 0 sees the dense model"
    later = trace[1]["moments"]
    assert any(not torch.allclose(later[k], dense_trace[1]["moments"][k], rtol=1e-3) for k in later), \
        "block 1 statistics change once block 0 lost units"
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), dense.parameters())), "masks are restored"
