"""What a run will reach, checked before any work and before torch is imported: every evaluation task against the
model's family, every dataset YAML's ``format`` against what it is given for, the files it names, and Java for the
caption metrics. Each problem is one :class:`~ukmp.config.ConfigError` line naming the key, task or file.

The torch-side checks (the method name, the structural ceiling of the ratio, recovery's last sub-stage) are
:func:`ukmp.pipeline.preflight`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ukmp.config import EVAL_TASK_KINDS, EVAL_TASKS, ConfigError, RunConfig

# evaluation task kind -> the dataset kinds (ukmp.data.config.FORMAT_KINDS) that serve it
TASK_DATA = {"vqa": ("vqa",), "gqa": ("vqa",), "caption": ("caption_eval",), "retrieval": ("retrieval",),
             "perplexity": ("text",)}
# why a family lacks a task kind, for the one-line refusal
_MISSING = {
    "retrieval": "Flickr30K retrieval runs BLIP-2's image-text matching model on the evaluated ViT, which needs a "
                 "BLIP-2-style ViT (BLIP-2, InstructBLIP)",
    "perplexity": "perplexity needs a decoder-only language model",
}
_NO_VISION = "a plain language model has no vision tower (it evaluates 'perplexity' only)"


@dataclass(frozen=True)
class Reach:
    """The parts of a run one command reaches: prune, finetune, and (key, tasks) per evaluation."""

    prune: bool = False
    finetune: bool = False
    tasks: tuple[tuple[str, tuple[str, ...]], ...] = ()


def pipeline_reach(cfg: RunConfig, only: tuple[str, ...] = ()) -> Reach:
    """What ``ukmp run`` (``only``: its ``--only`` stages) reaches, as :func:`ukmp.pipeline.run` runs it."""
    def want(stage: str) -> bool:
        return not only or stage in only

    e = cfg.eval
    tasks = []
    if e.dense and want("eval_dense"):
        tasks.append(("eval.after_finetune", tuple(e.after_finetune)))
    if e.after_prune and want("eval_pruned"):
        tasks.append(("eval.after_prune", tuple(e.after_prune)))
    finetune = cfg.finetune.enabled and want("finetune")
    if finetune and e.after_finetune and want("eval_finetuned"):
        tasks.append(("eval.after_finetune", tuple(e.after_finetune)))
    return Reach(prune=True, finetune=finetune, tasks=tuple(tasks))


def check_reach(cfg: RunConfig, reach: Reach, data_free: bool | None = False) -> None:
    """Every check of this module for what ``reach`` covers (``data_free``: the method reads no calibration; None:
    not known yet -- the method registry needs torch -- so the calibration data waits for the check that knows)."""
    from ukmp.models.families import family_label, model_types, source_config, task_kinds

    config = source_config(cfg.model.source)
    kinds = task_kinds(*model_types(config)) if config is not None else None
    for key, tasks in reach.tasks:
        for task in tasks:
            if task not in EVAL_TASK_KINDS:
                raise ConfigError(f"{key}: unknown task {task!r} (choose from {', '.join(EVAL_TASKS)})")
            kind = EVAL_TASK_KINDS[task]
            if kinds is not None and kind not in kinds:
                why = _MISSING.get(kind) if "vqa" in kinds or kind == "perplexity" else _NO_VISION
                raise ConfigError(f"{key}: task {task!r} cannot run on {family_label(config)} "
                                  f"(model.source={cfg.model.source}): {why}; remove it from {key}")
    vlm = None if kinds is None else "vqa" in kinds
    train = ("image_text",) if vlm else ("text",) if vlm is False else ("image_text", "text")
    p = cfg.prune
    if reach.prune and not (p.scores_from or p.plan_from) and data_free is False:
        check_dataset("data.calibration", cfg.data.calibration, train, "calibration")
        if cfg.data.calibration_text:
            check_dataset("data.calibration_text", cfg.data.calibration_text, ("text",), "language-model calibration")
    if reach.finetune:
        check_dataset("data.finetune", cfg.data.finetune, train, "recovery")
    for key, tasks in reach.tasks:
        for task in tasks:
            kind = EVAL_TASK_KINDS[task]
            if task in cfg.eval.datasets:
                check_dataset(f"eval.datasets.{task}", cfg.eval.datasets[task], TASK_DATA[kind], f"task {task!r}")
            if kind == "caption" and shutil.which("java") is None:
                raise ConfigError(f"{key}: task {task!r} scores captions with pycocoevalcap, which needs Java: 'java' "
                                  f"is not on PATH (install a Java runtime, or remove the task)")


def check_dataset(key: str, spec: str, accepted: tuple[str, ...], purpose: str) -> None:
    """``spec`` (a dataset YAML or ``sample:<format>``) holds data of an ``accepted`` kind, and its files exist: the
    annotations, the references, and a non-empty image folder."""
    from ukmp.data.config import FORMAT_KINDS, KIND_LABELS, load_dataset_config

    if spec.startswith("sample:"):
        fmt, cfg = spec[len("sample:"):], None
    else:
        try:
            cfg = load_dataset_config(spec)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from None
        fmt = cfg.format
    kind = FORMAT_KINDS.get(fmt)
    if kind is not None and kind not in accepted:
        wanted = " or ".join(f"{KIND_LABELS[k]} ({', '.join(f for f, x in FORMAT_KINDS.items() if x == k)})"
                             for k in accepted)
        raise ConfigError(f"{key}: {spec} has format {fmt!r} ({KIND_LABELS[kind]}), but {purpose} needs {wanted}")
    if cfg is None:  # generated sample data: written when first used
        return
    if kind != "text" and fmt != "text":
        if not cfg.images.is_dir():
            raise ConfigError(f"{key}: 'images' directory not found: {cfg.images} (from {spec})")
        with os.scandir(cfg.images) as it:
            if next(it, None) is None:
                raise ConfigError(f"{key}: 'images' directory is empty: {cfg.images} (from {spec})")
    for path in (*cfg.annotations, *((cfg.gt,) if cfg.gt else ())):
        if not Path(path).is_file():
            raise ConfigError(f"{key}: file not found: {path} (from {spec})")
