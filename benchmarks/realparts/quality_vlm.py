"""Quality on the real-weights testbed (``python benchmarks/quality.py --testbed realparts``; ``--testbed
realparts-llava``: the same tables on the LLaVA of ``build_llava.py``, config ``realparts_llava.yaml``, results
``benchmarks/results/realparts_llava_vlm*``).

The BLIP-2 of ``build.py`` (DINOv2 ViT-S/14 + SmolLM2-135M-Instruct, Q-Former trained on easy-VQA): dense, then
every method at each ratio of ALL the model's parameters, each reporting easy-VQA accuracy on the fixed 500 test
questions, the language model's perplexity on held-out ``pydoc_data`` text, the kept width per group kind and the
seconds spent scoring. Recovery (one budget for all: the config's finetune section) for UKMP and the ``--recover-top``
best baselines of each ratio. The appendix's ablations at ``--ablation-ratio``. A generation gallery. A variant with
rows of its own: ``--text-methods`` (UKMP and LLM-Pruner by default) calibrated on the captions plus windows of the
disjoint calibration part of the pydoc_data text (``data.calibration_text``), which reach the language model alone.

Everything lands under ``outputs/<config name>_quality/`` (each run a cached, resumable pipeline stage) and is copied
to ``benchmarks/results/realparts_vlm*.{json,md,png}``. ``--until HH:MM`` (UTC) starts no method, variant,
recovery or ablation after that time: what finished is reported, the rest listed as not started, and a later
invocation resumes from the cached stages. Two invocations of the same command share its recoveries: one finding a
recovery under way in the other (its stage locked) moves on to the next.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ablations import UKMP_LABEL, WITHOUT_THRESHOLD, ablation_table  # noqa: E402
from ukmp.compare import DEFAULT_METHODS, SCORE_SHARING, compare  # noqa: E402
from ukmp.config import load_config  # noqa: E402
from ukmp.io import atomic_write_json, atomic_write_text  # noqa: E402
from ukmp.method_traits import method_traits  # noqa: E402
from ukmp.pipeline import run  # noqa: E402
from ukmp.stages import StageBusyError  # noqa: E402

log = logging.getLogger("quality.realparts")
VQA, PPL = "okvqa", "perplexity"
# the testbeds this module serves: config, results prefix, the model in words, the script that builds it
VARIANTS = {
    "realparts": {"config": HERE / "realparts.yaml", "results": "realparts_vlm", "build": "build.py",
                  "title": "BLIP-2 = DINOv2 ViT-S/14 + Q-Former + SmolLM2-135M-Instruct"},
    "realparts-llava": {"config": HERE / "realparts_llava.yaml", "results": "realparts_llava_vlm",
                        "build": "build_llava.py",
                        "title": "LLaVA = DINOv2 ViT-S/14 (SigLIP shell) + MLP projector + SmolLM2-135M-Instruct"},
}


_DEADLINES: dict[str, float] = {}


def late(until: str) -> bool:
    """Whether the clock is past ``until`` (HH:MM UTC, its next occurrence after this process first asked; ''
    never): a run started at 23:00 with --until 00:50 goes on past midnight."""
    if not until:
        return False
    if until not in _DEADLINES:
        from deadline import next_utc  # noqa: PLC0415  (benchmarks/realparts on the path)

        _DEADLINES[until] = next_utc(until, "quality.py: --until")
    return time.time() >= _DEADLINES[until]


def finished(run_dir: Path, stage: str) -> bool:
    """Whether ``run_dir``'s ``stage`` completed (its ``stage.json``): read from the cache even past ``--until``."""
    return (run_dir / stage / "stage.json").is_file()
# What a 2-core CPU affords on this 161M model (any key=value given wins over these): one calibration budget for
# every method (64 captions; ECoFLaP's delta asks 128); UPop's search trains every weight for upop.steps steps
# (configs/methods/upop.yaml's 200 would cost hours per ratio here): 20 steps, 4 gate updates; ECoFLaP's zeroth-order
# block scores need 2 forwards per tensor per batch (~280 tensors): its first-order variant instead.
TESTBED_OVERRIDES = ["prune.num_samples=64", "prune.options.upop.steps=20", "prune.options.upop.update_every=5",
                     "prune.options.ecoflap.score=first"]
# Tables B and C without UKMP's own rows (the reference run stands there) and the two slowest Taylor rows
ABLATIONS = ablation_table(thresholds=(1.0, 0.8, 0.6, 0.2), reference=False, skip=WITHOUT_THRESHOLD)


def metric(metrics: dict[str, Any] | None, task: str) -> float | None:
    if not metrics or task not in metrics:
        return None
    return metrics[task]["accuracy" if task == VQA else "perplexity"]


def prune_facts(run_dir: Path) -> dict[str, Any]:
    """Kept width per group kind, scoring seconds and calibration tokens from a run's prune summary."""
    s = json.loads((run_dir / "prune" / "summary.json").read_text())
    kinds = s["parameters"]["by_group_kind"]
    cal = s.get("calibration", {})
    return {"kept_width": {k: round(v["units_after"] / v["units_before"], 4) for k, v in kinds.items()},
            "score_seconds": s["seconds"].get("score"), "tokens_selected": cal.get("tokens_selected"),
            "tokens_total": cal.get("tokens_total")}


