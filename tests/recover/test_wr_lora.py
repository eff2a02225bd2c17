"""WR-LoRA (Eq. 12): identity at init, recalled slices, gradient routing, merge, adapter round trip, plain LoRA."""

from __future__ import annotations

import pytest
import torch
from lpd_setup import pruned_tiny
from torch import nn

from ukmp.models.build import build_tiny
from ukmp.recover.wr_lora import (
    WRLoRALinear,
    adapter_state_dict,
    inject_wr_lora_,
    load_adapter_,
    merge_wr_lora_,
    named_lora_parameters,
    save_adapter,
)
from ukmp.testing import make_inputs

EXACT = 0.0  # B = 0 adds exact zeros
MERGE_TOL = 1e-4  # fp32 merged vs unmerged logits (different summation order)
CHANGED = 1e-3  # "differs" means a max-abs logit change above this


def _logits(model, inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def _injected(dropout: float = 0.05, plain: bool = False):
    model, removed, adapter, plan = pruned_tiny()
    inputs = make_inputs(model, batch=2, seed=1)
    ref = _logits(model, inputs)
    params = inject_wr_lora_(model, removed, adapter.lora_targets(), dropout=dropout, plain_lora=plain)
    return model, removed, adapter, inputs, ref, params


def _train_steps(model, params, inputs, steps: int = 3) -> None:
    opt = torch.optim.AdamW(params, lr=1e-2)
    labels = torch.randint(3, 100, (inputs["input_ids"].shape[0], 5), generator=torch.Generator().manual_seed(0))
    batch = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.integration
def test_zero_b_reproduces_pruned_model_and_perturbation_is_seen():
    model, _, _, inputs, ref, _ = _injected()
    out = _logits(model, inputs)
    assert (out - ref).abs().max().item() <= EXACT
    layer = model.get_submodule("language_model.encoder.block.0.layer.0.SelfAttention.q")
    with torch.no_grad():
        layer.lora_B.normal_()
    assert (_logits(model, inputs) - ref).abs().max().item() > CHANGED  # the check is not vacuous


@pytest.mark.integration
def test_recall_buffers_hold_exactly_the_removed_slices():
    model, removed, adapter, *_ = _injected()
    dense, _ = build_tiny(seed=0)
    n_out = n_in = n_none = 0
    for path in adapter.lora_targets():
        layer = model.get_submodule(path)
        assert isinstance(layer, WRLoRALinear)
        w = dense.get_submodule(path).weight.detach()
        if path not in removed:
            assert layer.p_out is None and layer.p_in is None and layer.recall_out_A is None
            assert torch.equal(layer.base_layer.weight, w)
            n_none += 1
            continue
        rs = removed[path]
        if rs.dim == 0:  # fused ViT qkv: rows from all three thirds
            assert layer.p_in is None and torch.equal(layer.p_out, w[rs.removed])
            assert torch.equal(layer.base_layer.weight, w[rs.kept])
            assert layer.recall_out_A.shape == (8, len(rs.removed)) and layer.recall_out_B.shape == (len(rs.kept), 8)
            n_out += 1
        else:
            assert layer.p_out is None and torch.equal(layer.p_in, w[:, rs.removed])
            assert torch.equal(layer.base_layer.weight, w[:, rs.kept])
            assert layer.recall_in_B.shape == (len(rs.removed), 8) and layer.recall_in_A.shape == (8, len(rs.kept))
            n_in += 1
    assert n_out > 0 and n_in > 0 and n_none > 0  # every case is exercised by this plan
    qkv = "vision_model.encoder.layers.0.self_attn.qkv"
    E = dense.config.vision_config.hidden_size
    assert {int(i) // E for i in removed[qkv].removed} == {0, 1, 2}


@pytest.mark.integration
def test_gradients_reach_lora_factors_only():
    model, _, _, inputs, _, params = _injected()
    trainable = {id(p) for p in params}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(not isinstance(b, nn.Parameter) for _, b in model.named_buffers())
    _train_steps(model, params, inputs, steps=1)  # after one step A factors also receive gradients
    model.zero_grad(set_to_none=False)
    batch = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    labels = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    model(**batch, labels=labels).loss.backward()
    named = named_lora_parameters(model)
    for n, p in model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    recall = [p for n, p in named.items() if "recall_" in n]
    assert recall and sum(float(p.grad.abs().sum()) > 0 for p in recall) == len(recall)


@pytest.mark.integration
def test_merged_equals_unmerged_after_training():
    model, _, _, inputs, ref, params = _injected()
    _train_steps(model, params, inputs, steps=3)
    unmerged = _logits(model, inputs)
    merge_wr_lora_(model)
    assert not any(isinstance(m, WRLoRALinear) for m in model.modules())
    merged = _logits(model, inputs)
    assert (merged - unmerged).abs().max().item() <= MERGE_TOL
    assert (unmerged - ref).abs().max().item() > CHANGED
    assert (merged - ref).abs().max().item() > CHANGED


@pytest.mark.unit
@pytest.mark.parametrize("case", ["rows", "cols", "none"])
def test_single_layer_merge_matches_forward(case):
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(12, 10, bias=True)
    p_out = torch.randn(5, 12, generator=g) if case == "rows" else None
    p_in = torch.randn(10, 7, generator=g) if case == "cols" else None
    layer = WRLoRALinear(base, p_out=p_out, p_in=p_in, r=4, r_recall=3, alpha=8, dropout=0.0)
    with torch.no_grad():
        for p in layer.factors().values():
            p.normal_(generator=g)
    x = torch.randn(6, 12, generator=g)
    manual = base(x) + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    if p_out is not None:
        manual = manual + 2.0 * (x @ p_out.T @ layer.recall_out_A.T @ layer.recall_out_B.T)
    if p_in is not None:
        manual = manual + 2.0 * (x @ layer.recall_in_A.T @ layer.recall_in_B.T @ p_in.T)
    assert (layer(x) - manual).abs().max().item() <= 1e-4
    merged = layer.merge()
    assert torch.equal(merged.bias, base.bias)
    assert (merged(x) - layer(x)).abs().max().item() <= 1e-4
    assert (merged(x) - base(x)).abs().max().item() > CHANGED


@pytest.mark.unit
def test_bad_shapes_and_targets_raise():
    with pytest.raises(ValueError, match="p_out"):
        WRLoRALinear(nn.Linear(4, 3), p_out=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="p_in"):
        WRLoRALinear(nn.Linear(4, 3), p_in=torch.zeros(4, 2))
    model, removed, *_ = pruned_tiny()
    with pytest.raises(ValueError, match="targets"):
        inject_wr_lora_(model, removed, ["language_model.encoder.block.0.layer.0.layer_norm"])


@pytest.mark.unit
def test_buffers_move_with_to():
    layer = WRLoRALinear(nn.Linear(4, 3), p_out=torch.ones(2, 4), dropout=0.0)
    layer.to(torch.float64)
    assert layer.p_out.dtype == torch.float64 and layer.lora_A.dtype == torch.float64
    layer.to("meta")
    assert layer.p_out.device.type == "meta"
    assert "p_out" not in layer.state_dict()  # frozen recall slices are rebuilt from the pruned-model artifacts


@pytest.mark.integration
def test_adapter_round_trip_through_safetensors(tmp_path):
    model, _, _, inputs, ref, params = _injected()
    _train_steps(model, params, inputs, steps=2)
    trained = _logits(model, inputs)
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    assert set(adapter_state_dict(model)) == set(named_lora_parameters(model))
    fresh, removed, adapter, *_ = pruned_tiny()
    inject_wr_lora_(fresh, removed, adapter.lora_targets())
    assert (_logits(fresh, inputs) - trained).abs().max().item() > CHANGED
    load_adapter_(fresh, path)
    assert (_logits(fresh, inputs) - trained).abs().max().item() <= EXACT
    with pytest.raises(ValueError, match="adapter state dict"):
        from ukmp.recover.wr_lora import load_adapter_state_dict_

        load_adapter_state_dict_(fresh, {"nope": torch.zeros(1)})


@pytest.mark.integration
def test_plain_lora_ablation_through_peft():
    model, _, adapter, inputs, ref, params = _injected(plain=True)
    assert not any(isinstance(m, WRLoRALinear) for m in model.modules())
    names = set(named_lora_parameters(model))
    assert len(names) == 2 * len(adapter.lora_targets()) and all(".lora_" in n for n in names)
    assert (_logits(model, inputs) - ref).abs().max().item() <= EXACT
    _train_steps(model, params, inputs, steps=2)
    unmerged = _logits(model, inputs)
    merge_wr_lora_(model)
    assert all(type(model.get_submodule(t)) is nn.Linear for t in adapter.lora_targets())
    merged = _logits(model, inputs)
    assert (merged - unmerged).abs().max().item() <= MERGE_TOL
    assert (merged - ref).abs().max().item() > CHANGED
