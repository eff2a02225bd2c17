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


def visible_text(tokenizer, model, min_tokens: int = 4) -> dict[str, Any]:
    """Generation settings under which a random model's greedy output decodes to visible text: at least
    ``min_tokens`` tokens (no immediate end of sequence), none of them a row of the (padded) vocabulary that the
    tokenizer cannot spell nor a special token (the tiny model has 192 rows for 110 tokens; at the default ratio
    every greedy pick fell there and the demo printed an empty string)."""
    rows = model.get_output_embeddings().weight.shape[0]
    unspellable = set(range(len(tokenizer), rows)) | set(tokenizer.all_special_ids)
    image = getattr(model.config, "image_token_index", None)
    if image is not None:
        unspellable.add(image)
    unspellable.discard(tokenizer.eos_token_id)  # it may still end the text after ``min_tokens``
    return {"min_new_tokens": min_tokens, "suppress_tokens": sorted(unspellable)}


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
    gen_kwargs = dict(max_new_tokens=8, do_sample=False, **visible_text(processor.tokenizer, model))
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


def pipeline_summary(out: dict[str, Any], root: Path) -> str:
    """A few lines for the end of ``ukmp demo`` (``make demo``): what was pruned, each task's headline metric
    through the stages, and where the full results are (the JSON alone ran to 120 lines)."""
    from ukmp.compare import primary
    from ukmp.eval.stage import TASKS

    metrics = out.get("metrics", {})
    states = [s for s in ("dense", "pruned", "recovered") if metrics.get(s)]
    lines = [f"{out['name']}: {out['method']} removed {100 * out['achieved_ratio']:.1f} % of the parameters "
             f"(target {100 * out['target_ratio']:.0f} %)"]
    tasks = list(dict.fromkeys(t for s in states for t in metrics[s] if t in TASKS))
    width = max((len(f"{t} {primary(t)}") for t in tasks), default=0)
    if tasks:
        lines.append(f"  {'':<{width}}  " + "  ".join(f"{s:>9}" for s in states))
    for t in tasks:
        cells = [metrics[s].get(t, {}).get(primary(t)) for s in states]
        lines.append(f"  {f'{t} {primary(t)}':<{width}}  " + "  ".join(
            f"{c:>9.2f}" if isinstance(c, (int, float)) else f"{'–':>9}" for c in cells))
    lines.append(f"full results: {root / 'results.md'}  {root / 'results.json'}")
    return "\n".join(lines)