def stage_minutes(root: Path) -> float:
    """Minutes of every finished stage under ``root``, summed: what the tables cost however many (resumed,
    parallel) invocations it took."""
    return round(sum(json.loads(p.read_text()).get("seconds", 0.0) for p in root.rglob("stage.json")) / 60, 1)


def parse_variants(spec: str) -> list[tuple[str, list[str]]]:
    """``--variants "LABEL:key=value key=value; LABEL:..."`` as [(label, overrides)], with a one-line error naming
    the flag for an item without a label or an override that is not key=value."""
    out: list[tuple[str, list[str]]] = []
    for item in (i.strip() for i in spec.split(";")):
        if not item:
            continue
        label, sep, rest = item.partition(":")
        over = rest.split()
        if not sep or not label.strip() or not over or any("=" not in o or o.startswith("=") for o in over):
            raise SystemExit(f"quality.py: --variants: {item!r} is not 'LABEL:key=value [key=value ...]'")
        if variant_dir(label) in {variant_dir(lbl) for lbl, _ in out}:
            raise SystemExit(f"quality.py: --variants: the label {label.strip()!r} repeats one before it (its "
                             f"directory {variant_dir(label)!r})")
        out.append((label.strip(), over))
    return out


def variant_dir(label: str) -> str:
    """The directory (under ``<root>/variants``) of a ``--variants`` row."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_") or "variant"


def rescores(overrides: list[str]) -> bool:
    """Whether the overrides make UKMP re-score as it prunes (``prune.iterations`` > 1): its scores then depend on
    the ratio, so no ratio re-allocates another's."""
    its = [o.split("=", 1)[1] for o in overrides if o.startswith("prune.iterations=")]
    return bool(its) and int(its[-1]) > 1


def best_baselines(rows: dict[str, dict[str, Any]], k: int, by: str = "vqa") -> list[str]:
    """The ``k`` baselines with the highest accuracy after pruning: ``by`` "vqa" all 500 questions, "open" the open
    ones (the image-knowledge column; ties: all questions); ties then go to the lower perplexity."""
    def key(t: tuple[str, dict[str, Any]]) -> tuple[float, ...]:
        r = t[1]
        ppl = r["ppl"] if r["ppl"] is not None else float("inf")
        return (-(open_accuracy(r) or 0.0), -r["vqa"], ppl) if by == "open" else (-r["vqa"], ppl)

    if by not in ("vqa", "open"):
        raise ValueError(f"--recover-by: {by!r} is not one of vqa, open")
    cands = sorted(((m, r) for m, r in rows.items() if m != "ukmp" and r["vqa"] is not None), key=key)
    return [m for m, _ in cands[:k]]


def run_ablations(configs: list[str], overrides: list[str], root: Path, ratio: float) -> dict[str, Any]:
    common = [*overrides, f"output_dir={root}", f"prune.ratio={ratio}", "prune.method=ukmp", "eval.dense=false",
              f"eval.after_prune=[{VQA},{PPL}]", "finetune.enabled=false"]
    ref = run(load_config(configs, [*common, "name=ukmp_reference"]))
    base_scores = root / "ukmp_reference" / "prune" / "scores.safetensors"
    ref_row = {"pruned_vqa": metric(ref["metrics"].get("pruned"), VQA),
               "pruned_ppl": metric(ref["metrics"].get("pruned"), PPL), "achieved_ratio": ref["achieved_ratio"],
               **prune_facts(root / "ukmp_reference")}
    out: dict[str, Any] = {}
    for table, rows in ABLATIONS.items():
        out[table] = [{"variant": UKMP_LABEL[table], "overrides": [], **ref_row}]
        for k, (label, ov, rescore) in enumerate(rows):
            extra = [] if rescore else [f"prune.scores_from={base_scores}"]
            name = f"abl_{table.split(':')[0].lower()}_{table.split(': ')[1].replace(' ', '_').replace('-', '')}_{k}"
            t0 = time.monotonic()
            r = run(load_config(configs, [*common, *ov, *extra, f"name={name}"]))
            out[table].append({"variant": label, "overrides": ov, "pruned_vqa": metric(r["metrics"].get("pruned"), VQA),
                               "pruned_ppl": metric(r["metrics"].get("pruned"), PPL),
                               "achieved_ratio": r["achieved_ratio"], **prune_facts(root / name),
                               "seconds": round(time.monotonic() - t0, 1)})
    return out


KINDS = ("open", "colour", "shape", "yes/no: present", "yes/no: absent")


def vqa_by_kind(predictions: Path, truth: dict[Any, tuple[str, list[str]]], scorer: str) -> dict[str, Any] | None:
    """The evaluator's VQA accuracy per question kind (``build.question_kind``) from an evaluation stage's saved
    predictions, and its commonest answer with that answer's share of the questions; None where it was not run."""
    from build import accuracy_table, question_kind  # noqa: PLC0415

    from ukmp.eval.metrics import vqa_accuracy

    if not predictions.is_file():
        return None
    preds = json.loads(predictions.read_text())
    hits: dict[str, list[float]] = {}
    for p in preds:
        question, gts = truth[p["question_id"]]
        hits.setdefault(question_kind(question, gts[0]), []).append(vqa_accuracy(p["answer"], gts, scorer))
    answers = Counter(" ".join(p["answer"].split()) for p in preds)
    top = max(answers, key=lambda a: (answers[a], a))
    return {**accuracy_table(hits), "commonest_answer": top, "commonest_share": round(100 * answers[top] / len(preds), 1)}


