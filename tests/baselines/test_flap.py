"""FLAP (BASELINES.md §4.8): fluctuation statistics, standardisation, bias compensation, T5 output biases."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ukmp.baselines.flap import channel_metric, compensate_bias_, make_pre_apply, standardize
from ukmp.baselines.stats import RunningMoments, collect_input_stats
from ukmp.io import load_pruned, save_pruned
from ukmp.models.blip2 import Blip2T5Adapter
from ukmp.plan import PruningPlan
from ukmp.prune.scoring import get_method


def test_welford_matches_direct_and_constant_channel_has_zero_fluctuation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 6, generator=g) * 3 + 1
    x[..., 2] = 4.25  # a constant input channel
    m = RunningMoments(6, torch.device("cpu"))
    for b in x:
        m.add(b)
    flat = x.reshape(-1, 6).double()
    assert torch.allclose(m.variance().double(), flat.var(0, unbiased=True), rtol=1e-5, atol=1e-6)
    assert torch.allclose(m.mean.double(), flat.mean(0), atol=1e-5)
    w = torch.randn(5, 6, generator=g)
    wifv = channel_metric(w, m, "wifv")
    assert float(wifv[2]) == pytest.approx(0.0, abs=1e-9) and bool((wifv[[0, 1, 3, 4, 5]] > 1e-2).all())


def test_padding_is_excluded(base):
    model, _, _, batches = base
    path = "language_model.encoder.block.0.layer.1.DenseReluDense.wo"
    b = batches[0]
    assert bool((b["attention_mask"] == 0).any()), "the fixture batch must contain padding"
    stats = collect_input_stats(model, [path], [b])[path]
    seen = []
    h = model.get_submodule(path).register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(**b)
    h.remove()
    valid = seen[0][b["attention_mask"].bool()].double()
    assert stats.n == valid.shape[0] < seen[0].shape[0] * seen[0].shape[1]
    assert torch.allclose(stats.variance().double(), valid.var(0), rtol=1e-4, atol=1e-7)


def test_standardize_gives_zero_mean_unit_std():
    x = torch.rand(128) * 10
    z = standardize(x)
    assert abs(float(z.mean())) < 1e-6 and float(z.std(unbiased=True)) == pytest.approx(1.0, abs=1e-5)


def test_compensation_exact_for_constant_pruned_channels():
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(6, 4)
    x = torch.randn(40, 6, generator=g)
    x[:, [1, 4]] = torch.tensor([0.7, -2.0])  # the channels to prune are constant
    dense = lin(x).detach()
    mean = x.mean(0)
    compensate_bias_(lin, torch.tensor([1, 4]), mean)
    keep = torch.tensor([0, 2, 3, 5])
    pruned = x[:, keep] @ lin.weight[:, keep].t() + lin.bias
    assert torch.allclose(pruned, dense, atol=1e-5)
    lin2 = nn.Linear(6, 4)
    x2 = torch.randn(40, 6, generator=g)
    d2 = lin2(x2).detach()
    compensate_bias_(lin2, torch.tensor([1, 4]), x2.mean(0))
    p2 = x2[:, keep] @ lin2.weight[:, keep].t() + lin2.bias
    assert torch.allclose(p2.mean(0), d2.mean(0), atol=1e-5), "varying channels: the mean is preserved"
    assert not torch.allclose(p2, d2, atol=1e-2), "... but not every token (the check is not vacuous)"


@pytest.mark.parametrize("gid,out", [("vision.layers.0.mlp", "vision_model.encoder.layers.0.mlp.fc2"),
                                     ("text_enc.block.0.ffn", "language_model.encoder.block.0.layer.1.DenseReluDense.wo")])
def test_pruned_layer_keeps_the_dense_output_mean(base, fresh, gid, out):
    _, _, groups, batches = base
    g = next(x for x in groups if x.id == gid)
    plan = PruningPlan(keep={gid: list(range(0, g.n_units, 2))}, units={gid: g.n_units})
    if gid.startswith("text"):
        plan.out_bias = [out]
    moments = collect_input_stats(fresh, [out], batches)
    dense_out = collect_output_mean(fresh, out, batches)
    adapter = Blip2T5Adapter(fresh.config)
    adapter.add_out_biases_(fresh, plan.out_bias)
    make_pre_apply(groups, {out: moments[out].mean})(fresh, plan)
    adapter.apply_(fresh, plan)
    pruned_out = collect_output_mean(fresh, out, batches)
    assert torch.allclose(pruned_out, dense_out, atol=1e-5), f"{gid}: output mean moved"
    nocomp = copy.deepcopy(base[0])
    Blip2T5Adapter(nocomp.config).apply_(nocomp, PruningPlan(keep=dict(plan.keep), units=dict(plan.units)))
    assert not torch.allclose(collect_output_mean(nocomp, out, batches), dense_out, atol=1e-3)


def collect_output_mean(model, path, batches):
    from ukmp.baselines.stats import token_mask_key

    outs = []
    key = token_mask_key(path)

    def hook(_m, _a, y):
        outs.append(y.detach())

    h = model.get_submodule(path).register_forward_hook(hook)
    tot, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            outs.clear()
            model(**b)
            y = outs[0]
            flat = y.reshape(-1, y.shape[-1]) if key is None else y[b[key].bool()]
            tot = tot + flat.double().sum(0)
            n += flat.shape[0]
    h.remove()
    return (tot / n).float()


def test_flap_plan_adds_t5_biases_that_survive_reload(base, fresh, calib, pcfg, tmp_path):
    _, processor, groups, _ = base
    res = get_method("flap")(fresh, groups, calib, pcfg("flap", 0.4), 2)
    plan = res.plan
    assert plan.out_bias and all(p.startswith("language_model") for p in plan.out_bias)
    adapter = Blip2T5Adapter(fresh.config)
    adapter.add_out_biases_(fresh, plan.out_bias)
    res.pre_apply(fresh, plan)
    adapter.apply_(fresh, plan)
    o = plan.out_bias[0]
    bias = fresh.get_submodule(o).bias
    assert bias.shape == (64,) and float(bias.detach().abs().sum()) > 0
    save_pruned(fresh, plan, tmp_path / "m", processor=processor)
    again = load_pruned(tmp_path / "m")
    assert torch.equal(again.get_submodule(o).bias, bias)
    assert all(len(plan.kept(g)) >= 1 for g in groups)


def test_flap_structures_and_metrics_run(base, fresh, calib, pcfg):
    _, _, groups, _ = base
    for opts in ({"structure": "ul_um"}, {"metric": "ifv", "per_tower": True}, {"metric": "wifn"},
                 {"bias_compensation": False}):
        res = get_method("flap")(fresh, groups, calib, pcfg("flap", 0.2, flap=opts), 2)
        assert abs(res.plan.meta["achieved_ratio"] - 0.2) < 0.01 + res.plan.meta["added_bias_params"] / 328_512
