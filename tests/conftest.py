"""Shared fixtures: tiny random BLIP-2 models, random plans and inputs. Everything offline, on CPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from ukmp.models.build import build_tiny  # noqa: E402
from ukmp.testing import make_inputs, random_plan  # noqa: E402,F401

torch.set_num_threads(1)


@pytest.fixture
def tiny():
    model, processor = build_tiny(seed=0)
    return model, processor


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """The generated sample datasets plus the sample text in 16-token windows: ``{name: YAML path}``."""
    from ukmp.data.sample import write_sample_data, write_sample_text

    root = tmp_path_factory.mktemp("sample")
    paths = write_sample_data(root)
    paths["text"] = write_sample_text(root, window=16)
    return paths


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same RNG state, whatever ran before it (no order-dependent flakiness)."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
