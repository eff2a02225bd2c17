"""Table A as data (exact for the full-size config, proportional for the tiny one) and block-output taps."""

from __future__ import annotations

import pytest
import torch

from ukmp.models.build import load_config, load_model
from ukmp.recover.schedule import FeatureTaps, ScheduleConfig, build_schedule
from ukmp.testing import make_inputs

VE1 = tuple(range(0, 23, 2))
VE = tuple(range(0, 39, 2))
LE1, LE2 = tuple(range(1, 12, 2)), tuple(range(13, 24, 2))


@pytest.fixture(scope="module")
def full_model():
    return load_model("blip2-flan-t5-xl", random_weights_device="meta")


@pytest.mark.integration
def test_table_a_exact_for_full_size_config(full_model):
    stages = build_schedule(full_model.config)
    expected = [
        {"vision": VE1},
        {"vision": VE},
        {"vision": VE, "encoder": LE1},
        {"vision": VE, "encoder": LE1 + LE2},
        {"vision": VE, "encoder": LE1 + LE2, "decoder": LE1},
        {"vision": VE, "encoder": LE1 + LE2, "decoder": LE1 + LE2},
        {},
    ]
    assert [s.mse_layers for s in stages] == expected
    assert [s.n_samples for s in stages] == [20_000, 20_000, 80_000, 40_000, 80_000, 80_000, None]
    assert [s.sample_offset for s in stages] == [0, 20_000, 40_000, 120_000, 160_000, 240_000, 320_000]
    assert [(s.use_task, s.use_kl) for s in stages] == [(False, False)] * 6 + [(True, True)]
    assert [s.phase for s in stages] == ["tau1"] * 2 + ["tau2"] * 4 + ["tau3"]
    # the taps resolve on the real module tree (meta device: structure only)
    taps = FeatureTaps(full_model, stages[5].tapped_layers())
    assert len(taps._handles) == 20 + 12 + 12
    taps.remove()


@pytest.mark.unit
def test_sample_scaling_rest_and_ablation_modes():
    cfg = load_config("blip2-flan-t5-xl")
    st = build_schedule(cfg, ScheduleConfig(sample_scale=0.001, total_samples=595_375))
    assert [s.n_samples for s in st] == [20, 20, 80, 40, 80, 80, 595_375 - 320]
    every = {"vision": VE, "encoder": LE1 + LE2, "decoder": LE1 + LE2}
    allm = build_schedule(cfg, ScheduleConfig(mode="mse_kl_task_all"))
    assert all(s.use_task and s.use_kl for s in allm) and allm[6].mse_layers == every
    assert allm[0].mse_layers == {"vision": VE1}
    nop = build_schedule(cfg, ScheduleConfig(mode="no_progressive"))
    assert all(s.mse_layers == every for s in nop[:6]) and nop[6].mse_layers == {} and nop[6].use_kl
    for mode, kl in (("kl_task", True), ("task", False)):
        st = build_schedule(cfg, ScheduleConfig(mode=mode))
        assert all(s.mse_layers == {} and s.use_task and s.use_kl == kl for s in st)
    with pytest.raises(ValueError, match="schedule.mode"):
        ScheduleConfig(mode="progresive")


@pytest.mark.unit
def test_tiny_config_gets_proportional_layers():
    st = build_schedule(load_config("tiny"))  # 2 ViT blocks, 2+2 T5 blocks
    assert st[0].mse_layers == {"vision": (0,)}
    assert st[5].mse_layers == {"vision": (0,), "encoder": (1,), "decoder": (1,)}


@pytest.mark.integration
def test_feature_taps_capture_block_outputs(tiny):
    model, _ = tiny
    inputs = make_inputs(model, batch=2)
    with torch.no_grad(), FeatureTaps(model, {"vision": [0], "encoder": [0], "decoder": [0]}) as taps:
        out = model(**inputs, output_hidden_states=True)
        feats = dict(taps.feats)
        vis = model.vision_model(inputs["pixel_values"], output_hidden_states=True).hidden_states[1]
    enc = out.language_model_outputs.encoder_hidden_states[1]
    dec = out.language_model_outputs.decoder_hidden_states[1]
    for key, ref in (("vision.0", vis), ("encoder.0", enc), ("decoder.0", dec)):
        assert feats[key].shape == ref.shape
        assert (feats[key] - ref).abs().max().item() <= 1e-6, key
    assert (feats["encoder.0"] - out.language_model_outputs.encoder_hidden_states[0]).abs().max().item() > 1e-3
    assert not taps._handles
