"""One in-process pipeline: [dense eval] -> prune -> eval -> finetune -> eval, resumable stage by stage.

Layout under ``<output_dir>/<name>/``::

    config.yaml            the resolved config of the last invocation
    eval_dense/            (eval.dense) metrics.json + per-task predictions
    prune/                 scores.safetensors, plan.json, summary.json, kept_width.png, model/ (pruned, reloadable)
    eval_pruned/           metrics.json + <task>/predictions.json
    finetune/              model/ (merged, reloadable), loss.png, train_log.json
    eval_finetuned/        metrics.json + per-task predictions
    results.json  results.md  manifest.json
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ukmp.config import RunConfig, hashed_section
from ukmp.io import atomic_write_json, atomic_write_text
from ukmp.runtime import resolve_device
from ukmp.stages import StageRecord, read_stage, run_stage

log = logging.getLogger(__name__)

STAGES = ("eval_dense", "prune", "eval_pruned", "finetune", "eval_finetuned")


def git_commit(start: Path | None = None) -> str | None:
    """The checked-out commit, read from .git without running git."""
    here = (start or Path(__file__)).resolve()
    for d in [here, *here.parents]:
        head = d / ".git" / "HEAD"
        if head.is_file():
            ref = head.read_text().strip()
            if ref.startswith("ref: "):
                f = d / ".git" / ref[5:]
                if f.is_file():
                    return f.read_text().strip()
                packed = d / ".git" / "packed-refs"
                if packed.is_file():
                    for line in packed.read_text().splitlines():
                        if line.endswith(ref[5:]):
                            return line.split()[0]
                return None
            return ref
    return None


def file_digest(path: str) -> str | None:
    """Content hash of a file that a stage reads (so a changed input invalidates the stage)."""
    import hashlib

    if not path or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def prompt_parts(specs) -> list[Any]:
    """``[(spec, prompt_style)]`` of the dataset YAMLs in ``specs`` that set ``prompt_style``: part of the hash of
    a stage that reads them, so a changed style reruns the stage (empty when none sets it: older hashes hold)."""
    from ukmp.data.config import load_dataset_config
    from ukmp.runtime import SAMPLE_PREFIX

    out = []
    for spec in specs:
        if spec and not spec.startswith(SAMPLE_PREFIX) and Path(spec).is_file():
            style = load_dataset_config(spec).prompt_style
            if style is not None:
                out.append((spec, style))
    return out


def with_prompt_styles(parts: list[Any], specs) -> list[Any]:
    extra = prompt_parts(specs)
    return parts + [extra] if extra else parts


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("ukmp", "torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def results_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: one row per task metric, one column per model state (dense / pruned / recovered)."""
    states = [s for s in ("dense", "pruned", "recovered") if s in results]
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for state in states:
        for task, metrics in results[state].items():
            for metric, value in metrics.items():
                if isinstance(value, (int, float)) and metric not in ("n", "count", "seconds", "tokens"):
                    rows.setdefault((task, metric), {})[state] = float(value)
    lines = ["| task | metric | " + " | ".join(states) + " |", "|---|---|" + "---:|" * len(states)]
    for (task, metric), vals in rows.items():
        cells = [f"{vals[s]:.2f}" if s in vals else "–" for s in states]
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def prune_stage(cfg: RunConfig, root: Path, force: bool = False) -> StageRecord:
    """The prune stage under ``root/prune`` (shared by ``ukmp run`` and ``ukmp prune``, so their hashes agree)."""
    from ukmp.prune.stage import run_prune_stage

    parts = [asdict(cfg.model), hashed_section("data", cfg.data), hashed_section("prune", cfg.prune), cfg.seed,
             file_digest(cfg.prune.scores_from)]
    if cfg.prune.plan_from:
        parts.append(file_digest(cfg.prune.plan_from))
    parts = with_prompt_styles(parts, [cfg.data.calibration])
    return run_stage("prune", root / "prune", parts, [], lambda out: run_prune_stage(cfg, out), force=force)


def finetune_stage(cfg: RunConfig, root: Path, pruned_dir: Path, upstream: list[StageRecord],
                   force: bool = False) -> StageRecord:
    """The finetune stage under ``root/finetune`` (shared by ``ukmp run`` and ``ukmp finetune``)."""
    from ukmp.recover.stage import run_finetune_stage

    parts = [asdict(cfg.model), hashed_section("data", cfg.data), asdict(cfg.finetune), cfg.seed, str(pruned_dir)]
    parts = with_prompt_styles(parts, [cfg.data.finetune])
    return run_stage("finetune", root / "finetune", parts, upstream,
                     lambda out: run_finetune_stage(cfg, pruned_dir, out, work=root / "finetune.work"), force=force)


def completed_stage(name: str, path: Path) -> list[StageRecord]:
    """A stage finished on disk as an upstream record (``[]`` when there is none)."""
    info = read_stage(path)
    if not info:
        return []
    return [StageRecord(name, path, info["hash"], info["run_id"], True, 0.0, info.get("info", {}))]


