"""The prune stage: calibration passes -> scores -> allocation -> physical pruning -> artifacts.

Artifacts: ``scores.safetensors`` (ranked scores and every part, per group, with the model config and allocation
settings in its metadata so ``ukmp plan`` can re-allocate without a model), ``plan.json``, ``model/`` (pruned,
reloadable), ``summary.json`` and ``kept_width.png``. With ``prune.iterations`` > 1 the scoring and allocation run
in rounds (:mod:`ukmp.prune.iterative`); ``plan.json`` and ``summary.json`` then list every round under ``rounds``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from ukmp.config import PruneConfig, RunConfig
from ukmp.groups import PrunableGroup, group_kinds
from ukmp.io import atomic_write_json, dense_model_identity, save_pruned
from ukmp.layer_ranges import describe_layers, layer_spans, select_layers
from ukmp.method_traits import method_traits
from ukmp.models import adapter_for, count_parameters
from ukmp.plan import PruningPlan
from ukmp.prune.allocate import AllocationConfig, allocate
from ukmp.prune.budget import overshoot_problem, ratio_check
from ukmp.prune.iterative import prune_in_rounds
from ukmp.prune.reuse import cached_scores, in_layers, plan_ratio, planned, save_scores
from ukmp.prune.scoring import get_method, is_data_free
from ukmp.runtime import load_dense, resolve_dataset, resolve_device

log = logging.getLogger(__name__)


def allocation_config(pc: PruneConfig, overrides: dict[str, Any] | None = None) -> AllocationConfig:
    """The allocator's settings from ``prune.*``, with the ones a method imposes (``overrides``) on top. A method
    that imposes the global scope (LLM-Pruner's global pruning) takes ``prune.scope=uniform`` as its uniform form;
    one that allocates within each module (scope local) cannot, which is an error."""
    d = dict(target_ratio=pc.ratio, scope=pc.scope, normalization=pc.normalization,
             units_per_step=pc.units_per_step, fine_units_per_step=pc.fine_units_per_step,
             max_group_prune_ratio=pc.max_group_prune_ratio, local_rounding=pc.local_rounding,
             exact_stop=pc.exact_stop, budget=pc.budget, width_multiple=pc.width_multiple, rank_by=pc.rank_by)
    d.update(overrides or {})
    if pc.scope == "uniform" and d["scope"] == "global":
        d["scope"] = "uniform"
    elif pc.scope == "uniform" and d["scope"] != "uniform":
        raise ValueError(f"prune.scope: uniform ranks across layers, and {pc.method} allocates within each module "
                         f"(scope {d['scope']}); use a method with a global allocation")
    return AllocationConfig.from_dict(d)


def check_width_options(pc: PruneConfig, own_plan: bool) -> None:
    """``prune.width_multiple`` and ``prune.scope=uniform`` shape the shared allocator's plan: a method that makes its
    own (FLAP, UPop, ECoFLaP, Wanda-sp with carry rounding) is refused them in one line."""
    if own_plan and (pc.width_multiple > 1 or pc.scope == "uniform"):
        what = "prune.width_multiple" if pc.width_multiple > 1 else "prune.scope=uniform"
        raise ValueError(f"{what}: {pc.method} makes its own plan; engine-friendly widths apply to methods ranked by "
                         f"the shared allocator (ukmp, random, magnitude, magnitude_sp, llm_pruner_global/local, "
                         f"wanda_sp with local_rounding=floor)")


def text_calibration(cfg: RunConfig):
    """The text dataset ``data.calibration_text`` names (None when unset); anything but plain text is an error."""
    if not cfg.data.calibration_text:
        return None
    from ukmp.data.loaders import load_dataset
    from ukmp.data.records import TextDataset

    text = load_dataset(resolve_dataset(cfg.data.calibration_text, cfg.output_dir))
    if not isinstance(text, TextDataset):
        raise ValueError(f"data.calibration_text: {cfg.data.calibration_text} is not a text dataset (format: text)")
    return text


def calibration_batches(cfg: RunConfig, processor, model, ds=None, text=None):
    """(batches(epoch) -> iterator, number of batches, sample ids) over ``prune.num_samples`` shuffled samples
    (of ``ds``, or of the dataset ``data.calibration`` names). With ``data.calibration_text`` (a vision-language
    model), ``prune.num_text_samples`` shuffled windows of that text follow every epoch's image-text batches, in
    batches of their own that run through the language model alone (:func:`ukmp.models.forward_batch`)."""
    from ukmp.data.loaders import load_dataset

    if ds is None:
        ds = load_dataset(resolve_dataset(cfg.data.calibration, cfg.output_dir))
    layout = adapter_for(model).batch_layout()
    sources = [_calibration_source(cfg, ds, processor, layout, cfg.prune.num_samples,
                                   f"data.calibration: {cfg.data.calibration}", config=model.config)]
    if cfg.data.calibration_text:
        if not layout.has_images:
            raise ValueError(f"data.calibration_text: {cfg.data.calibration_text} is for a vision-language model; "
                             f"give a language model's text as data.calibration")
        text = text if text is not None else text_calibration(cfg)
        sources.append(_calibration_source(cfg, text, processor, layout,
                                           cfg.prune.num_text_samples or cfg.prune.num_samples,
                                           f"data.calibration_text: {cfg.data.calibration_text}", prefix="text:"))
    bs = cfg.prune.batch_size

    def batches(epoch: int):
        from ukmp.data.batches import calibration_chunks, prefetched

        jobs = ((collate, chunk) for collate, chosen, _ in sources
                for chunk in calibration_chunks(chosen, bs, collate, epoch, cfg.prune.group_by_length))
        return prefetched((collate(c, epoch) for collate, c in jobs), cfg.prune.prefetch)

    n_batches = sum(math.ceil(len(chosen) / bs) for _, chosen, _ in sources)
    return batches, n_batches, [i for _, _, ids in sources for i in ids]


def _calibration_source(cfg: RunConfig, ds, processor, layout, wanted: int, where: str, prefix: str = "",
                        config=None):
    """(collator, chosen sample indices, their ids): ``wanted`` samples of ``ds`` (``where``: its config field and
    file, for messages) in a seeded shuffle; image-text prompts in the style the dataset and the family of the
    model ``config`` give (:func:`ukmp.data.prompts.resolve_style`)."""
    from ukmp.data.batches import dataset_size, make_collator
    from ukmp.data.prompts import resolve_style
    from ukmp.data.records import TextDataset

    style = ("plain" if config is None or isinstance(ds, TextDataset)
             else resolve_style(getattr(ds, "prompt_style", None), processor, config, where))
    collate = make_collator(ds, processor, layout, cfg.data.image_size or None, cfg.data.max_text_tokens,
                            cfg.data.augment, cfg.seed, prompt_style=style)
    size = dataset_size(ds, collate)
    if size == 0:
        raise ValueError(f"{where} holds no samples")
    order = list(range(size))
    random.Random(cfg.seed).shuffle(order)
    n = min(wanted, size)
    if n < wanted:
        log.warning("calibration: %d samples requested, %s has %d", wanted, where, size)
    chosen = order[:n]
    records = getattr(collate, "records", None) or ds.records
    ids = [prefix + (r if isinstance(r, str) else getattr(r, "id", str(i)))
           for i, r in ((i, records[i]) for i in chosen)]
    return collate, chosen, ids


def check_shortfall(plan: PruningPlan, allow: bool, flag: str = "prune.allow_shortfall=true") -> None:
    """A plan that stopped short of its target because every group sits at its floor is an error unless allowed."""
    m = plan.meta
    if m.get("reached_target", True) or not m.get("floors_hit", False):
        return
    msg = (f"ratio {m.get('target_ratio')} cannot be reached: every group is at its floor "
           f"(max_group_prune_ratio={m.get('config', {}).get('max_group_prune_ratio', '?')}); the plan removes "
           f"{m.get('achieved_ratio', float('nan')):.4f}")
    if not allow:
        raise ValueError(f"{msg} (pass {flag} to accept the shortfall)")
    log.warning("%s; accepted (%s)", msg, flag)


def check_overshoot(plan: PruningPlan, chosen: list[PrunableGroup], total: int, pc: PruneConfig) -> dict[str, Any]:
    """The plan's ratio against its target in its budget's currency (:func:`ukmp.prune.budget.ratio_check`); more
    than one smallest unit away warns, an overshoot beyond ``prune.max_overshoot`` too is an error."""
    check = ratio_check(plan.meta, chosen, total, pc.ratio)
    msg, error = overshoot_problem(check, pc.max_overshoot)
    check["max_overshoot"] = pc.max_overshoot
    if error:
        raise ValueError(f"prune.max_overshoot: {msg}, over by more than max_overshoot "
                         f"({100 * pc.max_overshoot:.2f} points) and its largest unit "
                         f"({100 * check['largest_unit']:.3f}); raise prune.max_overshoot, or set "
                         f"prune.exact_stop=true for a global allocation")
    if msg:
        log.warning("prune: %s", msg)
    return check


def kind_breakdown(groups: list[PrunableGroup], plan: PruningPlan | None) -> dict[str, dict[str, int]]:
    out = {}
    for kind in group_kinds(groups):
        gs = [g for g in groups if g.kind == kind]
        if gs:
            before = sum(g.total_params for g in gs)
            removed = sum(len(plan.removed(g)) * g.params_per_unit for g in gs) if plan else 0
            out[kind] = {"units_before": sum(g.n_units for g in gs),
                         "units_after": sum(len(plan.kept(g)) if plan else g.n_units for g in gs),
                         "params_before": before, "params_after": before - removed}
    return out


def plot_kept_width(groups: list[PrunableGroup], plan: PruningPlan, path: Path, title: str = "") -> None:
    """Heat map: fraction of units kept per layer (columns) and group kind (rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kinds = group_kinds(groups)
    n_layers = max(g.layer for g in groups) + 1
    grid = np.full((len(kinds), n_layers), np.nan)
    for g in groups:
        grid[kinds.index(g.kind), g.layer] = len(plan.kept(g)) / g.n_units
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * n_layers + 2), 0.5 * len(kinds) + 1.5))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_xlabel("layer")
    if n_layers <= 48:
        ax.set_xticks(range(n_layers))
    ax.set_title(title or "kept width (fraction of units)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


class _Clock:
    """Seconds per phase: ``lap(name)`` records the time since the previous lap."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.laps[name] = round(now - self._t, 3)
        self._t = now
        return self.laps[name]


def run_prune_stage(cfg: RunConfig, out: Path) -> dict[str, Any]:
    clock = _Clock()
    get_method(cfg.prune.method)  # an unknown method or unreadable calibration data fails before the model loads
    check_width_options(cfg.prune, method_traits(cfg.prune.method).plan == "own")
    calib = text = None
    if not (cfg.prune.scores_from or cfg.prune.plan_from) and not is_data_free(cfg.prune.method):
        from ukmp.data.loaders import load_dataset

        calib = load_dataset(resolve_dataset(cfg.data.calibration, cfg.output_dir))
        if len(calib) == 0:
            raise ValueError(f"data.calibration: {cfg.data.calibration} holds no samples")
        text = text_calibration(cfg)  # unreadable or non-text data fails before the model loads too
    device = resolve_device(cfg.model.device)
    model, processor = load_dense(cfg.model, device)
    adapter = adapter_for(model)
    total = count_parameters(model)
    before = adapter.parameter_breakdown(model)
    dense_identity = dense_model_identity(cfg.model, model)  # of the dense model, before any layer is dropped
    drop = adapter.drop_unused(model) if cfg.prune.drop_unused_layers else {}
    pc = cfg.prune
    if drop:  # removed before scoring; the units then make up the rest of the ratio of the whole (dense) model
        adapter.apply_(model, PruningPlan(keep={}, drop_layers=drop))
        adapter = adapter_for(model)
        dropped = sum(d["params"] for d in drop.values())
        pc = replace(pc, ratio=max(0.0, (cfg.prune.ratio * total - dropped) / (total - dropped)))
        log.info("prune: dropped %s unused layers (%s parameters, %.2f%%) before scoring", drop, f"{dropped:,}",
                 100 * dropped / total)
    groups = adapter.groups()
    chosen = select_layers(groups, pc.layers)  # the rest stays whole and counts as unprunable
    if pc.layers:
        log.info("prune: layers %s", describe_layers(groups, chosen))
    scored_total = count_parameters(model)
    log.info("prune: %s loaded on %s in %.1f s: %s parameters, %d groups, %s units", cfg.model.source, device,
             clock.lap("load"), f"{total:,}", len(groups), f"{sum(g.n_units for g in groups):,}")
    rounds = None
    if pc.plan_from:
        result, ids, n_batches = planned(pc.plan_from, groups, total, model.config.model_type), [], 0
    elif pc.scores_from:
        result, ids, n_batches = cached_scores(pc.scores_from, groups, scored_total, pc.method), [], 0
        result.scores = in_layers(result.scores, chosen, pc)
    else:
        method = get_method(pc.method)
        if is_data_free(pc.method):
            batches, n_batches, ids = (lambda epoch: iter(())), 0, []
        else:
            batches, n_batches, ids = calibration_batches(cfg, processor, model, calib, text)
        if pc.iterations > 1:  # k rounds, each re-scoring the model the previous ones pruned (masked)
            rounds = prune_in_rounds(model, groups, scored_total, pc.iterations, pc.method,
                                     lambda: method(model, chosen, batches, pc, n_batches),
                                     lambda r: allocation_config(pc, r.allocation))
            result = rounds.result
        else:
            result = method(model, chosen, batches, pc, n_batches)
    sel = (f"; {result.stats['tokens_selected']:,} of {result.stats['tokens_total']:,} target tokens selected"
           if "tokens_selected" in result.stats else "")
    log.info("prune: %s scores from %d calibration samples (%d batches) in %.1f s%s",
             "given plan" if pc.plan_from else pc.method if not pc.scores_from else "cached",
             len(ids), n_batches, clock.lap("score"), sel)
    check_width_options(pc, result.plan is not None and not pc.plan_from)
    if result.plan is not None and pc.budget == "units" and not pc.plan_from:
        raise ValueError(f"prune.budget: 'units' is a budget of the shared allocator; {pc.method} makes its own plan, "
                         f"in whole-model parameters (use prune.budget=params)")
    if result.plan is not None and pc.rank_by != "importance" and not pc.plan_from:
        raise ValueError(f"prune.rank_by: {pc.rank_by!r} ranks in the shared allocator; {pc.method} makes its own "
                         f"plan (use prune.rank_by=importance)")
    acfg = allocation_config(pc, result.allocation)
    if rounds is not None:
        plan = rounds.plan
    else:
        plan = result.plan if result.plan is not None else allocate(result.scores, groups, scored_total, acfg)
    target = plan_ratio(plan) if pc.plan_from else cfg.prune.ratio  # --plan: the labels say the plan's ratio
    plan.meta.update(method=cfg.prune.method, seed=cfg.seed, num_samples=len(ids),
                     model_type=model.config.model_type, whole_model_ratio=target)  # every plan says its ratio
    if drop:
        plan.drop_layers = drop
        plan.meta.update(dropped_params=sum(d["params"] for d in drop.values()))
    if not pc.plan_from:  # a given plan's shortfall was accepted when it was written (ukmp plan)
        check_shortfall(plan, pc.allow_shortfall)
        plan.meta["ratio_check"] = check_overshoot(plan, chosen, scored_total, pc)
    elif "removed_params" in plan.meta:  # stated against the plan's own target, as written by ukmp plan
        plan.meta["ratio_check"] = ratio_check(plan.meta, groups, scored_total,
                                               float(plan.meta.get("target_ratio", pc.ratio)))
    log.info("prune: allocated in %.1f s (%s)", clock.lap("allocate"),
             f"{plan.meta['steps']} steps" if "steps" in plan.meta else "method's own plan")
    if not pc.plan_from:  # a given plan comes without scores
        save_scores(out / "scores.safetensors", result, model.config, scored_total, acfg, cfg.prune.method, drop)
    model.zero_grad(set_to_none=True)
    if result.pre_apply is not None:
        adapter.add_out_biases_(model, plan.out_bias)
        result.pre_apply(model, plan)
    adapter.apply_(model, plan)
    after = adapter.parameter_breakdown(model)
    save_pruned(model, plan, out / "model", processor=processor, extra={"dense_model": dense_identity})
    plan.save(out / "plan.json")
    achieved = (total - count_parameters(model)) / total
    target = achieved if target is None else target  # a hand-written plan: no target but what it removes
    plot_kept_width(groups, plan, out / "kept_width.png",
                    f"{cfg.prune.method}: kept width, achieved ratio {achieved:.4f} (target {target:g})")
    clock.lap("apply_and_save")
    summary = {
        "method": cfg.prune.method,
        "target_ratio": target,
        "achieved_ratio": achieved,
        "plan_digest": plan.digest(),
        "parameters": {"total_before": total, "total_after": count_parameters(model),
                       "by_modality_before": before, "by_modality_after": after,
                       "by_group_kind": kind_breakdown(groups, plan)},
        "calibration": {"samples": len(ids), "batches": n_batches, **result.stats},
        "calibration_sample_ids": ids,
        "allocation": acfg.to_dict(),
        "ratio_check": plan.meta.get("ratio_check"),
        "layers": describe_layers(groups, scored := [g for g in groups if g.id in result.scores] if result.scores
                                  else chosen),
        "layer_spans": layer_spans(groups, scored),
        "allocation_meta": {k: v for k, v in plan.meta.items() if k not in ("config", "ratio_check")},  # above
        "prune_config": {f.name: getattr(cfg.prune, f.name) for f in fields(cfg.prune)},
        "seconds": clock.laps,
    }
    atomic_write_json(out / "summary.json", summary)
    check = summary["ratio_check"] or {}
    label = (f"{100 * check['achieved']:.2f}% of the units in range, target {100 * check['target']:.2f}%"
             if check.get("budget") == "units" else f"target {100 * target:.2f}%")
    log.info("prune: removed %.2f%% of %s parameters (%s); applied and saved in %.1f s",
             100 * summary["achieved_ratio"], f"{total:,}", label, clock.laps["apply_and_save"])
    return {"achieved_ratio": summary["achieved_ratio"], "plan_digest": plan.digest()}
