"""The evaluation stage: run the requested zero-shot tasks on a dense or pruned model and save everything.

Tasks (UKMP_METHOD.md §4): ``okvqa``, ``vqav2`` (VQA accuracy), ``gqa`` (exact match), ``nocaps``,
``coco_caption`` (CIDEr, SPICE if available, BLEU-4, METEOR, ROUGE-L), ``flickr30k`` (TR/IR@1/5/10 with the
stage-1 image-text model, the evaluated ViT transplanted into it) and ``perplexity`` (a decoder-only language model,
alone or inside a VLM, on a ``format: text`` dataset). Dataset YAMLs come from ``eval.datasets``
(task -> YAML) or default to the generated sample data.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ukmp.config import RunConfig
from ukmp.io import atomic_write_json
from ukmp.runtime import SAMPLE_PREFIX, load_dense, resolve_dataset, resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # vqa | gqa | caption | retrieval | perplexity
    sample: str  # sample dataset name
    image_scale: float = 1.0  # image size relative to the model's (NoCaps and retrieval: 364 / 224)


RESOLUTION_364 = 364 / 224
TASKS = {
    "okvqa": Task("okvqa", "vqa", "okvqa"),
    "vqav2": Task("vqav2", "vqa", "vqav2"),
    "gqa": Task("gqa", "gqa", "gqa"),
    "nocaps": Task("nocaps", "caption", "nocaps", RESOLUTION_364),
    "coco_caption": Task("coco_caption", "caption", "coco_karpathy"),
    "flickr30k": Task("flickr30k", "retrieval", "flickr30k", RESOLUTION_364),
    "perplexity": Task("perplexity", "perplexity", "text"),
}


def task_image_size(model, task: Task) -> int:
    from ukmp.models import adapter_for

    layout = adapter_for(model).batch_layout()
    if not layout.has_images:
        raise ValueError(f"eval task {task.name!r}: the model has no vision tower (a plain language model "
                         f"evaluates 'perplexity' only)")
    if task.image_scale == 1.0 or layout.fixed_image_size:  # LLaVA: another size would change the image tokens
        return layout.image_size
    size = layout.image_size * task.image_scale
    return max(layout.patch_size, int(round(size / layout.patch_size)) * layout.patch_size)


def check_tasks(model, tasks: list[str]) -> None:
    """Every task against what the model's family can run, before the first task runs (a config whose model
    family was not known offline is checked here, once the model has loaded)."""
    from ukmp.models.families import family_label
    from ukmp.models.registry import supported_task_kinds

    kinds = supported_task_kinds(model)
    for name in tasks:
        if kinds is not None and TASKS[name].kind not in kinds:
            raise ValueError(f"eval task {name!r}: {family_label(model.config.to_dict())} cannot run it (it runs "
                             f"{', '.join(t for t in TASKS if TASKS[t].kind in kinds) or 'no task'})")


def _dataset(cfg: RunConfig, task: Task):
    from ukmp.data.loaders import load_dataset

    spec = cfg.eval.datasets.get(task.name, SAMPLE_PREFIX + task.sample)
    overrides = {"max_samples": cfg.eval.max_samples} if cfg.eval.max_samples else {}
    return load_dataset(resolve_dataset(spec, cfg.output_dir), **overrides)


def _retrieval_model(cfg: RunConfig, model):
    from ukmp.eval.retrieval import build_tiny_retrieval, load_retrieval_model

    from ukmp.models.build import TINY

    if cfg.eval.retrieval_model == "auto" and cfg.model.source in TINY:
        return build_tiny_retrieval(model.config, seed=cfg.model.seed)
    source = "Salesforce/blip2-itm-vit-g" if cfg.eval.retrieval_model == "auto" else cfg.eval.retrieval_model
    return load_retrieval_model(source, dtype=cfg.model.dtype, device=next(model.parameters()).device)


def vqa_metrics(dataset, preds: list[dict[str, Any]], scorer: str, lemmatize: bool) -> dict[str, Any]:
    """VQA accuracy of ``preds`` by ``scorer`` (``eval.vqa_scorer``), naming the scorer; for OK-VQA (``lemmatize``)
    the answers first pass through the reference's spaCy lemmatiser when it is installed, and the metrics say
    whether it was applied. Lemmatised answers are kept next to the generated ones in ``preds``."""
    from ukmp.eval.metrics import vqa_score
    from ukmp.eval.normalize import SPACY_MODEL, lemmatize_answers, load_lemmatizer

    extra: dict[str, Any] = {"scorer": scorer}
    if lemmatize:
        nlp, why = load_lemmatizer()
        if nlp is None:
            extra["lemmatizer"] = why
        else:
            for p, lemma in zip(preds, lemmatize_answers([p["answer"] for p in preds], nlp)):
                p["answer_generated"], p["answer"] = p["answer"], lemma
            extra["lemmatizer"] = f"spacy {SPACY_MODEL}"
    scores = vqa_score({p["question_id"]: p["answer"] for p in preds}, dataset.gts(), scorer=scorer)
    return {**scores, **extra}


def evaluate_task(cfg: RunConfig, model, processor, task: Task, out: Path) -> dict[str, Any]:
    from ukmp.eval import evaluators
    from ukmp.eval.retrieval import evaluate_retrieval, retrieval_predictions, transplant_vision_

    ds = _dataset(cfg, task)
    if task.kind == "perplexity":
        from ukmp.eval.perplexity import evaluate_perplexity

        metrics, preds = evaluate_perplexity(model, processor, ds, batch_size=cfg.eval.batch_size)
        atomic_write_json(out / task.name / "predictions.json", preds)
        atomic_write_json(out / task.name / "metrics.json", metrics)
        return metrics
    size = task_image_size(model, task)
    common: dict[str, Any] = dict(image_size=size, batch_size=cfg.eval.batch_size, num_beams=cfg.eval.num_beams)
    if task.kind in ("vqa", "gqa", "caption"):  # the dataset YAML's prompt_style, else the family's default
        from ukmp.data.prompts import dataset_style

        common["prompt_style"] = dataset_style(ds, processor, model.config, task.name)
    # LAVIS passes min_length to T5's generate, which counts the decoder start token: min_len 1 / 8 there means at
    # least 0 / 7 new tokens here.
    if task.kind in ("vqa", "gqa"):
        metrics, preds = evaluators.evaluate_vqa(model, processor, ds, kind=task.kind, min_new_tokens=0, **common)
        if task.kind == "vqa":
            metrics = vqa_metrics(ds, preds, cfg.eval.vqa_scorer, lemmatize=task.name == "okvqa")
    elif task.kind == "caption":
        metrics, preds = evaluators.evaluate_caption(model, processor, ds, min_new_tokens=7, **common)
    else:
        retrieval, text_tokenizer = _retrieval_model(cfg, model)
        transplant_vision_(retrieval, model)
        metrics, details = evaluate_retrieval(retrieval, text_tokenizer, ds, image_size=size,
                                              batch_size=cfg.eval.batch_size)
        preds = retrieval_predictions(details)
    atomic_write_json(out / task.name / "predictions.json", preds)
    atomic_write_json(out / task.name / "metrics.json", metrics)
    return metrics


def run_eval_stage(cfg: RunConfig, model_dir: Path | None, tasks: list[str], out: Path) -> dict[str, Any]:
    """Evaluate the pruned model in ``model_dir`` (or the dense model when ``None``) on ``tasks``."""
    from ukmp.io import load_pruned
    from ukmp.runtime import load_processor

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"eval tasks: unknown {unknown} (choose from {', '.join(TASKS)})")
    from ukmp.preflight import Reach, check_reach

    check_reach(cfg, Reach(tasks=(("eval tasks", tuple(tasks)),)))  # datasets, Java: before the model loads
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is a file; the evaluation writes a directory")
    device = resolve_device(cfg.model.device)
    if model_dir is None:
        model, processor = load_dense(cfg.model, device)
    else:
        model = load_pruned(model_dir, device=device, dtype=cfg.model.dtype,
                            attn_implementation=cfg.model.attn_implementation)
        processor = load_processor(model_dir)
    check_tasks(model, tasks)
    # every task writes into a staging directory; only a complete evaluation publishes its task directories and
    # metrics.json, so a failure leaves no per-task metrics without the top-level file
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".eval.*.tmp"):  # left by a killed evaluation
        shutil.rmtree(stale, ignore_errors=True)
    staging = out / f".eval.{uuid.uuid4().hex[:8]}.tmp"
    results: dict[str, Any] = {}
    try:
        for name in tasks:
            t0 = time.perf_counter()
            metrics = evaluate_task(cfg, model, processor, TASKS[name], staging)
            metrics = {**metrics, "seconds": round(time.perf_counter() - t0, 2)}
            results[name] = metrics
            log.info("eval %s: %s", name, {k: round(v, 2) for k, v in metrics.items() if isinstance(v, float)})
        for name in dict.fromkeys(tasks):
            if (out / name).exists():
                shutil.rmtree(out / name)
            os.replace(staging / name, out / name)
        atomic_write_json(out / "metrics.json", results)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"tasks": tasks}