def preflight(cfg: RunConfig, reach) -> None:
    """Everything a run will reach (a :class:`ukmp.preflight.Reach`), checked before its first stage: the tasks,
    datasets and Java (:func:`ukmp.preflight.check_reach`), the method name, a ratio above the model's structural
    ceiling (from its config, built on the meta device) and an empty last recovery sub-stage."""
    from ukmp.method_traits import method_traits
    from ukmp.preflight import check_reach
    from ukmp.prune.scoring import get_method

    p = cfg.prune
    if reach.prune and not p.plan_from:
        get_method(p.method)
    check_reach(cfg, reach, data_free=method_traits(p.method).data_free)
    if reach.prune and not (p.plan_from or p.allow_shortfall):
        check_ceiling(cfg)
    if reach.finetune:
        check_final_stage(cfg)


def check_ceiling(cfg: RunConfig) -> None:
    """Refuse ``prune.ratio`` above what the allocation could ever reach, when the model's config can be read
    offline; no weights are read. The ceiling is an upper bound, so a reachable ratio is never refused: the unused
    layers, plus every unit but one of each group inside ``prune.layers`` (local scope: at most
    ``max_group_prune_ratio`` of each group; the global loop may step past that floor, so it is not applied there),
    counted in parameters or, with ``prune.budget=units``, in units of the scored groups."""
    from ukmp.models.build import build_model, config_from_dict
    from ukmp.models.families import family, source_config

    config = source_config(cfg.model.source)
    if config is None and cfg.model.gguf_file:  # a GGUF file: its header holds the config (no tensors are read)
        from ukmp.inspect import gguf_config

        try:
            config = gguf_config(Path(cfg.model.source) / cfg.model.gguf_file).to_dict()
        except ValueError:
            return  # the model load says what is wrong
    if config is None or family(config) is None or cfg.prune.ratio == 0.0:  # the model load says what is wrong
        return
    model = build_model(config_from_dict(dict(config), cfg.model.source), device="meta", seed=None)
    ceiling, what = structural_ceiling(cfg, model)
    if cfg.prune.ratio > ceiling:
        raise ValueError(f"prune.ratio: {cfg.prune.ratio} cannot be reached on {cfg.model.source}: removing every "
                         f"unit the allocation may take ({what}) removes {ceiling:.4f} of its "
                         f"{'units' if cfg.prune.budget == 'units' else 'parameters'} (pass "
                         f"prune.allow_shortfall=true to accept the shortfall)")


def structural_ceiling(cfg: RunConfig, model) -> tuple[float, str]:
    """``(ceiling, note)``: the largest ``prune.ratio`` the allocation could reach on ``model`` (a meta model will
    do), as :func:`check_ceiling` describes, and a note of the limits that applied for its message."""
    import math

    from ukmp.layer_ranges import select_layers
    from ukmp.models import adapter_for, count_parameters
    from ukmp.plan import PruningPlan

    pc = cfg.prune
    adapter = adapter_for(model)
    total = count_parameters(model)
    dropped = 0
    if pc.drop_unused_layers:
        drop = adapter.drop_unused(model)
        dropped = sum(d["params"] for d in drop.values())
        if drop:  # the stage drops them before scoring: their groups are not ranked
            adapter.apply_(model, PruningPlan(keep={}, drop_layers=drop))
            adapter = adapter_for(model)
    groups = select_layers(adapter.groups(), pc.layers)

    def cap(n: int) -> int:
        c = n - 1
        return min(c, math.floor(pc.max_group_prune_ratio * n + 1e-9)) if pc.scope == "local" else c

    what = ", ".join(["all but one of each group" if pc.scope != "local" else
                      f"at most {pc.max_group_prune_ratio} of each group, leaving one", *(
                          ["only inside prune.layers"] if pc.layers else [])])
    if pc.budget == "units":  # the stage counts the dropped layers' parameters first, then units of the rest
        units = sum(g.n_units for g in groups)
        unit_cap = sum(cap(g.n_units) for g in groups) / units if units else 0.0
        # prune.ratio r becomes (r * total - dropped) / (total - dropped) of the units once the layers are dropped
        return (unit_cap * (total - dropped) + dropped) / total, what
    return (dropped + sum(cap(g.n_units) * g.params_per_unit for g in groups)) / total, what


