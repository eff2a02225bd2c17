"""The language track after recovery (issue 28): recovery runs, a second held-out text, and UKMP's setting selection.

Used by ``language.py --recover-ratios ...``. Everything here is a cached stage (``ukmp.stages.run_stage``), so the
command resumes where it stopped and a second invocation runs nothing.

Recovery (one budget for every row): ``windows`` windows of 128 calibration tokens (disjoint from both held-out texts),
``batch`` windows a step, ``lr`` for every recipe. Two recipes:

* ``lpd`` -- the pipeline's recovery: WR-LoRA + progressive distillation from the dense model (Table A's sub-stages
  scaled so that they and the final CE + KL sub-stage sum to ``windows``; a plain LM has no vision sub-stages 1-2).
* ``lora`` -- LLM-Pruner's own recipe: plain LoRA (r 8, alpha 16, dropout 0.05, on every linear of the attention and
  MLP blocks, as its repository does for Llama) trained on the language-modelling loss alone, same windows and steps.

Second held-out text: the Debian FAQ (``apt-get install debian-faq``: plain English prose from the Debian project,
another source and subject than the Python reference of the pydoc text, and nothing of it in the calibration text).

Selection: UKMP at ``ratio`` (0.5) for every threshold T in :data:`GRID_T` and entropy weighting in
:data:`GRID_ENTROPY`, scored by perplexity on a validation slice cut from the END of the calibration text (never the
held-out texts); the best becomes the row ``ukmp_sel`` at every ratio (its scores are ratio-free and re-allocated).
"""

from __future__ import annotations

import gzip
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

log = logging.getLogger("realparts.language")
TASK = "perplexity"
FAQ_FILE = Path("/usr/share/doc/debian/FAQ/debian-faq.en.txt.gz")
FAQ_START = "Chapter 1. Definitions and overview"  # the body: the table of contents before it is skipped
VALIDATION_TOKENS = 4096  # the last 8 windows of 512 calibration tokens
GRID_T = (0.4, 0.6, 0.8, 1.0)
GRID_ENTROPY = ("cosine", "none")
TABLE_A_TOTAL = 640_000  # Table A's samples of sub-stages 1-6 (320K) doubled: the final sub-stage takes the other half
LORA_RECIPE = ["finetune.adapter=lora", "finetune.schedule=task", "finetune.r=8", "finetune.alpha=16",
               "finetune.dropout=0.05"]
LPD_RECIPE = ["finetune.adapter=wr_lora", "finetune.schedule=progressive", "finetune.r=8", "finetune.alpha=16",
              "finetune.dropout=0.05"]


def budget_overrides(recipe: str, windows: int, batch: int, lr: float) -> list[str]:
    """The finetune overrides of one recipe: Table A's sub-stage counts scaled by ``windows / 640,000`` and the final
    sub-stage sized so that every recipe trains on exactly ``windows`` windows (LPD skips the two vision sub-stages
    of Table A on a plain LM, plain LoRA trains in all seven)."""
    from ukmp.recover.schedule import BASE_SAMPLES

    scale = windows / TABLE_A_TOTAL
    counts = [round(n * scale) for n in BASE_SAMPLES]
    before = sum(counts[2:]) if recipe == "lpd" else sum(counts)
    if recipe not in ("lpd", "lora"):
        raise ValueError(f"recipe: unknown {recipe!r} (lpd or lora)")
    if windows - before < 1:
        raise ValueError(f"--recover-windows: {windows} leaves no window for the final sub-stage")
    return ["finetune.enabled=true", f"finetune.sample_scale={scale}", f"finetune.final_stage_samples={windows - before}",
            f"finetune.batch_size={batch}", f"finetune.lr={lr}", "finetune.warmup_steps=5", "finetune.checkpoint_every=8",
            *(LPD_RECIPE if recipe == "lpd" else LORA_RECIPE)]


