"""Table A for a decoder-only LM: the odd blocks' first half takes the encoder sub-stages, the second half the
decoder ones; a plain LM has no vision sub-stages (skipped, no samples). Exact tuples, no tolerance."""

from __future__ import annotations

import torch

from ukmp.models.build import build_tiny, load_config
from ukmp.recover.schedule import FeatureTaps, build_schedule, supervised_layers


def test_smollm2_mapping():
    sup = supervised_layers(load_config("smollm2-135m"))
    assert sup == {"vision": ((), ()), "encoder": ((1, 3, 5, 7), (9, 11, 13, 15)),
                   "decoder": ((17, 19, 21, 23), (25, 27, 29))}
    stages = build_schedule(load_config("smollm2-135m"))
    assert [s.has_loss for s in stages] == [False, False, True, True, True, True, True]
    assert stages[5].mse_layers["decoder"] == (17, 19, 21, 23, 25, 27, 29)


def test_blip2_opt_keeps_the_vision_stages():
    sup = supervised_layers(load_config("blip2-opt-2.7b"))
    assert sup["vision"][0] == tuple(range(0, 24, 2)) and sup["vision"][1] == tuple(range(24, 39, 2))
    assert sup["encoder"] == ((1, 3, 5, 7), (9, 11, 13, 15)) and sup["decoder"] == ((17, 19, 21, 23), (25, 27, 29, 31))
    assert all(s.has_loss for s in build_schedule(load_config("blip2-opt-2.7b")))


def test_taps_read_the_decoder_blocks():
    model, _ = build_tiny(name="tiny-llama")
    ids = torch.randint(3, 150, (1, 6))
    with torch.no_grad(), FeatureTaps(model, {"encoder": [0, 1]}) as taps:
        out = model(input_ids=ids, output_hidden_states=True)
        assert torch.equal(taps.feats["encoder.0"], out.hidden_states[1])  # block i's output = hidden state i + 1
        assert torch.equal(taps.feats["encoder.1"], out.hidden_states[2])
        assert not torch.equal(taps.feats["encoder.0"], taps.feats["encoder.1"])
