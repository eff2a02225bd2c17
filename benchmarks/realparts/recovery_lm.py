"""The language track's recovered table (issue 28): which rows are recovered, in what order, and how they are shown.

``language.py --recover-ratios 0.2,0.5 --recover-top 3`` calls :func:`run_track` after its pruning table: the
dense model on the second text, UKMP's setting selection (``language_recover.select``, giving the ``ukmp_sel`` row
at every ratio), then at each recovered ratio UKMP, ``ukmp_sel`` and the ``--recover-top`` best other methods after
pruning, each with the LPD recipe, and the LLM-Pruner rows among them also with LLM-Pruner's own recipe (plain LoRA
on the language-modelling loss). One budget for all (``language_recover.budget_overrides``). The recovered stages
live under ``<output root>/recovered/ratio_<r>/<method>[_lora]/`` (finetune/, eval_finetuned*/), apart from the
pruning runs they start from.

Named variants (``--recover-variants``, :func:`parse_variants`): after those rows, each variant is pruned at the
ratio (``ratio_<r>/variants/<slug>/``) and recovered with LPD like the others
(``recovered/ratio_<r>/variants/<slug>/``), e.g.
``"ukmp k=4:prune.iterations=4; ukmp exact:prune.exact_stop=true"``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import language_recover as lr
from deadline import next_utc

log = logging.getLogger("realparts.language")
LORA_METHODS = ("llm_pruner_global", "llm_pruner_local")
SEL = "ukmp_sel"


# options that act on the allocation alone: a ratio-free method's variant that changes only these re-allocates the
# cached scores of its main-table run instead of scoring again (prune.iterations, T, entropy, ... change the scores)
ALLOCATION_ONLY = frozenset({"prune.exact_stop", "prune.rank_by", "prune.scope", "prune.budget",
                             "prune.normalization", "prune.max_group_prune_ratio", "prune.local_rounding",
                             "prune.max_overshoot"})


@dataclass(frozen=True)
class Variant:
    """A named row of the recovered table: ``method`` with ``overrides`` ({ratio} in one: the row's ratio)."""

    label: str
    method: str
    overrides: tuple[str, ...]

    @property
    def slug(self) -> str:
        """The run's directory: the label's letters and digits joined by _ (``ukmp k=4`` -> ``ukmp_k_4``)."""
        return re.sub(r"[^a-z0-9]+", "_", self.label.lower()).strip("_")

    def at(self, ratio: float) -> list[str]:
        return [o.replace("{ratio}", str(ratio)) for o in self.overrides]


def parse_variants(spec: str, methods: Iterable[str]) -> list[Variant]:
    """``--recover-variants``: ``LABEL:KEY=VALUE [KEY=VALUE ...]`` items separated by ``;``. The label's first word
    is the method (one of ``methods``), the rest names the variant; a label may not be a main row's name, and two
    labels may not share a directory (slug). A one-line error names the item."""
    known, out, slugs = set(methods), [], {}
    for item in (i.strip() for i in spec.split(";")):
        if not item:
            continue
        label, sep, rest = item.partition(":")
        label, ovs = " ".join(label.split()), tuple(rest.split())
        if not sep or not label or not ovs or any("=" not in o or o.startswith("=") for o in ovs):
            raise SystemExit(f"language.py: --recover-variants: {item!r}: expected "
                             "'LABEL:key=value [key=value ...]'")
        m = label.split()[0]
        if m not in known:
            raise SystemExit(f"language.py: --recover-variants: {item!r}: the label's first word must be a method "
                             f"({', '.join(sorted(known))})")
        if label in known or label == SEL or label.endswith("(LoRA recipe)"):
            raise SystemExit(f"language.py: --recover-variants: {label!r} is the name of a main row; add a word")
        v = Variant(label, m, ovs)
        if v.slug in slugs:
            raise SystemExit(f"language.py: --recover-variants: {label!r} and {slugs[v.slug]!r} share the directory "
                             f"{v.slug!r}")
        slugs[v.slug] = label
        out.append(v)
    return out


def variant_extra(v: Variant, ratio_free: bool, scores: Path) -> list[str]:
    """``prune.scores_from=scores`` where ``v`` only re-allocates (a ratio-free method, allocation options only,
    no scores or plan of its own, and ``scores`` exists); else nothing: the variant scores afresh."""
    keys = {o.split("=", 1)[0] for o in v.overrides}
    reuse = ratio_free and keys <= ALLOCATION_ONLY and scores.is_file()
    return [f"prune.scores_from={scores}"] if reuse else []


def lora_label(m: str) -> str:
    return f"{m} (LoRA recipe)"


def recover_order(rows: dict[str, dict[str, Any]], top: int) -> list[tuple[str, str]]:
    """``(method, recipe)`` in the order they run: UKMP, ``ukmp_sel``, then the ``top`` best other methods after
    pruning (finite perplexity, lowest first), an LLM-Pruner row followed by its own recipe (plain LoRA)."""
    def ok(m: str) -> bool:
        v = (rows.get(m) or {}).get("pruned")
        return v is not None and math.isfinite(v)

    others = sorted((m for m in rows if m not in ("ukmp", SEL) and ok(m)), key=lambda m: rows[m]["pruned"])[:top]
    chosen = [m for m in ("ukmp", SEL) if ok(m)] + others
    return [(m, r) for m in chosen for r in (("lpd", "lora") if m in LORA_METHODS else ("lpd",))]


def run_track(L, args, configs: list[str], over: list[str], root: Path, ratios: list[float],
              methods: tuple[str, ...], result: dict[str, Any], texts: dict[str, str], validation: str | None,
              write: Callable[[], None]) -> None:
    """Fill ``result["recovery"]`` (and the ``ukmp_sel`` rows of ``result["by_ratio"]``), calling ``write()`` after
    every finished row. ``L`` is the ``language`` module; ``texts``: name -> dataset YAML, the main text first."""
    by_ratio, errors = result["by_ratio"], result["errors"]
    rec: dict[str, Any] = result.setdefault("recovery", {})
    names = list(texts)
    rec.update(texts=names, budget=budget_text(args), rows={}, selection=None)
    dense_cfg = L.load_config(configs, [*over, f"output_dir={root}", "name=dense"])
    rec["dense"] = {names[0]: result["dense"]}
    for name in names[1:]:
        rec["dense"][name] = lr.eval_text(dense_cfg, None, [], root / "dense" / f"eval_dense_{name}", texts[name])
    base = L.load_config(configs, over).prune
    if validation is not None and not args.no_select:
        sr = args.select_ratio

        def run(ov: list[str], name: str):
            rdir = L.ratio_dir(root, sr) / ("ablations" if name else "")
            extra = L.score_reuse("ukmp", methods, sr, ratios[0], root) if not name and sr in ratios else []
            row = L.run_method(configs, [*over, *ov], "ukmp", sr, rdir, extra, name=name or "ukmp")
            return L.config_of(configs, [*over, *ov], "ukmp", sr, rdir, extra, name or "ukmp"), Path(row["run_dir"]), row

        sel = lr.select(run, base.threshold, base.entropy, L.ABLATIONS, validation)
        rec["selection"] = {**sel, "ratio": sr, "text": "the last 4,096 tokens of the calibration text"}
        write()
        chosen = sel["chosen"]
        if chosen["overrides"]:  # the selection differs from UKMP's defaults: a row of its own at every ratio
            result["methods"] = [*result["methods"], SEL] if SEL not in result["methods"] else result["methods"]
            scores = Path(chosen["run_dir"]) / "prune" / "scores.safetensors"
            for r in ratios:
                src = Path(chosen["run_dir"])
                if r == sr:  # the grid's own run
                    by_ratio[str(r)][SEL] = L.run_method(configs, [*over, *chosen["overrides"]], "ukmp", r,
                                                         src.parent, [], name=src.name)
                else:
                    by_ratio[str(r)][SEL] = L.run_method(configs, [*over, *chosen["overrides"]], "ukmp", r,
                                                         L.ratio_dir(root, r), [f"prune.scores_from={scores}"], name=SEL)
                write()
    user_ft = [o for o in args.overrides if o.startswith("finetune.")]  # the user's finetune overrides win
    variants = getattr(args, "variants", [])
    if variants:
        rec["variants"] = {v.label: {"method": v.method, "overrides": list(v.overrides)} for v in variants}

    only = {x.strip() for x in getattr(args, "recover_only", "").split(",") if x.strip()}
    deadline = getattr(args, "recover_deadline", None)  # fixed when the command started (language.main)
    if deadline is None and args.recover_until:
        deadline = until(args.recover_until)

    def late(out_root: Path, label: str) -> bool:  # past --recover-until (or not in --recover-only) and not begun
        begun = (out_root / "finetune" / "stage.json").is_file()
        if only and label not in only and f"{label}@{r}" not in only and not begun:
            rec.setdefault("not_requested", []).append(f"{label}@{r}")
            return True
        if deadline is not None and time.time() >= deadline and not begun:
            rec.setdefault("not_started", []).append(f"{label}@{r}")
            return True
        return False

    def recover_row(label: str, m: str, recipe: str, r: float, run_dir: Path, prow: dict[str, Any], ov: list[str],
                    out_root: Path) -> dict[str, Any]:
        budget = lr.budget_overrides(recipe, args.recover_windows, args.recover_batch, args.recover_lr)
        log.info("language track: recovering %s at ratio %s (%s)", label, r, recipe)
        cfg = L.config_of(configs, [*over, *ov, *budget, *user_ft], m, r, run_dir.parent, [], run_dir.name)
        row = lr.recover(cfg, run_dir, out_root, texts, args.keep_recovered_weights)
        row[f"pruned_{names[0]}"] = prow["pruned"]
        for name in names[1:]:
            row[f"pruned_{name}"] = lr.pruned_on(cfg, run_dir, name, texts[name])
        row.update(method=m, score_seconds=prow.get("score_seconds"), achieved_ratio=prow["achieved_ratio"])
        return row

    for r in args.recover_ratios:
        rows = by_ratio.get(str(r), {})
        out = rec["rows"].setdefault(str(r), {})
        for m, recipe in recover_order(rows, args.recover_top):
            label = m if recipe == "lpd" else lora_label(m)
            out_root = root / "recovered" / f"ratio_{r}" / (m if recipe == "lpd" else f"{m}_lora")
            if late(out_root, label):
                continue
            try:
                out[label] = recover_row(label, m, recipe, r, Path(rows[m]["run_dir"]), rows[m], [], out_root)
            except Exception as e:  # one recovery's failure is a result, not the end of the run
                log.exception("language track: recovering %s at ratio %s failed", label, r)
                errors[f"{label}@{r} (recovery)"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            write()
        for v in variants:  # pruned here (cached scores where that reproduces the variant), then recovered by LPD
            out_root = root / "recovered" / f"ratio_{r}" / "variants" / v.slug
            if late(out_root, v.label):
                continue
            try:
                extra = variant_extra(v, L.method_traits(v.method).ratio_free,
                                      L.ratio_dir(root, ratios[0]) / v.method / "prune" / "scores.safetensors")
                log.info("language track: variant %s at ratio %s", v.label, r)
                prow = L.run_method(configs, [*over, *v.at(r)], v.method, r, L.ratio_dir(root, r) / "variants",
                                    extra, name=v.slug)
                row = recover_row(v.label, v.method, "lpd", r, Path(prow["run_dir"]), prow, v.at(r), out_root)
                row.update(variant=v.label, scores_from=prow.get("scores_from"),
                           plan_source_seconds=plan_seconds(v.at(r)),
                           prune_seconds=lr._stage_seconds(Path(prow["run_dir"]) / "prune"))
                out[v.label] = row
            except Exception as e:
                log.exception("language track: variant %s at ratio %s failed", v.label, r)
                errors[f"{v.label}@{r} (variant)"] = \
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            write()


def until(hhmm: str, now: float | None = None) -> float:
    """``--recover-until HH:MM`` (UTC) as a time stamp (``deadline.next_utc``)."""
    return next_utc(hhmm, "language.py: --recover-until", now)


def plan_seconds(overrides: list[str]) -> float | None:
    """With ``prune.plan_from=DIR/plan.json``: the seconds of the prune stage that wrote it (``DIR/stage.json``),
    the cost of the pruning the row re-applies; else None."""
    plan = next((o.split("=", 1)[1] for o in overrides if o.startswith("prune.plan_from=")), None)
    return lr._stage_seconds(Path(plan).parent) or None if plan else None


def budget_text(args) -> str:
    lpd = lr.budget_overrides("lpd", args.recover_windows, args.recover_batch, args.recover_lr)
    steps = -(-args.recover_windows // args.recover_batch)
    return (f"{args.recover_windows} windows of 128 calibration tokens ({args.recover_windows * 128:,} tokens), "
            f"batch {args.recover_batch} (~{steps} steps), lr {args.recover_lr} constant after 5 warm-up steps, "
            f"r 8 / alpha 16 / dropout 0.05 for every recipe; LPD: {' '.join(o.split('.', 1)[1] for o in lpd[1:3])}")


# ---------------------------------------------------------------------------------------------------- reporting
def _f(v: float | None, nd: int = 2) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:,.{nd}f}"


def best_lines(rec: dict[str, Any]) -> list[str]:
    """Per recovered ratio: the best row on the main text, its margin over the best row of another method, cost."""
    main = rec["texts"][0]
    lines = []
    for r, rows in rec["rows"].items():
        ranked = sorted(rows.items(), key=lambda kv: kv[1][f"recovered_{main}"])
        if not ranked:
            continue
        (lab, row), rest = ranked[0], ranked[1:]
        family = "ukmp" if row["method"] in ("ukmp", SEL) else row["method"]
        rival = next(((lb, x) for lb, x in rest if ("ukmp" if x["method"] in ("ukmp", SEL) else x["method"]) != family),
                     None)
        margin = "" if rival is None else (f", {rival[1][f'recovered_{main}'] - row[f'recovered_{main}']:.2f} below "
                                           f"the best other method ({rival[0]}, {_f(rival[1][f'recovered_{main}'])})")
        others = ", ".join(f"{n} {_f(row.get(f'recovered_{n}'))}" for n in rec["texts"][1:])
        lines.append(f"- ratio {r}: **{lab}** {_f(row[f'recovered_{main}'])}{margin}; {others}; "
                     f"{row['recover_seconds'] / 60:.1f} min of recovery")
    return lines


def markdown(result: dict[str, Any]) -> str:
    rec = result.get("recovery")
    if not rec:
        return ""
    t = rec["texts"]
    lines = ["", "## After recovery (issue 28)", "",
             f"Budget (every row): {rec['budget']}. Dense: " + ", ".join(f"{n} {_f(rec['dense'].get(n))}" for n in t)
             + ".", "", *best_lines(rec), "",
             "| ratio | row | " + " | ".join(f"{n} pruned → recovered" for n in t)
             + " | steps | recovery min | scoring min |", "|---|---|" + "---:|" * (len(t) + 3)]
    for r, rows in rec["rows"].items():
        for lab, row in sorted(rows.items(), key=lambda kv: kv[1][f"recovered_{t[0]}"]):
            cells = [f"{_f(row.get(f'pruned_{n}'))} → **{_f(row.get(f'recovered_{n}'))}**" for n in t]
            score = (row.get("plan_source_seconds") or row.get("score_seconds") or 0) / 60
            star = "*" if row.get("plan_source_seconds") else ""
            lines.append(f"| {r} | {lab} | " + " | ".join(cells) + f" | {row.get('steps')} | "
                         f"{row['recover_seconds'] / 60:.1f} | {score:.1f}{star} |")
    if rec.get("variants"):
        lines += ["", "Variant rows (`--recover-variants`, recovered with LPD): " + "; ".join(
            f"{lab} = `{v['method']}` with `{' '.join(v['overrides'])}`" for lab, v in rec["variants"].items())
            + ". A ratio-free method's variant that changes only the allocation re-allocates the main run's cached "
              "scores; * = the pruning re-applies a given plan, scoring min = the prune stage that wrote it."]
    sel = rec.get("selection")
    if rec.get("not_requested"):
        lines += ["", f"Not requested in this invocation (--recover-only): {', '.join(rec['not_requested'])}"]
    if rec.get("not_started"):
        lines += ["", f"Not started (past --recover-until): {', '.join(rec['not_started'])}"]
    if sel:
        c = sel["chosen"]
        lines += ["", f"## UKMP setting selection (ratio {sel['ratio']}, validation = {sel['text']}; no recovery)", "",
                  (f"Chosen: T = {c['threshold']}, entropy {c['entropy']} (row `{SEL}` where it differs from UKMP's "
                   "defaults)."), "", "| T | entropy | validation ppl | held-out ppl (not used for the choice) |",
                  "|---:|---|---:|---:|"]
        for g in sel["grid"]:
            lines.append(f"| {g['threshold']} | {g['entropy']} | {_f(g['validation'])} | {_f(g['heldout'])} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Recovered perplexity (main text, log axis) per row label against the ratio; pruned values dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = result["recovery"]
    main = rec["texts"][0]
    labels = sorted({lab for rows in rec["rows"].values() for lab in rows})
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, lab in enumerate(labels):
        pts = sorted((float(r), rows[lab]) for r, rows in rec["rows"].items() if lab in rows)
        xs = [p[0] for p in pts]
        ax.plot(xs, [p[1][f"recovered_{main}"] for p in pts], "-o", color=f"C{i % 10}", label=lab,
                lw=2.2 if lab.startswith("ukmp") else 1.2)
        ax.plot(xs, [p[1][f"pruned_{main}"] for p in pts], ":", color=f"C{i % 10}", lw=0.8)
    ax.axhline(rec["dense"][main], color="k", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("pruning ratio (fraction of all parameters)")
    ax.set_ylabel(f"held-out perplexity ({main}, log)")
    ax.set_title("SmolLM2-135M: after recovery (solid) and after pruning (dotted)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")  # two runs at once: one tmp each
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