def vqa_truth(dataset_yaml: str) -> dict[Any, tuple[str, list[str]]]:
    """{question_id: (question, answers)} of the benchmark's VQA questions."""
    from ukmp.data.loaders import load_dataset

    return {r.question_id: (r.question, list(r.answers)) for r in load_dataset(dataset_yaml).records}


def add_breakdowns(result: dict[str, Any], root: Path, truth: dict[Any, tuple[str, list[str]]], scorer: str) -> None:
    """Per-kind VQA accuracy of every evaluated row (dense, pruned, recovered, the text variant), read from the
    saved predictions under ``root``, and what a constant answer scores: the yes/no answers split about evenly, so
    a model answering "no" to every question scores about half of the yes/no ones without looking."""
    from ukmp.eval.metrics import vqa_accuracy

    result["constant_answers"] = {a: round(100 * sum(vqa_accuracy(a, g, scorer) for _, g in truth.values())
                                           / len(truth), 2) for a in ("yes", "no")}
    result["dense"]["vqa_by_kind"] = vqa_by_kind(root / "dense" / "eval_dense" / VQA / "predictions.json", truth, scorer)
    text_rows = (result.get("text_calibration") or {}).get("by_ratio") or {}
    subs = [("", result["by_ratio"]), ("text_calibration", text_rows)]
    subs += [(f"variants/{variant_dir(label)}", {r: {"ukmp": row} for r, row in v["by_ratio"].items()})
             for label, v in (result.get("variants") or {}).items()]
    for sub, by_ratio in subs:
        for r, rows in by_ratio.items():
            for m, row in rows.items():
                row_breakdown(row, root / sub / f"{result['name']}_compare_{r}" / m, truth, scorer)


def row_breakdown(row: dict[str, Any], run_dir: Path, truth: dict[Any, tuple[str, list[str]]], scorer: str) -> None:
    """``row``'s per-kind VQA accuracy after pruning and, where ``run_dir`` was recovered, after recovery with the
    recovery's minutes, from the run's saved predictions."""
    row["vqa_by_kind"] = vqa_by_kind(run_dir / "eval_pruned" / VQA / "predictions.json", truth, scorer)
    rec = vqa_by_kind(run_dir / "eval_finetuned" / VQA / "predictions.json", truth, scorer)
    if rec is not None:
        row["vqa_by_kind_recovered"] = rec
        stage = run_dir / "finetune" / "stage.json"
        if stage.is_file():
            row["recovery_minutes"] = round(json.loads(stage.read_text())["seconds"] / 60, 1)


def kind_markdown(result: dict[str, Any]) -> list[str]:
    """The per-kind table: dense, then every row (pruned, recovered, text variant) that answers anything right."""
    d = result["dense"].get("vqa_by_kind")
    if not d:
        return []
    const = result.get("constant_answers", {})
    lines = ["", "## VQA by question kind (% of each kind; the commonest answer and its share of the 500)", "",
             "\"present\": the yes/no question asks about a colour or shape the image holds; \"absent\": one it does "
             "not. Absent questions are answered by their wording alone (\"is there a ...?\" no, \"is there not a "
             "...?\" yes); only the open questions and the present ones need the image. A constant answer scores "
             + ", ".join(f"\"{a}\" {v:.1f} %" for a, v in const.items()) + " of all 500.", "",
             "| ratio | row | all | " + " | ".join(KINDS) + " | commonest answer |",
             "|---|---|---:|" + "---:|" * len(KINDS) + "---|"]

    def line(ratio: str, label: str, k: dict[str, Any]) -> str:
        cells = " | ".join(fmt(k["by_type"].get(kind), 1) for kind in KINDS)
        answer = k["commonest_answer"].replace("|", "/")
        answer = answer if len(answer) <= 24 else answer[:23] + "…"
        return f"| {ratio} | {label} | {k['accuracy']:.1f} | {cells} | \"{answer}\" ({k['commonest_share']:.0f} %) |"

    lines.append(line("–", "dense", d))
    silent = 0
    tc = result.get("text_calibration") or {}
    for r in result["ratios"]:
        entries = []
        for m, row in result["by_ratio"][str(r)].items():
            entries += [(m, row.get("vqa_by_kind")), (f"{m} (recovered)", row.get("vqa_by_kind_recovered"))]
        for m, row in (tc.get("by_ratio") or {}).get(str(r), {}).items():
            entries.append((f"{m} + text", row.get("vqa_by_kind")))
        for label, row in variant_rows(result, r):
            entries += [(label, row.get("vqa_by_kind")), (f"{label} (recovered)", row.get("vqa_by_kind_recovered"))]
        for label, k in entries:
            if k is None:
                continue
            if k["accuracy"] > 0:
                lines.append(line(str(r), label, k))
            else:
                silent += 1
    if silent:
        lines += ["", f"{silent} other rows score 0 in every kind."]
    return lines


