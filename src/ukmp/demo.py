"""The structure-layer demo: prune a tiny random BLIP-2 with a random plan, save, reload, generate."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ukmp.groups import PrunableGroup
from ukmp.io import atomic_write_json, load_pruned, save_pruned
from ukmp.models import adapter_for
from ukmp.models import count_parameters
from ukmp.models.build import build_tiny
from ukmp.plan import PruningPlan

log = logging.getLogger(__name__)


def random_plan(groups: list[PrunableGroup], remove_fraction: float, seed: int = 0) -> PruningPlan:
    """Remove ``remove_fraction`` of the units of every group at random (at least one unit is kept)."""
    if not 0.0 <= remove_fraction < 1.0:
        raise ValueError(f"ratio: must be in [0, 1), got {remove_fraction}")
    rng = random.Random(seed)
    keep = {}
    for g in groups:
        n_keep = max(1, round(g.n_units * (1.0 - remove_fraction)))
        keep[g.id] = sorted(rng.sample(range(g.n_units), n_keep))
    return PruningPlan(keep=keep, units={g.id: g.n_units for g in groups},
                       meta={"method": "random", "remove_fraction": remove_fraction, "seed": seed})


def _demo_image(size: int = 48) -> Image.Image:
    arr = np.zeros((size, size, 3), dtype=np.uint8)
    arr[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = (200, 30, 30)
    return Image.fromarray(arr)


def run_demo(out: str | Path = "outputs/demo", ratio: float = 0.5, seed: int = 0) -> dict[str, Any]:
    out = Path(out)
    t0 = time.perf_counter()
    model, processor = build_tiny(seed=seed)
    adapter = adapter_for(model)
    groups = adapter.groups()
    plan = random_plan(groups, ratio, seed)
    inputs = processor(images=_demo_image(), text="a photo of", return_tensors="pt")
    gen_kwargs = dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        with adapter.mask(model, plan):
            masked_logits = model(**inputs, decoder_input_ids=torch.zeros(1, 1, dtype=torch.long)).logits
        dense_params = count_parameters(model)
        adapter.apply_(model, plan)
        pruned_params = count_parameters(model)
        path = save_pruned(model, plan, out / "pruned", processor=processor)
        reloaded = load_pruned(path)
        logits = reloaded(**inputs, decoder_input_ids=torch.zeros(1, 1, dtype=torch.long)).logits
        tokens = reloaded.generate(**inputs, **gen_kwargs)
    summary = {
        "model": "tiny (random weights)",
        "plan": {"method": "random", "remove_fraction": ratio, "digest": plan.digest()},
        "parameters": {"dense": dense_params, "pruned": pruned_params,
                       "removed": dense_params - pruned_params,
                       "removed_by_plan": plan.removed_params(groups),
                       "ratio_removed": (dense_params - pruned_params) / dense_params},
        "reloaded_vs_masked_max_abs_diff": float((logits - masked_logits).abs().max()),
        "generated": processor.tokenizer.batch_decode(tokens, skip_special_tokens=True),
        "pruned_dir": str(path),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(out / "summary.json", summary)
    log.info("demo: wrote %s", out / "summary.json")
    return summary
