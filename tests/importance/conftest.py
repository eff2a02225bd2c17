"""Shared fixtures: the tiny random BLIP-2 and a batch builder (prefix -> input_ids, suffix -> labels)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

PREFIX = ["a photo of", "a dog running across the green", "two people", "a plate of food"]
SUFFIX = ["a cat", "grass in a park", "riding bicycles down a city street", "with broccoli"]


def build_batch(processor, images, idx):
    """pixel_values, input_ids (with image tokens), attention_mask, labels (-100 padding) and
    decoder_attention_mask."""
    enc = processor(images=[images[i] for i in idx], text=[PREFIX[i] for i in idx], return_tensors="pt",
                    padding=True)
    tgt = processor.tokenizer([SUFFIX[i] for i in idx], return_tensors="pt", padding=True)
    return {
        "pixel_values": enc["pixel_values"], "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, -100),
        "decoder_attention_mask": tgt["attention_mask"],
    }


@pytest.fixture(scope="session")
def tiny():
    """(model, processor, groups, images) for the tiny BLIP-2."""
    from ukmp.models.blip2 import Blip2T5Adapter
    from ukmp.models.build import build_tiny

    model, processor = build_tiny(seed=0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in PREFIX]
    return model, processor, Blip2T5Adapter(model.config).groups(), images


@pytest.fixture
def make_batch():
    return build_batch