def gallery(result: dict[str, Any], root: Path, ratio: float, dataset_yaml: str, n: int) -> dict[str, Any]:
    """``n`` benchmark questions with distinct images, the question types in turn: each method's answer at
    ``ratio`` (after pruning and, where run, after recovery) next to the question, the truth and the dense answer."""
    from ukmp.data.loaders import load_dataset

    from build import question_type  # noqa: PLC0415

    ds = load_dataset(dataset_yaml)
    queues: dict[str, list[int]] = {}
    seen: set[str] = set()
    for i, r in enumerate(ds.records):  # distinct images, in file order, per question type
        if r.image not in seen:
            seen.add(r.image)
            queues.setdefault(question_type(r.answers[0]), []).append(i)
    picked: list[int] = []
    while len(picked) < n and any(queues.values()):  # the types in turn: colour, shape, yes/no, colour, ...
        for kind in sorted(queues):
            if queues[kind] and len(picked) < n:
                picked.append(queues[kind].pop(0))
    croot = root / f"{result['name']}_compare_{ratio}"

    def answers(path: Path) -> dict[Any, str]:
        return {p["question_id"]: p["answer"] for p in json.loads(path.read_text())} if path.is_file() else {}

    cols = {"dense": answers(root / "dense" / "eval_dense" / VQA / "predictions.json")}
    for m in result["methods"]:
        cols[m] = answers(croot / m / "eval_pruned" / VQA / "predictions.json")
        rec = answers(croot / m / "eval_finetuned" / VQA / "predictions.json")
        if rec:
            cols[f"{m} (recovered)"] = rec
    items = []
    for i in picked:
        r = ds.records[i]
        items.append({"image": str(ds.image_path(i)) if hasattr(ds, "image_path") else str(Path(ds.root) / r.image),
                      "question": r.question, "truth": r.answers[0],
                      "answers": {c: " ".join(a.get(r.question_id, "–").split()).replace("|", "/")
                                  for c, a in cols.items()}})
    return {"ratio": ratio, "columns": list(cols), "items": items}