def check_final_stage(cfg: RunConfig) -> None:
    """Recovery's sub-stage 7 (CE + KL) takes the data left after sub-stages 1-6 unless
    ``finetune.final_stage_samples`` sets it: refuse a run where nothing would be left, before any training."""
    from ukmp.data.loaders import load_dataset
    from ukmp.data.records import TextDataset
    from ukmp.recover.schedule import BASE_SAMPLES
    from ukmp.runtime import resolve_dataset

    fc = cfg.finetune
    if fc.final_stage_samples:
        return
    ds = load_dataset(resolve_dataset(cfg.data.finetune, cfg.output_dir))
    if isinstance(ds, TextDataset):  # its windows are counted after tokenisation, in the stage
        return
    before = sum(int(round(n * fc.sample_scale)) for n in BASE_SAMPLES[:6])
    if len(ds) <= before:
        raise ValueError(f"finetune.final_stage_samples: sub-stage 7 (CE + KL) would get no samples: "
                         f"data.finetune has {len(ds)} and sub-stages 1-6 take {before} "
                         f"(finetune.sample_scale={fc.sample_scale}); set finetune.final_stage_samples")


def run(cfg: RunConfig, force: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run (or resume) the whole pipeline; returns the results dict also written to ``results.json``."""
    from ukmp.eval.stage import run_eval_stage
    from ukmp.preflight import pipeline_reach

    preflight(cfg, pipeline_reach(cfg, only))
    root = Path(cfg.output_dir) / cfg.name
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    torch.manual_seed(cfg.seed)
    records: dict[str, StageRecord] = {}

    def want(stage: str) -> bool:
        return not only or stage in only

    def eval_stage(name: str, model_dir: Path | None, tasks: list[str], upstream: list[StageRecord]):
        return run_stage(
            name, root / name, with_prompt_styles([asdict(cfg.model), asdict(cfg.eval), tasks],
                                       [cfg.eval.datasets.get(t) for t in tasks]), upstream,
            lambda out: run_eval_stage(cfg, model_dir, tasks, out), force=name in force,
        )

    if cfg.eval.dense and want("eval_dense"):
        records["eval_dense"] = eval_stage("eval_dense", None, cfg.eval.after_finetune, [])
    records["prune"] = prune_stage(cfg, root, force="prune" in force)
    pruned_dir = root / "prune" / "model"
    if cfg.eval.after_prune and want("eval_pruned"):
        records["eval_pruned"] = eval_stage("eval_pruned", pruned_dir, cfg.eval.after_prune, [records["prune"]])
    if cfg.finetune.enabled and want("finetune"):
        records["finetune"] = finetune_stage(cfg, root, pruned_dir, [records["prune"]], force="finetune" in force)
        if cfg.eval.after_finetune and want("eval_finetuned"):
            records["eval_finetuned"] = eval_stage("eval_finetuned", root / "finetune" / "model",
                                                   cfg.eval.after_finetune, [records["finetune"]])
    return write_results(cfg, root, records)


def write_results(cfg: RunConfig, root: Path, records: dict[str, StageRecord]) -> dict[str, Any]:
    import json

    def metrics_of(stage: str) -> dict[str, Any] | None:
        f = root / stage / "metrics.json"
        return json.loads(f.read_text()) if stage in records and f.is_file() else None

    results: dict[str, Any] = {}
    for state, stage in (("dense", "eval_dense"), ("pruned", "eval_pruned"), ("recovered", "eval_finetuned")):
        m = metrics_of(stage)
        if m is not None:
            results[state] = m
    prune_summary = json.loads((root / "prune" / "summary.json").read_text())
    out = {
        "name": cfg.name,
        "method": cfg.prune.method,
        "target_ratio": cfg.prune.ratio,
        "achieved_ratio": prune_summary.get("achieved_ratio"),
        "parameters": prune_summary.get("parameters"),
        "vqa_scorer": cfg.eval.vqa_scorer,
        "metrics": results,
        "stages": {k: {"run_id": r.run_id, "skipped": r.skipped, "seconds": round(r.seconds, 2)}
                   for k, r in records.items()},
    }
    atomic_write_json(root / "results.json", out)
    table = results_table(results)
    from ukmp.eval.stage import TASKS

    vqa = any(TASKS[t].kind == "vqa" for m in results.values() for t in m if t in TASKS)  # the scorer's only use
    header = (f"# {cfg.name}: {cfg.prune.method} at ratio {cfg.prune.ratio} "
              f"(achieved {prune_summary.get('achieved_ratio', float('nan')):.4f})\n\n"
              + (f"VQA accuracy by the {cfg.eval.vqa_scorer} scorer.\n\n" if vqa else ""))
    atomic_write_text(root / "results.md", header + table)
    manifest = {
        "versions": package_versions(),
        "git_commit": git_commit(),
        "seeds": {"run": cfg.seed, "model": cfg.model.seed},
        "plan_digest": prune_summary.get("plan_digest"),
        "vqa_scorer": cfg.eval.vqa_scorer,
        "calibration_sample_ids": prune_summary.get("calibration_sample_ids"),
        "torch_device": str(resolve_device(cfg.model.device)),
        "stages": {k: str(r.path) for k, r in records.items()},
    }
    atomic_write_json(root / "manifest.json", manifest)
    log.info("results: %s", root / "results.md")
    return out