# ---------------------------------------------------------------------------------------------------- the texts
def _text_yaml(root: Path, name: str, file: str, text: str) -> str:
    from omegaconf import OmegaConf

    from ukmp.io import atomic_write_text

    atomic_write_text(root / "text" / file, text)
    path = root / "configs" / f"{name}.yaml"
    data = {"format": "text", "root": str(root), "annotations": f"text/{file}", "split": "test", "window": 512,
            "max_samples": None}
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(data)))
    return str(path)


def faq_text(path: Path = FAQ_FILE) -> str:
    """The Debian FAQ's body (from its first chapter on), each line stripped of its indentation, no-break spaces
    made plain."""
    if not path.is_file():
        raise SystemExit(f"language.py: {path}: missing; the second held-out text comes from the Debian package "
                         "debian-faq (apt-get install debian-faq), or pass --second-text DATASET_YAML / ''")
    text = gzip.decompress(path.read_bytes()).decode("utf-8").replace("\u00a0", " ")  # no-break spaces: plain
    start = text.find(FAQ_START)
    if start < 0:
        raise SystemExit(f"language.py: {path}: no line {FAQ_START!r}; not the Debian FAQ this track expects")
    return "\n".join(line.strip() for line in text[start:].splitlines()) + "\n"


def write_faq_yaml(cache: Path) -> str:
    """``configs/text_debian_faq.yaml`` under the cache dir (written once)."""
    path = cache / "configs" / "text_debian_faq.yaml"
    return str(path) if path.is_file() else _text_yaml(cache, "text_debian_faq", "debian_faq.txt", faq_text())


def write_validation_yaml(cache: Path, tokenizer_dir: str) -> str:
    """``configs/text_validation.yaml``: the last :data:`VALIDATION_TOKENS` tokens of the calibration text (the
    held-out texts are never read for a choice). Pruning calibrates on 32 random windows of 128 of the ~780 windows
    of that text, so a validation window may overlap one of them by chance."""
    path = cache / "configs" / "text_validation.yaml"
    if path.is_file():
        return str(path)
    from transformers import AutoTokenizer

    text = (cache / "text" / "calibration.txt").read_text()
    offsets = AutoTokenizer.from_pretrained(tokenizer_dir)(text, add_special_tokens=False,
                                                          return_offsets_mapping=True)["offset_mapping"]
    return _text_yaml(cache, "text_validation", "calibration_validation.txt", text[offsets[-VALIDATION_TOKENS][0]:])


# ---------------------------------------------------------------------------------------------------- stages
def _stage_seconds(path: Path) -> float:
    f = path / "stage.json"
    return float(json.loads(f.read_text()).get("seconds", 0.0)) if f.is_file() else 0.0


def eval_text(cfg, model_dir: Path | None, upstream: list, out: Path, dataset: str) -> float:
    """Held-out perplexity of ``model_dir`` (the dense model when None) on ``dataset``, a cached stage at ``out``."""
    from ukmp.eval.stage import run_eval_stage
    from ukmp.stages import run_stage

    c = replace(cfg, eval=replace(cfg.eval, datasets={**cfg.eval.datasets, TASK: dataset}))
    run_stage(out.name, out, [asdict(c.model), asdict(c.eval), [TASK]], upstream,
              lambda o: run_eval_stage(c, model_dir, [TASK], o))
    return float(json.loads((out / "metrics.json").read_text())[TASK][TASK])


def pruned_on(cfg, run_dir: Path, name: str, dataset: str) -> float:
    """The pruned model of ``run_dir`` evaluated on another text (stage ``eval_pruned_<name>``)."""
    from ukmp.pipeline import completed_stage

    up = completed_stage("prune", run_dir / "prune")
    if not up:
        raise FileNotFoundError(f"{run_dir / 'prune'}: no finished prune stage")
    return eval_text(cfg, run_dir / "prune" / "model", up, run_dir / f"eval_pruned_{name}", dataset)


