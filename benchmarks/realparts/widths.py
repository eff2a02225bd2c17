"""Real-weights benchmark, language track: the quality cost of engine-friendly widths (issue 26 item 2).

    python benchmarks/realparts/widths.py [--ratios 0.2,0.3,0.5] [--methods ukmp,llm_pruner_global]
                                          [--scores-root outputs/realparts_lm_quality] [--threads 1]

SmolLM2-135M-Instruct (float32, as in ``language.py``) pruned at each ratio by each method with every variant of
``VARIANTS``: the default allocation, ``prune.width_multiple`` 32 and 256, ``prune.scope=uniform`` and uniform with
multiples of 256. No variant scores again: each re-allocates the scores that the language track computed
(``<scores-root>/ratio_<first ratio>/<method>/prune/scores.safetensors``, run ``language.py`` first), so a row
differs from the default row by its allocation alone; the default row's plan is checked to be the very plan the
language track made (its ``plan.json`` digest). The uniform rows set ``prune.exact_stop=true``: one uniform step
removes a unit from all 30 layers (30 KV groups are 6.6 % of the model, 30 x 256 MLP channels 9.9 %), and a step
cut at the unit that reaches the target could overshoot by that much; with exact_stop the plan stays at or below
the target and the achieved ratio is in the table. Perplexity on the same 4,096 held-out tokens as the track.

Each run's pruned weights are deleted once it is evaluated (``--keep-models`` keeps them: 30 runs, ~10 GB).
Writes ``outputs/realparts_lm_widths/widths.{json,md}`` and copies them to ``benchmarks/results/realparts_lm_widths.*``.
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import language  # noqa: E402  (sets the offline environment and the import paths)

from ukmp.config import load_config  # noqa: E402
from ukmp.io import atomic_write_json, atomic_write_text  # noqa: E402

log = logging.getLogger("realparts.widths")
VARIANTS: list[tuple[str, list[str]]] = [
    ("default", []),
    ("width_multiple 32", ["prune.width_multiple=32"]),
    ("width_multiple 256", ["prune.width_multiple=256"]),
    ("uniform", ["prune.scope=uniform", "prune.exact_stop=true"]),
    ("uniform + width_multiple 256", ["prune.scope=uniform", "prune.width_multiple=256", "prune.exact_stop=true"]),
]


def widths_of(plan_path: Path) -> dict[str, list[int]]:
    """Kept units per layer, per group kind, read from a plan.json (``lm_mlp`` -> [1536, 1280, ...])."""
    plan = json.loads(plan_path.read_text())
    out: dict[str, list[int]] = {}
    for gid, units in sorted(plan["units"].items(), key=lambda kv: int(kv[0].split(".layers.")[1].split(".")[0])):
        kind = "lm_heads" if gid.endswith(".attn") else "lm_mlp"
        out.setdefault(kind, []).append(len(plan["keep"].get(gid, range(units))))
    return out


def markdown(result: dict[str, Any]) -> str:
    s = result["setup"]
    lines = ["# Engine-friendly widths: quality cost on SmolLM2-135M (held-out perplexity, no recovery)", "",
             f"Dense perplexity **{result['dense']:.2f}** on {s['eval_tokens']:,} held-out tokens; machine: "
             f"{s['machine']}; {s['date']}; load average at start {s['load_at_start']}; "
             f"{result['wall_seconds']:,.0f} s",
             f"- command: `{s['command']}`", f"- scores: {s['scores']}", ""]
    for m in result["methods"]:
        lines += [f"## {m}", "", "| variant | " + " | ".join(f"{r}: ppl (achieved)" for r in result["ratios"])
                  + " | cost vs default (ppl ratio) |", "|---|" + "---:|" * (len(result["ratios"]) + 1)]
        base = {r: (result["rows"][m].get("default", {}).get(str(r)) or {}).get("pruned") for r in result["ratios"]}
        for label, _ in VARIANTS:
            cells, costs = [], []
            for r in result["ratios"]:
                row = result["rows"][m].get(label, {}).get(str(r))
                if not row or row.get("error"):
                    cells.append(f"error: {row['error']}" if row else "–")
                    continue
                cells.append(f"{row['pruned']:,.2f} ({row['achieved_ratio']:.4f})")
                if base[r]:
                    costs.append(f"{row['pruned'] / base[r]:.2f}x")
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {' / '.join(costs)} |")
        lines += [""]
        for label, _ in VARIANTS:
            for r in result["ratios"]:
                row = result["rows"][m].get(label, {}).get(str(r)) or {}
                if "widths" in row:
                    w = row["widths"]
                    lines.append(f"- {label} @ {r}: lm_mlp widths {sorted(set(w['lm_mlp']))}, KV groups per layer "
                                 f"{sorted(set(w['lm_heads']))}" + (f"; same plan as the language track: "
                                                                     f"{row['same_plan_as_track']}"
                                                                     if "same_plan_as_track" in row else ""))
        lines += [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", default="0.2,0.3,0.5")
    p.add_argument("--methods", default="ukmp,llm_pruner_global")
    p.add_argument("--scores-root", default="outputs/realparts_lm_quality", help="the language track's run root")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--keep-models", action="store_true", help="keep each run's pruned weights (deleted once evaluated)")
    p.add_argument("--results-dir", default=str(language.RESULTS), help="where the results are copied ('' = nowhere)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    t0, load = time.perf_counter(), os.getloadavg()
    ratios = [float(r) for r in args.ratios.split(",")]
    methods = args.methods.split(",")
    scores_root = Path(args.scores_root)
    configs = [str(language.CONFIG)]
    user = [*language.real_model_overrides(language.assets.default_cache_dir()), "prune.num_samples=32",
            "eval.max_samples=8"]
    base = load_config(configs, user)
    root = Path(base.output_dir) / f"{base.name}_widths"
    over = [*user, "finetune.enabled=false", f"eval.after_prune=[{language.TASK}]",
            f"eval.after_finetune=[{language.TASK}]"]
    sources = {m: scores_root / f"ratio_{ratios[0]}" / m / "prune" / "scores.safetensors" for m in methods}
    for m, src in sources.items():
        if not src.is_file():
            raise SystemExit(f"--scores-root: {src} not found (run benchmarks/realparts/language.py first)")
    dense = language.eval_dense(load_config(configs, [*over, f"output_dir={root}", "name=dense"]),
                                root / "dense" / "eval_dense")
    result: dict[str, Any] = {
        "dense": language._ppl(dense["metrics"]), "ratios": ratios, "methods": methods, "variants": dict(VARIANTS),
        "rows": {m: {} for m in methods}, "wall_seconds": 0.0,
        "setup": {"eval_tokens": 8 * 512, "load_at_start": " ".join(f"{x:.2f}" for x in load),
                  "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
                             f"{torch.__version__} on {args.threads} thread(s)",
                  "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  "command": "python benchmarks/realparts/widths.py " + " ".join(argv if argv is not None
                                                                               else sys.argv[1:]),
                  "scores": ", ".join(f"{m}: {src}" for m, src in sources.items())}}
    for m in methods:
        for label, ov in VARIANTS:
            tag = label.replace(" + ", "_").replace(" ", "")
            for r in ratios:
                log.info("widths: %s %s at %s", m, label, r)
                rdir = root / f"ratio_{r}"
                try:
                    row = language.run_method(configs, [*over, *ov, f"prune.scores_from={sources[m]}"], m, r, rdir,
                                              [], name=f"{m}_{tag}")
                    plan = rdir / f"{m}_{tag}" / "prune" / "plan.json"
                    row["widths"] = widths_of(plan)
                    track = scores_root / f"ratio_{r}" / m / "prune" / "plan.json"
                    if not ov and track.is_file():
                        from ukmp.plan import PruningPlan

                        row["same_plan_as_track"] = PruningPlan.load(plan).digest() == PruningPlan.load(track).digest()
                    weights = plan.parent / "model" / "model.safetensors"
                    if not args.keep_models and weights.is_file():  # ~400 MB per run; its plan and ppl stay
                        weights.unlink()
                except Exception as e:  # noqa: BLE001 - a variant's failure is a result
                    log.exception("widths: %s %s at %s failed", m, label, r)
                    row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                result["rows"][m].setdefault(label, {})[str(r)] = row
                result["wall_seconds"] = round(time.perf_counter() - t0, 1)
                atomic_write_json(root / "widths.json", result)
    md = markdown(result)
    atomic_write_text(root / "widths.md", md)
    if args.results_dir:
        for ext in ("json", "md"):
            shutil.copyfile(root / f"widths.{ext}", Path(args.results_dir) / f"realparts_lm_widths.{ext}")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
