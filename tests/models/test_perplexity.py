"""Perplexity of a decoder-only LM on a text dataset, against a hand computation (one forward over each window,
token NLLs summed in float64). Tolerance 1e-9 relative in float64: the same products in another order."""

from __future__ import annotations

import math

import pytest
import torch

from ukmp.data.loaders import load_dataset
from ukmp.eval.perplexity import evaluate_perplexity
from ukmp.models.build import build_tiny


@pytest.fixture(scope="module")
def text_yaml(tmp_path_factory):
    from ukmp.data.sample import write_sample_text

    return write_sample_text(tmp_path_factory.mktemp("text"), window=24)


def hand_perplexity(lm, ids: list[int], window: int, stride: int) -> tuple[float, int, set[int]]:
    """A token is scored once, by the first window that holds it with context before it (local index >= 1)."""
    nll, scored = 0.0, set()
    for start in range(0, len(ids) - 1, stride):
        w = ids[start:start + window]
        if len(w) < 2:
            break
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([w])).logits[0].double()
        for p in range(1, len(w)):
            if start + p not in scored:
                scored.add(start + p)
                nll -= float(torch.log_softmax(logits[p - 1], -1)[w[p]])
        if start + window >= len(ids):
            break
    return math.exp(nll / len(scored)), len(scored), scored


@pytest.mark.parametrize("stride", [24, 16])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-blip2-opt"])
def test_perplexity_matches_a_hand_computation(name, stride, text_yaml):
    model, processor = build_tiny(seed=3, name=name)
    model = model.double()
    tok = getattr(processor, "tokenizer", processor)
    ds = load_dataset(text_yaml, max_samples=None)
    ds.stride = stride
    metrics, windows = evaluate_perplexity(model, processor, ds, batch_size=3, progress=False)
    lm = model.language_model if hasattr(model, "language_model") else model
    ids = ds.token_ids(tok)
    expected, n, scored = hand_perplexity(lm, ids, ds.window, stride)
    assert metrics["tokens"] == n
    # non-overlapping windows leave each window's first token as context; overlapping ones score every token but
    # the text's first
    starts = set(range(stride, len(ids), stride)) if stride == ds.window else set()
    assert scored == set(range(1, len(ids))) - starts
    assert abs(metrics["perplexity"] - expected) <= 1e-9 * expected
    assert sum(w["tokens"] for w in windows) == n
    # not vacuous: another model scores the same text differently
    other, _ = build_tiny(seed=4, name=name)
    assert abs(evaluate_perplexity(other.double(), processor, ds, progress=False)[0]["perplexity"] - expected) > 1e-3


def test_perplexity_refuses_an_encoder_decoder_lm(text_yaml):
    model, processor = build_tiny(seed=0)
    with pytest.raises(ValueError, match="encoder-decoder"):
        evaluate_perplexity(model, processor, load_dataset(text_yaml), progress=False)


def test_text_dataset_errors(tmp_path):
    from ukmp.data.config import config_from_dict

    with pytest.raises(ValueError, match="'stride' \\(32\\) must not exceed 'window' \\(16\\)"):
        config_from_dict({"format": "text", "annotations": "a.txt", "window": 16, "stride": 32})
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="bad.txt: not UTF-8"):
        load_dataset(config_from_dict({"format": "text", "annotations": str(bad)}))


def test_repo_text_and_causal_lm_configs_parse(monkeypatch):
    from pathlib import Path

    from ukmp.config import load_config
    from ukmp.data.config import load_dataset_config

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.setenv("UKMP_DATA_ROOT", "/data/root")
    cfg = load_dataset_config(repo / "configs" / "causal_lm" / "text.yaml")
    assert cfg.format == "text" and cfg.window == 512 and cfg.annotations[0].is_relative_to("/data/root")
    run = load_config([str(repo / "configs" / "causal_lm" / "smollm2_ukmp_0.2.yaml")])
    assert run.eval.after_prune == ["perplexity"] and run.prune.ratio == 0.2
    assert load_config([str(repo / "configs" / "blip2_opt_ukmp_0.5.yaml")]).model.source == "Salesforce/blip2-opt-2.7b"