def gallery_markdown(g: dict[str, Any]) -> str:
    lines = [f"# Generation gallery, ratio {g['ratio']} (easy-VQA test questions)", "",
             "| column | " + " | ".join(f"Q{k + 1}" for k in range(len(g["items"]))) + " |",
             "|---|" + "---|" * len(g["items"])]
    lines.append("| question | " + " | ".join(it["question"] for it in g["items"]) + " |")
    lines.append("| **truth** | " + " | ".join(f"**{it['truth']}**" for it in g["items"]) + " |")
    for c in g["columns"]:
        cells = []
        for it in g["items"]:
            a = it["answers"][c]
            cells.append(a if a.strip().lower() != it["truth"] else f"{a} ✓")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def gallery_png(g: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n = len(g["items"])
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 2.2 + 0.19 * len(g["columns"]) + 2.6),
                             gridspec_kw={"height_ratios": [1, 0.12 * len(g["columns"]) + 0.6]}, squeeze=False)
    for k, it in enumerate(g["items"]):
        ax = axes[0][k]
        ax.imshow(Image.open(it["image"]).convert("RGB"))
        ax.set_title(f"Q{k + 1}: {it['question']}\ntruth: {it['truth']}", fontsize=7)
        ax.axis("off")
        tx = axes[1][k]
        tx.axis("off")
        for j, c in enumerate(g["columns"]):
            a = it["answers"][c]
            ok = a.strip().lower() == it["truth"]
            tx.text(0.0, 1 - j / max(1, len(g["columns"])), f"{c}: {a}", fontsize=6.5, va="top",
                    color="darkgreen" if ok else "firebrick", transform=tx.transAxes)
    fig.suptitle(f"easy-VQA answers after pruning at ratio {g['ratio']} (green = exact match)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def open_accuracy(row: dict[str, Any], state: str = "") -> float | None:
    """Accuracy on the open (colour / shape) questions, the part of easy-VQA no wording alone answers."""
    k = row.get("vqa_by_kind" + state)
    return None if not k else k["by_type"].get("open")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("easy-VQA accuracy (%), 500 test questions", lambda row, st: row.get("vqa" + st)),
              ("held-out perplexity of the language model (log)", lambda row, st: row.get("ppl" + st))]
    if result["dense"].get("vqa_by_kind"):
        panels.insert(1, ("accuracy (%) on the open (colour / shape) questions", open_accuracy))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.6))
    ratios = [0.0] + result["ratios"]
    tc = result.get("text_calibration") or {}
    series = [(m, [result["by_ratio"][str(r)].get(m, {}) for r in result["ratios"]], f"C{i % 10}", "o")
              for i, m in enumerate(result["methods"])]  # (label, row per ratio, colour, marker)
    series += [(name, [v["by_ratio"].get(str(r), {}) for r in result["ratios"]], ("black", "dimgray", "silver")[j % 3],
                "s") for j, (name, v) in enumerate((result.get("variants") or {}).items())]
    for ax, (label, get) in zip(axes, panels):
        dense = get(result["dense"], "")
        for name, rows, colour, marker in series:
            for state, style in (("", "-"), ("_recovered", "--")):
                ys = [dense] + [get(row, state) for row in rows]
                if all(y is None for y in ys[1:]):
                    continue
                ax.plot(ratios, [float("nan") if y is None else y for y in ys], style, marker=marker, color=colour,
                        label=name if not state else None, lw=2.4 if name == "ukmp" else 1.2)
        for m in tc.get("methods", []):
            colour = f"C{result['methods'].index(m) % 10}" if m in result["methods"] else "black"
            ys = [dense] + [get(tc["by_ratio"][str(r)].get(m, {}), "") for r in result["ratios"]]
            ax.plot(ratios, [float("nan") if y is None else y for y in ys], ":", marker="x", color=colour,
                    label=f"{m} + text")
        ax.set_ylabel(label)
        ax.set_xlabel("pruning ratio (fraction of all parameters)")
    axes[-1].set_yscale("log")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"real weights ({result.get('title', VARIANTS['realparts']['title'])}): solid = pruned, "
                 "dashed = recovered, dotted = calibrated on captions + text", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def fmt(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def variant_rows(result: dict[str, Any], r: float) -> list[tuple[str, dict[str, Any]]]:
    """[(label, UKMP row)] of the ``--variants`` rows at ratio ``r``."""
    return [(label, v["by_ratio"][str(r)]) for label, v in (result.get("variants") or {}).items()
            if str(r) in v["by_ratio"]]


def recovered_markdown(result: dict[str, Any]) -> list[str]:
    """The recovered rows first (what a user keeps): open-question accuracy (the image-knowledge column), all 500
    questions and perplexity, each pruned → recovered, and the minutes the recovery took."""
    rec_rows = [(r, m, row) for r in result["ratios"]
                for m, row in [*result["by_ratio"][str(r)].items(), *variant_rows(result, r)]
                if row.get("vqa_recovered") is not None]
    if not rec_rows:
        return []
    by = {"open": "accuracy on the open questions", "vqa": "accuracy on all 500 questions"}[result.get("recover_by",
                                                                                                    "vqa")]
    lines = ["", "## After recovery (WR-LoRA + progressive distillation)", "",
             f"Recovered at each ratio: UKMP, its `--variants` rows and the best other methods after pruning by "
             f"{by}.", "",
             "| ratio | method | open % pruned → recovered | VQA % pruned → recovered | ppl pruned → recovered "
             "| recovery min |", "|---|---|---:|---:|---:|---:|"]
    for r, m, row in sorted(rec_rows, key=lambda t: (t[0], -(open_accuracy(t[2], "_recovered") or -1.0),
                                                       -t[2]["vqa_recovered"])):
        lines.append(f"| {r} | {m} | {fmt(open_accuracy(row))} → {fmt(open_accuracy(row, '_recovered'))} | "
                     f"{fmt(row['vqa'])} → {fmt(row['vqa_recovered'])} | "
                     f"{fmt(row['ppl'], 3)} → {fmt(row['ppl_recovered'], 3)} | {fmt(row.get('recovery_minutes'), 1)} |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    d = result["dense"]
    lines = [f"# Quality with real weights: {result.get('title', VARIANTS['realparts']['title'])}", "",
             f"Dense: easy-VQA **{d['vqa']:.2f} %** (500 fixed test questions), held-out perplexity "
             f"**{d['ppl']:.3f}** ({result['ppl_tokens']}). Ratio = fraction of all {result['total_params']:,} "
             f"parameters removed. Recovery budget (every recovered row): {result['recovery_budget']}. "
             f"Machine: {result['machine']}; {result['date']}; this invocation {result['total_minutes']:.1f} min, every "
             f"stage behind the tables {result.get('stage_minutes', 0.0):.0f} min summed. "
             f"Command: `{result.get('command', '')}`; overrides: `{' '.join(result.get('overrides', []))}`."]
    lines += recovered_markdown(result)
    lines += ["", "## After pruning (open-question % / VQA % on all 500 / perplexity)", "",
              "| method | " + " | ".join(f"{r}: open | {r}: VQA | {r}: ppl" for r in result["ratios"])
              + f" | scoring s ({result['ratios'][-1]}) |",
              "|---|" + "---:|---:|---:|" * len(result["ratios"]) + "---:|"]
    def pruned_line(label: str, rows: list[dict[str, Any]], seconds: str) -> str:
        cells = [c for row in rows for c in (fmt(open_accuracy(row)), fmt(row.get("vqa")), fmt(row.get("ppl"), 3))]
        return f"| {label} | " + " | ".join(cells) + f" | {seconds} |"

    for m in result["methods"]:
        rows = [result["by_ratio"][str(r)].get(m, {}) for r in result["ratios"]]
        lines.append(pruned_line(m, rows, fmt(rows[-1].get("score_seconds"), 1)))
    for label, v in (result.get("variants") or {}).items():
        lines.append(pruned_line(f"{label} (`{' '.join(v['overrides'])}`)",
                                 [v["by_ratio"].get(str(r), {}) for r in result["ratios"]], "–"))
    tc = result.get("text_calibration") or {}
    if tc.get("methods"):
        lines += ["", f"## Variant: calibration on captions plus text ({tc['samples']} windows of {tc['window']} "
                      f"tokens of the disjoint pydoc_data part, through the language model alone)", "",
                  "| method | " + " | ".join(f"{r}: VQA | {r}: ppl" for r in result["ratios"]) + " |",
                  "|---|" + "---:|---:|" * len(result["ratios"])]
        for m in tc["methods"]:
            cells = []
            for r in result["ratios"]:
                row, base_row = tc["by_ratio"][str(r)].get(m, {}), result["by_ratio"][str(r)].get(m, {})
                cells += [f"{fmt(row.get('vqa'))} ({fmt(base_row.get('vqa'))})",
                          f"{fmt(row.get('ppl'), 3)} ({fmt(base_row.get('ppl'), 3)})"]
            lines.append(f"| {m} + text | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("In brackets: the same method calibrated on the captions alone (the table above).")
    lines += kind_markdown(result)
    kinds = sorted({k for r in result["ratios"] for row in result["by_ratio"][str(r)].values()
                    for k in row.get("kept_width", {})})
    for r in result["ratios"]:
        lines += ["", f"## Kept width per group kind at ratio {r} (fraction of units)", "",
                  "| method | achieved | " + " | ".join(kinds) + " |", "|---|---:|" + "---:|" * len(kinds)]
        for m in result["methods"]:
            row = result["by_ratio"][str(r)].get(m, {})
            kw = row.get("kept_width", {})
            lines.append(f"| {m} | {fmt(row.get('achieved_ratio'), 4)} | "
                         + " | ".join(fmt(kw.get(k), 3) for k in kinds) + " |")
    if result.get("not_started"):
        lines += ["", f"Not started (past --until {result.get('until')}): {', '.join(result['not_started'])}."]
    for table, rows in result.get("ablations", {}).items():
        lines += ["", f"## Table {table} (UKMP, ratio {result['ablation_ratio']}, after pruning)", "",
                  "| variant | VQA | ppl | tokens back-propagated | achieved |", "|---|---:|---:|---:|---:|"]
        for row in rows:
            tok = "–" if row.get("tokens_selected") is None else f"{row['tokens_selected']} / {row['tokens_total']}"
            lines.append(f"| {row['variant']} | {fmt(row['pruned_vqa'])} | {fmt(row['pruned_ppl'], 3)} | {tok} | "
                         f"{row['achieved_ratio']:.4f} |")
    return "\n".join(lines) + "\n"


def prune_rows(configs: list[str], overrides: list[str], prefix: Path, ratios: list[float],
               methods: tuple[str, ...], where: dict[str, Path], until: str = "",
               skipped: list[str] | None = None,
               rescore: bool = False) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(dense metrics, {ratio: {method: row}}) after pruning, each method a cached ``compare`` run under
    ``<prefix>_compare_<ratio>/<method>``. The ratio-free methods of ``ukmp.method_traits`` (and llm_pruner_local,
    which re-allocates LLM-Pruner's scores) score once, at the first ratio, and re-allocate those scores at the
    others. ``until``: no method starts later (``skipped`` collects "method@ratio" of those; their rows are left
    out), each method then a ``compare`` call of its own over the methods before it (cached: the same stages).
    ``rescore``: every ratio scores afresh (``rescores``)."""
    by_ratio: dict[str, dict[str, Any]] = {}
    skipped = [] if skipped is None else skipped
    dense: dict[str, Any] = {}
    scored: dict[str, tuple[Path, list[str], dict[str, Any]]] = {}  # method -> (scores, overrides, first facts)
    for r in ratios:
        croot = Path(f"{prefix}_compare_{r}")
        fresh = tuple(m for m in methods if m not in scored)
        found: dict[str, dict[str, Any]] = {}
        if fresh and not until:
            res = compare(configs, overrides, r, fresh, recover=False, **where)
            found.update(res["methods"])
        for i in range(len(fresh) if until else 0):  # one more method a call: the earlier ones are cached
            if late(until) and not finished(croot / fresh[i], "eval_pruned"):
                skipped += [f"{m}@{r}" for m in fresh[i:]]
                break
            res = compare(configs, overrides, r, fresh[: i + 1], recover=False, **where)
            found.update(res["methods"])
        for m in (m for m in methods if m in scored):
            if late(until) and not finished(croot / m, "eval_pruned"):
                skipped.append(f"{m}@{r}")
                continue
            src, extra, _ = scored[m]
            res = compare(configs, [*overrides, f"prune.scores_from={src}", *extra], r, (m,), recover=False,
                          **where)
            found.update(res["methods"])
        if found:
            dense = {"vqa": metric(res["dense"], VQA), "ppl": metric(res["dense"], PPL)}
        rows = {}
        for m in (m for m in methods if m in found):
            v = found[m]
            facts = prune_facts(croot / m)
            if m in scored:  # the seconds and tokens of the run that computed the scores
                facts = {**facts, **{k: scored[m][2][k] for k in ("score_seconds", "tokens_selected", "tokens_total")},
                         "scores_from_ratio": ratios[0]}
            src = v.get("scores_from")  # what the recovery of this row must pass too, or it prunes another way
            rows[m] = {"vqa": metric(v["pruned"], VQA), "ppl": metric(v["pruned"], PPL),
                       "achieved_ratio": v["achieved_ratio"], "prune_seconds": v["prune_seconds"], **facts,
                       "prune_overrides": [f"prune.scores_from={src}", *SCORE_SHARING.get(m, ("", []))[1]]
                       if src else []}
        by_ratio[str(r)] = rows
        if not scored and not rescore:
            for m in (m for m in methods if m in rows):
                if method_traits(m).ratio_free:
                    scored[m] = (croot / m / "prune" / "scores.safetensors", [], rows[m])
                elif (m in SCORE_SHARING and method_traits(SCORE_SHARING[m][0]).ratio_free
                      and SCORE_SHARING[m][0] in methods):
                    src, alloc = SCORE_SHARING[m]
                    scored[m] = (croot / src / "prune" / "scores.safetensors", list(alloc), rows[src])
    return dense, by_ratio


def main(argv: list[str] | None = None, testbed: str = "realparts") -> int:
    variant = VARIANTS[testbed]
    p = argparse.ArgumentParser(prog=f"quality.py --testbed {testbed}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--config", default=str(variant["config"]))
    p.add_argument("--until", default="", help="HH:MM UTC: nothing starts later (finished stages are read)")
    p.add_argument("--ratios", default="0.2,0.3,0.5")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--recover-ratios", default="0.5", help="ratios with recovery runs ('' = none; default 0.5)")
    p.add_argument("--recover-top", type=int, default=2, help="baselines recovered next to UKMP (best after pruning)")
    p.add_argument("--recover-by", choices=("vqa", "open"), default="vqa",
                   help="what 'best after pruning' ranks by: accuracy on all 500 questions (default) or on the open "
                        "ones, which a model cannot answer from the question's wording alone")
    p.add_argument("--variants", default="",
                   help="UKMP with options, rows of their own at every ratio and recovered wherever UKMP is: "
                        "'LABEL:key=value [key=value ...]; LABEL:...', e.g. 'ukmp k=4:prune.iterations=4' "
                        "(each under <output>/variants/<label>)")
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--ablation-ratio", type=float, default=0.5)
    p.add_argument("--gallery", type=int, default=6, help="gallery questions (0: none)")
    p.add_argument("--gallery-ratio", type=float, default=None,
                   help="the ratio shown in the gallery (default: the smallest run; at 0.5 most answers are noise)")
    p.add_argument("--text-methods", default="ukmp,llm_pruner_global",
                   help="methods also run with the held-out text's disjoint calibration part mixed into calibration "
                        "(data.calibration_text: its language model sees real text, not captions alone); a "
                        "variant with rows of its own ('' = none)")
    p.add_argument("--text-samples", type=int, default=0,
                   help="text windows (128 tokens) besides the captions (prune.num_text_samples; 0: as many)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="where the copies go ('' = none)")
    p.add_argument("--render-only", action="store_true",
                   help="run nothing: re-read the saved quality.json, add what is derived from the finished stages "
                        "(the per-kind VQA accuracy) and rewrite the JSON, Markdown and PNG")
    args = p.parse_args(argv)
    variants = parse_variants(args.variants)
    late(args.until)  # a bad --until fails here, in one line; a good one counts from now
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    t0 = time.monotonic()
    configs = [args.config]
    args.overrides = [*TESTBED_OVERRIDES, *args.overrides]
    base = load_config(configs, args.overrides)
    model_dir = Path(base.model.source)
    if not model_dir.is_dir():
        raise SystemExit(f"error: {model_dir}: no built model; run python benchmarks/realparts/{variant['build']} "
                         f"first")
    import assets  # noqa: PLC0415  (benchmarks/realparts on the path)

    if not (model_dir.parent / "configs" / "text_heldout_eval.yaml").is_file():  # never rewritten when present
        assets.write_eval_text_yaml(model_dir.parent)
    root = Path(base.output_dir) / f"{base.name}_quality"
    if args.render_only:
        saved = root / "quality.json"
        if not saved.is_file():
            raise SystemExit(f"error: {saved}: no saved result to render; run without --render-only first")
        result = json.loads(saved.read_text())
        add_breakdowns(result, root, vqa_truth(base.eval.datasets[VQA]), base.eval.vqa_scorer)
        write_outputs(result, root, [], args.results, variant["results"])
        return 0
    overrides = [*args.overrides, f"output_dir={root}"]
    ratios = [float(r) for r in args.ratios.split(",")]
    methods = tuple(args.methods.split(","))
    where = {"methods_dir": ROOT / "configs" / "methods", "dense_dir": root / "dense"}  # dense evaluated once
    skipped: list[str] = []
    dense, by_ratio = prune_rows(configs, overrides, root / f"{base.name}", ratios, methods, where, args.until,
                                 skipped)
    text_methods = tuple(m for m in args.text_methods.split(",") if m.strip())
    text_rows: dict[str, dict[str, Any]] = {}
    text_skipped: list[str] = []
    if text_methods:
        text_yaml = model_dir.parent / "configs" / "text_calibration.yaml"
        vroot = root / "text_calibration"
        _, text_rows = prune_rows(configs, [*overrides, f"output_dir={vroot}", f"data.calibration_text={text_yaml}",
                                            f"prune.num_text_samples={args.text_samples}"],
                                  vroot / base.name, ratios, text_methods, where, args.until, text_skipped)
        skipped += [f"{m} + text" for m in text_skipped]
    variant_results: dict[str, dict[str, Any]] = {}
    for label, vover in variants:  # UKMP only; iterative rows score at every ratio
        vroot = root / "variants" / variant_dir(label)
        vskipped: list[str] = []
        _, vrows = prune_rows(configs, [*overrides, f"output_dir={vroot}", *vover], vroot / base.name, ratios,
                              ("ukmp",), where, args.until, vskipped, rescore=rescores(vover))
        skipped += [f"{label}@{s.split('@', 1)[1]}" for s in vskipped]
        variant_results[label] = {"overrides": vover, "by_ratio": {r: rows["ukmp"] for r, rows in vrows.items()
                                                                   if "ukmp" in rows}}
    recover_ratios = [float(r) for r in args.recover_ratios.split(",") if r.strip()]
    truth: dict[Any, tuple[str, list[str]]] = {}
    for r in recover_ratios:
        rows = by_ratio.get(str(r), {})
        if args.recover_by == "open":  # the per-kind accuracy of every pruned row, from its saved predictions
            truth = truth or vqa_truth(base.eval.datasets[VQA])
            for m, row in rows.items():
                row_breakdown(row, root / f"{base.name}_compare_{r}" / m, truth, base.eval.vqa_scorer)
        chosen = (["ukmp"] if "ukmp" in rows else []) + best_baselines(rows, args.recover_top, args.recover_by)
        jobs = [(m, root, m, [], rows[m]) for m in chosen]  # (label, output root, method, overrides, pruned row)
        jobs += [(label, root / "variants" / variant_dir(label), "ukmp", vover, variant_results[label]["by_ratio"]
                  [str(r)]) for label, vover in variants if str(r) in variant_results[label]["by_ratio"]]
        for label, out, m, extra, row in jobs:  # one run a call, with its pruned row's overrides: the same stages
            if late(args.until) and not finished(out / f"{base.name}_compare_{r}" / m, "eval_finetuned"):
                skipped.append(f"recovery {label}@{r}")
                continue
            try:
                v = compare(configs, [*overrides, f"output_dir={out}", *extra, *row["prune_overrides"]], r, (m,),
                            recover=True, **where)["methods"][m]
            except StageBusyError as e:  # a second invocation recovers it now: this one goes on to the next
                log.info("recovery %s@%s: %s", label, r, e)
                skipped.append(f"recovery {label}@{r} (busy)")
                continue
            row["vqa_recovered"] = metric(v.get("recovered"), VQA)
            row["ppl_recovered"] = metric(v.get("recovered"), PPL)
    result: dict[str, Any] = {
        "name": base.name, "title": variant["title"], "until": args.until, "not_started": skipped,
        "dense": dense, "ratios": ratios, "methods": list(methods), "by_ratio": by_ratio,
        "recover_ratios": recover_ratios, "recover_by": args.recover_by, "ablation_ratio": args.ablation_ratio,
        "overrides": args.overrides,
        "variants": variant_results,
        "text_calibration": {"methods": list(text_methods), "by_ratio": text_rows,
                             "samples": args.text_samples or base.prune.num_samples, "window": 128},
        "ppl_tokens": "first 8 x 512 tokens of the held-out pydoc_data text",
        "total_params": None,
        "recovery_budget": f"schedule {base.finetune.schedule}, sample_scale {base.finetune.sample_scale}, final "
                           f"stage {base.finetune.final_stage_samples}, batch {base.finetune.batch_size}, "
                           f"lr {base.finetune.lr}",
        "machine": f"{os.cpu_count()} CPUs, torch {__import__('torch').__version__}",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "command": f"python benchmarks/quality.py --testbed {testbed} " + " ".join(argv or sys.argv[1:]),
    }
    first = root / f"{base.name}_compare_{ratios[0]}" / methods[0] / "prune" / "summary.json"
    result["total_params"] = json.loads(first.read_text())["parameters"]["total_before"]
    if not args.no_ablations and late(args.until):
        skipped.append("ablations")
    elif not args.no_ablations:
        result["ablations"] = run_ablations(configs, args.overrides, root / f"ablations_{args.ablation_ratio}",
                                            args.ablation_ratio)
    result["total_minutes"] = round((time.monotonic() - t0) / 60, 2)
    result["stage_minutes"] = stage_minutes(root)
    add_breakdowns(result, root, vqa_truth(base.eval.datasets[VQA]), base.eval.vqa_scorer)
    extra: list[Path] = []
    if args.gallery:
        root.mkdir(parents=True, exist_ok=True)
        g = gallery(result, root, args.gallery_ratio if args.gallery_ratio is not None else min(ratios),
                    base.eval.datasets[VQA], args.gallery)
        atomic_write_json(root / "gallery.json", g)
        atomic_write_text(root / "gallery.md", gallery_markdown(g))
        gallery_png(g, root / "gallery.png")
        extra += [root / "gallery.json", root / "gallery.md", root / "gallery.png"]
    write_outputs(result, root, extra, args.results, variant["results"])
    return 0


def write_outputs(result: dict[str, Any], root: Path, extra: list[Path], results: str,
                  prefix: str = "realparts_vlm") -> None:
    """quality.{json,md,png} under ``root``; those and ``extra`` copied to ``results`` as ``<prefix>_*``."""
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "quality.json", result)
    atomic_write_text(root / "quality.md", markdown(result))
    plot(result, root / "quality.png")
    if results:
        dest = Path(results)
        dest.mkdir(parents=True, exist_ok=True)
        for f in [root / "quality.json", root / "quality.md", root / "quality.png", *extra]:
            shutil.copyfile(f, dest / f"{prefix}_{f.name}")
    print(markdown(result))


if __name__ == "__main__":
    raise SystemExit(main())
