"""Quality benchmarks: does UKMP keep more than the baselines, and does LPD recover it?

    python benchmarks/quality.py --testbed realparts     # real weights: DINOv2-S + SmolLM2-135M BLIP-2 (see
                                                         #   benchmarks/realparts/quality_vlm.py; build.py first)
    python benchmarks/quality.py --testbed realparts-llava  # the same on the LLaVA of realparts/build_llava.py
    python benchmarks/quality.py --testbed smollm2       # real weights, language only: SmolLM2-135M as a causal LM
                                                         #   (benchmarks/realparts/language.py)
    python benchmarks/testbed/build.py --seed 0          # the from-scratch testbed ("calibration = training data")
    python benchmarks/quality.py [--testbed easyvqa] [--ratios 0.3,0.5] [--methods ...] [--no-recover]
                                 [--no-ablations] [key=value ...]

The rest of this docstring is about the from-scratch testbed (``--testbed easyvqa``, the default).

One command produces, under outputs/<name>_quality/ (every run cached and resumable):
  * dense accuracy; for each ratio and method, accuracy after pruning and after recovery (same recovery budget
    for every method: the testbed config's finetune section; UPop's own search is part of its pruning);
  * the appendix's ablations at ratio 0.5 (after pruning, and after recovery for the LPD-loss rows):
    Table B normalisation / Taylor term / entropy, Table C threshold T sweep with tokens back-propagated;
  * quality.json, quality.md and quality.png (accuracy vs ratio per method; solid = pruned, dashed = recovered).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ablations import ablation_table  # noqa: E402
from ukmp.compare import DEFAULT_METHODS, compare  # noqa: E402
from ukmp.config import load_config  # noqa: E402
from ukmp.io import atomic_write_json, atomic_write_text  # noqa: E402
from ukmp.pipeline import run  # noqa: E402

log = logging.getLogger("quality")
TASK, METRIC = "okvqa", "accuracy"  # okvqa = the easy-VQA test set (VQA accuracy = exact match)

ABLATIONS = ablation_table(thresholds=(1.0, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3))  # every row of Tables B and C
LPD_ABLATIONS = [
    ("progressive (UKMP)", ["finetune.schedule=progressive"]),
    ("MSE + KL + Task throughout", ["finetune.schedule=mse_kl_task_all"]),
    ("KL + Task", ["finetune.schedule=kl_task"]),
    ("Task", ["finetune.schedule=task"]),
    ("without the progressive schedule", ["finetune.schedule=no_progressive"]),
    ("plain LoRA instead of WR-LoRA", ["finetune.adapter=lora"]),
]


def _acc(metrics: dict[str, Any] | None) -> float | None:
    return None if not metrics or TASK not in metrics else metrics[TASK][METRIC]


def run_ablations(configs: list[str], overrides: list[str], root: Path, ratio: float, recover: bool) -> dict:
    base_scores = None
    out: dict[str, list[dict[str, Any]]] = {}
    common = [*overrides, f"output_dir={root}", f"prune.ratio={ratio}", "prune.method=ukmp", "eval.dense=false",
              f"eval.after_prune=[{TASK}]", f"eval.after_finetune=[{TASK}]", "finetune.enabled=false"]
    ref = run(load_config(configs, [*common, "name=ukmp_reference"]))
    base_scores = root / "ukmp_reference" / "prune" / "scores.safetensors"
    for table, rows in ABLATIONS.items():
        out[table] = []
        for k, (label, ov, rescore) in enumerate(rows):
            extra = [] if rescore else [f"prune.scores_from={base_scores}"]
            name = f"abl_{table.split(':')[0].lower()}_{table.split(': ')[1].replace(' ', '_').replace('-', '')}_{k}"
            r = run(load_config(configs, [*common, *ov, *extra, f"name={name}"]))
            summary = json.loads((root / name / "prune" / "summary.json").read_text())
            cal = summary.get("calibration", {})
            out[table].append({"variant": label, "overrides": ov, "pruned": _acc(r["metrics"].get("pruned")),
                               "achieved_ratio": r["achieved_ratio"], "tokens_selected": cal.get("tokens_selected"),
                               "tokens_total": cal.get("tokens_total")})
    if recover:
        out["B: LPD loss"] = []
        for k, (label, ov) in enumerate(LPD_ABLATIONS):
            name = f"abl_lpd_{k}"
            r = run(load_config(configs, [*common, "finetune.enabled=true", *ov, f"name={name}",
                                          f"prune.scores_from={base_scores}"]))
            out["B: LPD loss"].append({"variant": label, "overrides": ov, "pruned": _acc(r["metrics"].get("pruned")),
                                       "recovered": _acc(r["metrics"].get("recovered")),
                                       "achieved_ratio": r["achieved_ratio"]})
    out["_reference_pruned"] = _acc(ref["metrics"].get("pruned"))
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ratios = [0.0] + result["ratios"]
    dense = result["dense"]
    for i, m in enumerate(result["methods"]):
        colour = f"C{i % 10}"
        for state, style in (("pruned", "-"), ("recovered", "--")):
            ys = [dense] + [result["by_ratio"][str(r)][m].get(state) for r in result["ratios"]]
            if all(y is None for y in ys[1:]):
                continue
            ax.plot(ratios, [float("nan") if y is None else y for y in ys], style, marker="o", color=colour,
                    label=f"{m}" if state == "pruned" else None, lw=2.2 if m == "ukmp" else 1.2)
    ax.axhline(dense, color="k", lw=0.8, ls=":")
    ax.set_xlabel("pruning ratio (fraction of all parameters)")
    ax.set_ylabel("easy-VQA test accuracy (%)")
    ax.set_title("testbed: solid = after pruning, dashed = after recovery")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Quality on the easy-VQA testbed ({TASK} {METRIC}, %)", "",
             f"Dense: **{result['dense']:.2f}**. Recovery budget (every method): {result['recovery_budget']}.", ""]
    head = "| method | " + " | ".join(f"{r} pruned | {r} recovered | {r} achieved" for r in result["ratios"]) + " |"
    lines += [head, "|---|" + "---:|---:|---:|" * len(result["ratios"])]
    for m in result["methods"]:
        cells = []
        for r in result["ratios"]:
            row = result["by_ratio"][str(r)][m]
            fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
            cells += [fmt(row.get("pruned")), fmt(row.get("recovered")), f"{row['achieved_ratio']:.3f}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for table, rows in result.get("ablations", {}).items():
        if table.startswith("_"):
            continue
        lines += ["", f"## Table {table} (ratio {result['ablation_ratio']})", "",
                  "| variant | pruned | recovered | tokens back-propagated | achieved |", "|---|---:|---:|---:|---:|"]
        for r in rows:
            tok = "–" if r.get("tokens_selected") is None else f"{r['tokens_selected']} / {r['tokens_total']}"
            rec = "–" if r.get("recovered") is None else f"{r['recovered']:.2f}"
            pr = "–" if r.get("pruned") is None else f"{r['pruned']:.2f}"
            lines.append(f"| {r['variant']} | {pr} | {rec} | {tok} | {r['achieved_ratio']:.3f} |")
    lines += ["", "## Targets", ""] + [f"- {t}" for t in result["targets"]]
    return "\n".join(lines) + "\n"


def targets(result: dict[str, Any]) -> list[str]:
    out = []
    r5 = result["by_ratio"].get("0.5")
    if r5 and "ukmp" in r5:
        u = r5["ukmp"]["pruned"]
        best = max(((m, v["pruned"]) for m, v in r5.items() if m != "ukmp" and v["pruned"] is not None),
                   key=lambda t: t[1], default=(None, None))
        if best[0] is not None:
            verdict = "met" if u >= best[1] else f"missed by {best[1] - u:.2f} points"
            out.append(f"UKMP after pruning at 0.5 ({u:.2f}) >= every baseline (best: {best[0]} {best[1]:.2f}): "
                       f"{verdict}")
        rec = r5["ukmp"].get("recovered")
        if rec is not None:
            need = 0.95 * result["dense"]
            verdict = "met" if rec >= need else f"missed by {need - rec:.2f} points"
            out.append(f"UKMP after recovery at 0.5 ({rec:.2f}) >= 95 % of dense ({need:.2f}): {verdict}")
    return out


TESTBEDS = {"easyvqa": None, "realparts": "quality_vlm", "realparts-llava": "quality_vlm", "smollm2": "language"}


def pop_testbed(argv: list[str]) -> tuple[str, list[str]]:
    """``--testbed NAME`` / ``--testbed=NAME`` taken out of ``argv`` (default ``easyvqa``)."""
    rest, testbed, k = [], "easyvqa", 0
    while k < len(argv):
        a = argv[k]
        if a == "--testbed" and k + 1 < len(argv):
            testbed, k = argv[k + 1], k + 2
            continue
        if a.startswith("--testbed="):
            testbed = a.split("=", 1)[1]
        else:
            rest.append(a)
        k += 1
    if testbed not in TESTBEDS:
        raise SystemExit(f"error: --testbed: choose from {', '.join(TESTBEDS)}, got {testbed!r}")
    return testbed, rest


def main(argv: list[str] | None = None) -> int:
    testbed, argv = pop_testbed(list(sys.argv[1:] if argv is None else argv))
    if TESTBEDS[testbed]:
        import importlib

        sys.path.insert(0, str(ROOT / "benchmarks" / "realparts"))
        module = importlib.import_module(TESTBEDS[testbed])
        return module.main(argv, testbed=testbed) if testbed in getattr(module, "VARIANTS", {}) else module.main(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--testbed", default="easyvqa", choices=list(TESTBEDS), help="which testbed (see above)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--config", default=str(ROOT / "benchmarks" / "testbed" / "testbed.yaml"))
    p.add_argument("--ratios", default="0.3,0.5")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--no-recover", action="store_true")
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--ablation-ratio", type=float, default=0.5)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    configs = [args.config]
    base = load_config(configs, args.overrides)
    root = Path(base.output_dir) / f"{base.name}_quality"
    overrides = [*args.overrides, f"output_dir={root}", f"eval.after_prune=[{TASK}]", f"eval.after_finetune=[{TASK}]"]
    ratios = [float(r) for r in args.ratios.split(",")]
    methods = tuple(args.methods.split(","))
    recover = not args.no_recover
    by_ratio: dict[str, dict[str, Any]] = {}
    dense = None
    for r in ratios:
        res = compare(configs, overrides, r, methods, recover=recover, methods_dir=ROOT / "configs" / "methods")
        dense = res["dense"][TASK][METRIC]
        by_ratio[str(r)] = {m: {"pruned": _acc(v["pruned"]), "recovered": _acc(v.get("recovered")),
                                "achieved_ratio": v["achieved_ratio"], "prune_seconds": v["prune_seconds"]}
                            for m, v in res["methods"].items()}
    result: dict[str, Any] = {"task": TASK, "metric": METRIC, "dense": dense, "ratios": ratios,
                              "methods": list(methods), "by_ratio": by_ratio, "ablation_ratio": args.ablation_ratio,
                              "recovery_budget": f"schedule {base.finetune.schedule}, sample_scale "
                                                 f"{base.finetune.sample_scale}, final stage "
                                                 f"{base.finetune.final_stage_samples}, batch "
                                                 f"{base.finetune.batch_size}, lr {base.finetune.lr}"}
    if not args.no_ablations:
        result["ablations"] = run_ablations(configs, [*args.overrides], root / f"ablations_{args.ablation_ratio}",
                                            args.ablation_ratio,
                                            recover)
    result["targets"] = targets(result)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "quality.json", result)
    atomic_write_text(root / "quality.md", markdown(result))
    plot(result, root / "quality.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
