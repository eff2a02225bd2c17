"""Side-by-side comparison: the same model pruned by every method at one ratio, evaluated, tabulated, plotted.

Each method is an ordinary pipeline run under ``<output_dir>/<name>_compare_<ratio>/<method>/`` (so every stage is
cached and resumable); the dense model is evaluated once. All methods see the same calibration samples and
augmentations (same ids and seeds). Methods that differ only in allocation reuse the scores of their sibling
(``llm_pruner_local`` re-allocates ``llm_pruner_global``'s scores via ``prune.scores_from``). The dense evaluation
is a stage of its own under ``<output_dir>/<name>_compare_dense/eval_dense_<key>/``, keyed by what it depends on
(model, eval settings, tasks): a comparison at another ratio, or with other methods, reuses it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ukmp.config import RunConfig, load_config, section_hash
from ukmp.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("ukmp", "llm_pruner_global", "llm_pruner_local", "ecoflap_sp", "flap", "upop",
                   "magnitude_sp", "wanda_sp", "random")
PRIMARY_METRIC = {"vqa": "accuracy", "gqa": "accuracy", "caption": "cider", "retrieval": "r_mean",
                  "perplexity": "perplexity"}
SCORE_SHARING = {"llm_pruner_local": ("llm_pruner_global", ["prune.scope=local", "prune.normalization=none"])}


def method_config(configs: list[str], overrides: list[str], method: str, ratio: float, root: Path,
                  methods_dir: Path | None) -> RunConfig:
    """The run config of one method. Its delta ``<methods_dir>/<method>.yaml`` sits right on the first config file
    (the base the deltas are written against); every later file and every ``key=value`` override of the user wins
    over it."""
    files = list(configs)
    if methods_dir is not None and (methods_dir / f"{method}.yaml").is_file():
        files.insert(min(1, len(files)), str(methods_dir / f"{method}.yaml"))
    return load_config(files, [*overrides, f"prune.method={method}", f"prune.ratio={ratio}", f"name={method}",
                               f"output_dir={root}", "eval.dense=false"])


def primary(task: str) -> str:
    from ukmp.eval.stage import TASKS

    return PRIMARY_METRIC[TASKS[task].kind]


def allocation_label(summary: dict[str, Any]) -> str:
    """How a prune stage turned scores into a plan, by the names of its options: scope, budget, rounding or stop
    rule, engine-friendly widths, ranking per parameter, rounds, layer ranges (e.g. ``local, units budget,
    llm_pruner rounding, lm 4..27``, ``global, params budget, cut at target, ranked per param, 2 rounds``), or the
    method's own."""
    a, meta = summary.get("allocation", {}), summary.get("allocation_meta", {})
    if meta.get("allocator") != "ukmp.prune.allocate":
        label = f"own ({meta.get('allocator', summary.get('method'))})"
    elif a.get("scope") == "local":
        label = f"local, {a.get('budget', 'params')} budget, {a.get('local_rounding')} rounding"
    else:
        label = f"{a.get('scope', 'global')}, {a.get('budget', 'params')} budget, " \
                f"{'exact stop' if a.get('exact_stop') else 'cut at target'}"
    if int(a.get("width_multiple", 1)) > 1 and meta.get("allocator") == "ukmp.prune.allocate":
        label += f", MLP widths x{a['width_multiple']}"
    if a.get("rank_by", "importance") != "importance":
        label += f", ranked {a['rank_by'].replace('_', ' ')}"
    k = summary.get("prune_config", {}).get("iterations", 1)
    if k > 1:
        label += f", {k} rounds"
    ranges = [f"{tower} {s['first']}..{s['last']}" if s["count"] else f"{tower} none"
              for tower, s in summary.get("layer_spans", {}).items() if s["count"] != s["of"]]
    return ", ".join([label, *ranges])


