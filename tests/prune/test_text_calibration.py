"""Calibration of a vision-language model on image-text samples plus plain text (``data.calibration_text``): the
text windows come as batches of their own, run through the language model alone, add to the language groups'
scores and leave the vision groups' exactly as they were; every method takes the mixed batches; a run without the
option keeps its stage hashes.

Tolerances: the language model alone gives the language model's logits exactly (the same module on the same
inputs, compared with ``torch.equal``). Vision scores with and without text: 1e-6 relative (the text batches add
no gradient to a vision weight; only the order of the per-batch sums may differ). Language scores: they must
change by more than 1e-3 relative somewhere, which they do by orders of magnitude more."""

from __future__ import annotations

import pytest
import torch

from ukmp.config import ConfigError, hashed_section, load_config
from ukmp.models import adapter_for, forward_batch
from ukmp.prune.stage import calibration_batches
from ukmp.runtime import load_dense

METHODS = ("ukmp", "llm_pruner_global", "ecoflap_sp", "flap", "upop", "wanda_sp")
SMALL = ["prune.num_samples=6", "prune.batch_size=3", "prune.options={upop: {steps: 2, update_every: 1}, "
         "ecoflap: {zo_samples: 2}}"]


@pytest.fixture(scope="module")
def sample(sample_data):
    return sample_data


def cfg_for(tmp_path, sample, *extra, source="tiny-blip2-llama"):
    return load_config(None, [f"output_dir={tmp_path}", f"model.source={source}", "model.device=cpu",
                              f"data.calibration={sample['cc595k']}", "data.augment=false", *SMALL, *extra])


@pytest.fixture(scope="module")
def model_and_processor(tmp_path_factory, sample):
    return load_dense(cfg_for(tmp_path_factory.mktemp("m"), sample).model)


def test_text_batches_follow_the_image_batches(tmp_path, sample, model_and_processor):
    model, processor = model_and_processor
    plain, n0, ids0 = calibration_batches(cfg_for(tmp_path, sample), processor, model)
    mixed, n1, ids1 = calibration_batches(
        cfg_for(tmp_path, sample, f"data.calibration_text={sample['text']}", "prune.num_text_samples=4"),
        processor, model)
    assert (n0, n1) == (2, 4)  # 6 captions in batches of 3, then 4 windows in batches of 3
    assert ids1[:6] == ids0 and len(ids1) == 10 and all(i.startswith("text:window:") for i in ids1[6:])
    a, b = list(plain(1)), list(mixed(1))
    for x, y in zip(a, b[:2]):  # the image-text batches are those of the run without text
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert all("pixel_values" not in t and t["input_ids"].shape[1] == 16 for t in b[2:])
    _, n2, ids2 = calibration_batches(cfg_for(tmp_path, sample, f"data.calibration_text={sample['text']}"),
                                      processor, model)
    assert len(ids2) == 6 + 6 and n2 == 4  # num_text_samples 0: as many windows as num_samples


def test_a_text_batch_runs_the_language_model_alone(tmp_path, sample, model_and_processor):
    model, processor = model_and_processor
    mixed, _, _ = calibration_batches(
        cfg_for(tmp_path, sample, f"data.calibration_text={sample['text']}", "prune.num_text_samples=3"),
        processor, model)
    *images, text = list(mixed(0))
    with torch.no_grad():
        got = forward_batch(model, text).logits
        want = model.language_model(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).logits
        assert torch.equal(got, want)
        with pytest.raises(TypeError):  # not vacuous: the whole model cannot take a text-only batch
            model(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        full = forward_batch(model, images[0]).logits  # an image batch still goes through the whole model
        assert full.shape[:2] == images[0]["input_ids"].shape


def test_text_adds_to_the_language_scores_only(tmp_path, sample, model_and_processor):
    from ukmp.prune.scoring import taylor_pass

    model, processor = model_and_processor
    groups = adapter_for(model).groups()
    plain, _, _ = calibration_batches(cfg_for(tmp_path, sample), processor, model)
    mixed, _, _ = calibration_batches(
        cfg_for(tmp_path, sample, f"data.calibration_text={sample['text']}", "prune.num_text_samples=6"),
        processor, model)
    ta, sa = taylor_pass(model, groups, plain(1), 0.4)
    tb, sb = taylor_pass(model, groups, mixed(1), 0.4)
    assert sb["tokens_total"] > sa["tokens_total"]
    changed = []
    for g in groups:
        if g.modality == "vision":
            assert torch.allclose(ta[g.id], tb[g.id], rtol=1e-6, atol=0), g.id
        elif g.modality == "language":
            rel = float((ta[g.id] - tb[g.id]).abs().max() / ta[g.id].abs().max().clamp(min=1e-30))
            changed.append(rel)
    assert changed and max(changed) > 1e-3, changed


@pytest.mark.parametrize("method", METHODS)
def test_every_data_method_takes_mixed_batches(method, tmp_path, sample):
    from ukmp.prune.scoring import get_method

    cfg = cfg_for(tmp_path, sample, f"data.calibration_text={sample['text']}", "prune.num_text_samples=3",
                  f"prune.method={method}")
    model, processor = load_dense(cfg.model)
    groups = adapter_for(model).groups()
    batches, n, _ = calibration_batches(cfg, processor, model)
    result = get_method(method)(model, groups, batches, cfg.prune, n)
    if result.plan is None:
        assert set(result.scores) == {g.id for g in groups}
        assert all(torch.isfinite(v).all() for v in result.scores.values())


def test_bad_text_calibration_is_named(tmp_path, sample, model_and_processor):
    model, processor = model_and_processor
    with pytest.raises(ValueError, match=r"^data.calibration_text: .* is not a text dataset"):
        calibration_batches(cfg_for(tmp_path, sample, f"data.calibration_text={sample['cc595k']}"), processor, model)
    lm_cfg = cfg_for(tmp_path, sample, f"data.calibration={sample['text']}",
                     f"data.calibration_text={sample['text']}", source="tiny-llama")
    lm, tok = load_dense(lm_cfg.model)
    with pytest.raises(ValueError, match=r"^data.calibration_text: .* is for a vision-language model"):
        calibration_batches(lm_cfg, tok, lm)
    with pytest.raises(ConfigError, match="prune.num_text_samples"):
        cfg_for(tmp_path, sample, "prune.num_text_samples=-1")


def test_stage_hashes_ignore_the_new_fields_left_at_their_defaults(tmp_path, sample):
    """Stages finished before data.calibration_text existed stay valid for runs that do not set it."""
    from dataclasses import asdict

    cfg = cfg_for(tmp_path, sample)
    data, prune = hashed_section("data", cfg.data), hashed_section("prune", cfg.prune)
    old_data = {k: v for k, v in asdict(cfg.data).items() if k != "calibration_text"}
    assert data == old_data and "num_text_samples" not in prune
    used = cfg_for(tmp_path, sample, f"data.calibration_text={sample['text']}", "prune.num_text_samples=4")
    assert hashed_section("data", used.data)["calibration_text"] == str(sample["text"])
    assert hashed_section("prune", used.prune)["num_text_samples"] == 4
