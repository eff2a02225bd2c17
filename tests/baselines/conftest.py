"""Fixtures for the baseline tests: one tiny BLIP-2 per session (copied per test) and fixed calibration batches."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from ukmp.config import PruneConfig

PREFIX = ["a photo of", "a dog running across the green", "two people", "a plate of food",
          "a man holding", "a blue circle", "a train on", "a bowl of fruit"]
SUFFIX = ["a cat", "grass in a park", "riding bicycles down a city street", "with broccoli",
          "an umbrella in the rain", "next to a yellow triangle", "the tracks", "on a wooden table"]


def build_batches(processor, n: int = 8, bs: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Hand-made prefix-LM batches: image tokens + prefix as encoder text, suffix as labels (-100 padding)."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
    out = []
    for s in range(0, n, bs):
        idx = list(range(s, min(n, s + bs)))
        enc = processor(images=[images[i] for i in idx], text=[PREFIX[i % 8] for i in idx], return_tensors="pt",
                        padding=True)
        tgt = processor.tokenizer([SUFFIX[i % 8] for i in idx], return_tensors="pt", padding=True)
        out.append({"pixel_values": enc["pixel_values"], "input_ids": enc["input_ids"],
                    "attention_mask": enc["attention_mask"],
                    "labels": tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, -100),
                    "decoder_attention_mask": tgt["attention_mask"]})
    return out


@pytest.fixture(scope="session")
def base():
    """(dense model, processor, groups, batches) shared by the session; tests copy the model before changing it."""
    from ukmp.models.blip2 import Blip2T5Adapter
    from ukmp.models.build import build_tiny

    model, processor = build_tiny(seed=0)
    return model, processor, Blip2T5Adapter(model.config).groups(), build_batches(processor)


@pytest.fixture
def fresh(base):
    """A deep copy of the dense tiny model (safe to prune or train)."""
    return copy.deepcopy(base[0])


@pytest.fixture
def calib(base):
    """``batches(epoch)`` over the fixed calibration batches (what a method receives)."""
    return lambda epoch: iter(base[3])


@pytest.fixture
def pcfg():
    """``pcfg(method, ratio, **options)`` -> PruneConfig (P2 steps of one unit: the tiny model's granularity)."""
    def make(method: str, ratio: float, **options) -> PruneConfig:
        return replace(PruneConfig(), method=method, ratio=ratio, units_per_step=1, fine_units_per_step=1,
                       options=options)
    return make