def comparison_table(rows: dict[str, dict[str, Any]], dense: dict[str, Any] | None, tasks: list[str]) -> str:
    head = "| method | allocation | achieved ratio | " + " | ".join(f"{t} {primary(t)}" for t in tasks) + " |"
    lines = [head, "|---|---|---:|" + "---:|" * len(tasks)]
    if dense:
        lines.append("| dense | – | 0.0000 | " + " | ".join(f"{dense[t][primary(t)]:.2f}" for t in tasks) + " |")
    for m, r in rows.items():
        cells = []
        for t in tasks:
            p = r["pruned"].get(t, {}).get(primary(t))
            rec = (r.get("recovered") or {}).get(t, {}).get(primary(t))
            cell = "–" if p is None else f"{p:.2f}"
            if rec is not None:
                cell += f" → {rec:.2f}"
            cells.append(cell)
        lines.append(f"| {m} | {r.get('allocation', '?')} | {r['achieved_ratio']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(rows: dict[str, dict[str, Any]], dense: dict[str, Any] | None, tasks: list[str], path: Path,
                    title: str) -> list[str]:
    """One panel per task with its headline metric (``PRIMARY_METRIC``), bars labelled, in a grid of up to three
    columns (one long row made the labels unreadable once scaled to a page); returns the panel titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(rows)
    states = ["pruned"] + (["recovered"] if any(r.get("recovered") for r in rows.values()) else [])
    cols = min(3, len(tasks))
    n_rows = -(-len(tasks) // cols)
    fig, grid = plt.subplots(n_rows, cols, figsize=(max(4.5, 0.5 * len(methods) + 1.5) * cols, 4.4 * n_rows),
                             squeeze=False)
    axes = list(grid.flat)[:len(tasks)]
    for ax in list(grid.flat)[len(tasks):]:
        ax.axis("off")
    for ax, task in zip(axes, tasks):
        x = np.arange(len(methods))
        width = 0.8 / len(states)
        for k, state in enumerate(states):
            vals = [(rows[m].get(state) or {}).get(task, {}).get(primary(task), np.nan) for m in methods]
            bars = ax.bar(x + (k - (len(states) - 1) / 2) * width, vals, width, label=state)
            # a zero is a value, not a missing bar; side-by-side bars get upright labels that do not run together
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2, rotation=90 if len(states) > 1 else 0)
        if dense and task in dense:
            ax.axhline(dense[task][primary(task)], color="k", ls="--", lw=1, label="dense")
        ax.set_xticks(x, methods, rotation=45, ha="right", fontsize=9)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.18)  # room for the labels above the tallest bar
        shown = [v for c in ax.containers for v in c.datavalues if np.isfinite(v)]
        if shown and not any(shown):  # e.g. VQA accuracy of a random model: say so instead of an empty panel
            ax.text(0.5, 0.5, f"every {primary(task)} is 0", transform=ax.transAxes, ha="center", fontsize=8)
        ax.set_title(f"{task} ({primary(task)})", fontsize=11)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return [ax.get_title() for ax in axes]


def shared_scores(m: str, methods: tuple[str, ...], root: Path, iterations: int = 1) -> list[str]:
    """The overrides that let ``m`` re-allocate a sibling's finished scores (``SCORE_SHARING``); none when the
    sibling has not run, or with ``prune.iterations`` > 1 (each round re-scores: there is nothing to share)."""
    if m not in SCORE_SHARING or SCORE_SHARING[m][0] not in methods or iterations > 1:
        return []
    src, alloc = SCORE_SHARING[m]
    scores = root / src / "prune" / "scores.safetensors"
    return [f"prune.scores_from={scores}", *alloc] if scores.is_file() else []


def compare(configs: list[str], overrides: list[str], ratio: float, methods: tuple[str, ...] = DEFAULT_METHODS,
            recover: bool = False, methods_dir: Path | None = None,
            tasks: list[str] | None = None, dense_dir: Path | None = None) -> dict[str, Any]:
    """Every method at ``ratio``, evaluated on ``tasks`` (default: eval.after_prune, or eval.after_finetune with
    ``recover``); ``comparison.png`` has one panel per task with its headline metric. ``dense_dir``: where the
    dense evaluation stage lives (default: one directory per model, eval settings and tasks, shared by every
    ratio, so the dense model is evaluated once)."""
    import json

    from ukmp.eval.stage import run_eval_stage
    from ukmp.pipeline import run, with_prompt_styles
    from ukmp.stages import run_stage

    base = load_config(configs, overrides)
    root = Path(base.output_dir) / f"{base.name}_compare_{ratio}"
    tasks = list(tasks or (base.eval.after_finetune if recover else base.eval.after_prune))
    over = [*overrides, f"finetune.enabled={str(recover).lower()}", f"eval.after_prune=[{','.join(tasks)}]",
            f"eval.after_finetune=[{','.join(tasks)}]"]
    dense_cfg = load_config(configs, [*over, f"output_dir={root}", "name=dense"])
    for m in methods:  # every method's config (with its delta file) is checked before the dense evaluation
        method_config(configs, over, m, ratio, root, methods_dir)
    key = with_prompt_styles([asdict(dense_cfg.model), asdict(dense_cfg.eval), tasks],  # what the dense metrics
                             [dense_cfg.eval.datasets.get(t) for t in tasks])  # depend on
    where = (Path(dense_dir) / "eval_dense" if dense_dir else
             Path(base.output_dir) / f"{base.name}_compare_dense" / f"eval_dense_{section_hash(*key)[:12]}")
    dense_rec = run_stage("eval_dense", where, key, [], lambda out: run_eval_stage(dense_cfg, None, tasks, out))
    dense = json.loads((dense_rec.path / "metrics.json").read_text())
    rows: dict[str, dict[str, Any]] = {}
    for m in methods:
        extra = shared_scores(m, methods, root, base.prune.iterations)
        cfg = method_config(configs, [*over, *extra], m, ratio, root, methods_dir)
        log.info("compare: %s at ratio %s", m, ratio)
        out = run(cfg)
        prune_info = json.loads((root / m / "prune" / "stage.json").read_text())
        summary = json.loads((root / m / "prune" / "summary.json").read_text())
        rows[m] = {"achieved_ratio": out["achieved_ratio"], "allocation": allocation_label(summary),
                   "ratio_check": summary.get("ratio_check"), "pruned": out["metrics"].get("pruned", {}),
                   "recovered": out["metrics"].get("recovered"), "prune_seconds": round(prune_info["seconds"], 2),
                   "scores_from": cfg.prune.scores_from or None}
    result = {"ratio": ratio, "tasks": tasks, "dense": dense, "methods": rows, "recover": recover}
    atomic_write_json(root / "comparison.json", result)
    title = f"{base.name}: methods at ratio {ratio}" + (" (after recovery)" if recover else "")
    atomic_write_text(root / "comparison.md", f"# {title}\n\n" + comparison_table(rows, dense, tasks))
    plot_comparison(rows, dense, tasks, root / "comparison.png", title)
    log.info("compare: wrote %s", root / "comparison.md")
    return result