def recover(cfg, run_dir: Path, out_root: Path, texts: dict[str, str], keep_weights: bool) -> dict[str, Any]:
    """Recover the pruned model of ``run_dir`` with ``cfg.finetune`` into ``out_root/finetune`` (the pipeline's
    finetune stage) and evaluate it on every text (``texts``: name -> dataset YAML; the first
    is the track's main text, stage ``eval_finetuned``). Without ``keep_weights`` the recovered weights are deleted
    once every evaluation is saved (disk: ~0.3-0.5 GB a model); their stages stay, so nothing re-runs."""
    from ukmp.pipeline import completed_stage, finetune_stage

    prune = completed_stage("prune", run_dir / "prune")
    if not prune:
        raise FileNotFoundError(f"{run_dir / 'prune'}: no finished prune stage")
    ft = finetune_stage(cfg, out_root, run_dir / "prune" / "model", prune)
    model = out_root / "finetune" / "model"
    row: dict[str, Any] = {}
    for k, (name, dataset) in enumerate(texts.items()):
        stage = out_root / ("eval_finetuned" if k == 0 else f"eval_finetuned_{name}")
        row[f"recovered_{name}"] = eval_text(cfg, model, [ft], stage, dataset)
    if not keep_weights:
        for f in model.glob("*.safetensors"):
            f.unlink()
            (model / "WEIGHTS_REMOVED.txt").write_text(
                "The recovered weights were deleted after evaluation (language.py without --keep-recovered-weights); "
                "delete this finetune stage and re-run to get them back.\n")
    info = json.loads((out_root / "finetune" / "stage.json").read_text())
    summary = info.get("info", {})
    windows = sum(summary.get("samples_per_stage", []))
    row.update(recover_seconds=round(_stage_seconds(out_root / "finetune"), 1), steps=summary.get("global_step"),
               windows=windows, tokens=windows * 128, recipe=summary.get("adapter"), schedule=summary.get("schedule"),
               eval_seconds=round(sum(_stage_seconds(p) for p in out_root.glob("eval_finetuned*")), 1))
    return row


# ---------------------------------------------------------------------------------------------------- selection
def grid_overrides(t: float, entropy: str, default_t: float, default_entropy: str) -> list[str]:
    return ([f"prune.threshold={t}"] if t != default_t else []) + \
        ([f"prune.entropy={entropy}"] if entropy != default_entropy else [])


def grid_name(ov: list[str], ablations: dict[str, list]) -> str:
    """The run name of a grid point: the cached ablation row with exactly these overrides (``abl_<table>_<k>``, the
    name ``language.run_ablations`` gives it), else ``sel_<overrides>``."""
    for table, rows in ablations.items():
        for k, (_label, aov, _rescore) in enumerate(rows):
            if sorted(aov) == sorted(ov):
                return f"abl_{table.split(': ')[1].replace(' ', '_').lower()}_{k}"
    return "sel_" + "_".join(o.split(".", 1)[1].replace("=", "") for o in ov)


def select(run: Callable[[list[str], str], tuple[Any, Path, dict[str, Any]]], default_t: float,
           default_entropy: str, ablations: dict[str, list], validation: str) -> dict[str, Any]:
    """Every grid point pruned (``run(overrides, name) -> (cfg, run_dir, row)``; the default point is UKMP's own run)
    and evaluated on the validation slice; returns the grid and the point of the lowest validation perplexity."""
    from ukmp.pipeline import completed_stage

    grid = []
    for t in GRID_T:
        for e in GRID_ENTROPY:
            ov = grid_overrides(t, e, default_t, default_entropy)
            cfg, run_dir, row = run(ov, grid_name(ov, ablations) if ov else "")
            val = eval_text(cfg, run_dir / "prune" / "model", completed_stage("prune", run_dir / "prune"),
                            run_dir / "eval_validation", validation)
            grid.append({"threshold": t, "entropy": e, "overrides": ov, "run_dir": str(run_dir),
                         "validation": val, "heldout": row.get("pruned"), "score_seconds": row.get("score_seconds")})
    best = min(grid, key=lambda g: g["validation"] if math.isfinite(g["validation"]) else math.inf)
    return {"grid": grid, "chosen": best}
