"""Real-width dry runs: every full-size config through the whole pipeline at a few layers per stack, peak memory
per stage, and a memory model extrapolated to full depth.

    python benchmarks/bench_fullsize.py                                  # every config, depths 1 2 4 (CPU, fp32)
    python benchmarks/bench_fullsize.py --configs llama-3-8b --depths 1,2
    python benchmarks/bench_fullsize.py --render-only                    # tables and plot from saved runs

Each config (``blip2-flan-t5-xl``, ``llava-1.5-7b``, ``instructblip-vicuna-7b``, ``llama-3-8b``) is built with random
weights at its real widths (hidden sizes, heads, MLP widths, vocabularies) but only ``d`` layers in every stack
(ViT, Q-Former, language model encoder and decoder; LLaVA's ViT gets ``d + 1`` because its language model reads
the second-to-last layer, which the prune stage then drops). Each stage runs in its own process through the CLI,
as a user would: ``ukmp prune`` (2 calibration samples, UKMP, the ratio or as close as the floors allow) ->
``ukmp eval`` (2 samples) -> ``ukmp finetune`` (one step in each of the seven recovery sub-stages) -> ``ukmp eval``;
the pruned and recovered models are saved and reloaded on the way. The peak resident memory of each stage is the
kernel's count for that process (``os.wait4``: ``ru_maxrss``).

Memory model, per stage: ``bytes = a * parameters + b * layers + c`` fitted by least squares over every config and
depth that ran, then evaluated at each config's full size (``parameters`` of the dense model, ``layers`` summed over
its stacks). A per-config fit ``bytes = a' * parameters + c'`` over that config's depths is printed beside it: where
the two disagree, the global model is a poor fit for that config and the per-config line is the better guess.
Calibration memory does not grow with the number of samples: batches stream through the model, the Taylor
accumulators and the entropy histograms have fixed sizes, so the 2-sample figure stands for 1,000 samples at the
same batch size.

Outputs: ``benchmarks/results/bench_fullsize.{json,png}``; runs under ``outputs/bench_fullsize/`` (kept, so
``--render-only`` and a re-run with more depths reuse what finished).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

GIB = float(1 << 30)
CONFIGS = ("blip2-flan-t5-xl", "instructblip-vicuna-7b", "llava-1.5-7b", "llama-3-8b")
STAGES = ("prune", "eval_pruned", "finetune", "eval_finetuned")
STACK_KEYS = ("num_hidden_layers", "num_layers", "num_decoder_layers")
RUN_YAML = """\
# bench_fullsize.py: real widths, few layers, the smallest data that exercises every stage
defaults: [{demo}]
name: {name}
output_dir: {out}
model: {{source: {source}, dtype: float32}}
data: {{calibration: {data}, finetune: {data}}}
prune: {{num_samples: 2, batch_size: 2, units_per_step: 64, fine_units_per_step: 8, allow_shortfall: true}}
finetune: {{max_steps_per_stage: 1, batch_size: 2, checkpoint_every: 100, final_stage_samples: 2}}
eval: {{dense: false, after_prune: [{task}], after_finetune: [{task}], max_samples: 2, batch_size: 2, num_beams: 1}}
"""


def truncated_config(name: str, depth: int) -> dict[str, Any]:
    """The shipped config of ``name`` with ``depth`` layers in every stack (LLaVA's ViT: ``depth + 1``)."""
    from ukmp.models.build import shipped_config_path

    cfg = json.loads(shipped_config_path(name).read_text())
    subs = [cfg[k] for k in ("vision_config", "qformer_config", "text_config") if k in cfg] or [cfg]
    for sub in subs:
        for k in STACK_KEYS:
            if k in sub:
                sub[k] = min(sub[k], depth)
    if cfg.get("model_type") == "llava":
        cfg["vision_config"]["num_hidden_layers"] = depth + 1
    return cfg


def size_of(config_source: str | dict) -> tuple[int, int]:
    """(parameters, layers summed over the stacks) of a config, built on the meta device."""
    from ukmp.models import count_parameters
    from ukmp.models.build import build_model, config_from_dict, load_config

    config = config_from_dict(config_source) if isinstance(config_source, dict) else load_config(config_source)
    model = build_model(config, device="meta", seed=None)
    subs = [getattr(config, k) for k in ("vision_config", "qformer_config", "text_config") if hasattr(config, k)]
    return count_parameters(model), sum(stack_layers(s) for s in (subs or [config]))


def stack_layers(sub) -> int:
    """Layers of one stack's config (T5: encoder + decoder; its ``num_hidden_layers`` aliases ``num_layers``)."""
    if sub.model_type in ("t5", "mt5", "umt5"):
        return sub.num_layers + sub.num_decoder_layers
    return sub.num_hidden_layers


def run_child(args: list[str], log: Path, threads: int) -> tuple[int, float, int]:
    """Run one stage command; (exit code, wall seconds, peak RSS bytes of that process)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", OMP_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, int(usage.ru_maxrss) * 1024


def run_depth(name: str, depth: int, root: Path, threads: int) -> dict[str, Any]:
    """Every stage of ``name`` at ``depth`` layers per stack, each in its own process; cached in ``result.json``."""
    from importlib import resources

    d = root / f"{name}_d{depth}"
    done = d / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    d.mkdir(parents=True, exist_ok=True)
    cfg = truncated_config(name, depth)
    (d / "model.json").write_text(json.dumps(cfg, indent=1))
    lm = name == "llama-3-8b"
    (d / "run.yaml").write_text(RUN_YAML.format(
        demo=resources.files("ukmp") / "configs" / "demo.yaml", name="run", out=d, source=d / "model.json",
        data="sample:text" if lm else "sample:cc595k", task="perplexity" if lm else "okvqa"))
    params, layers = size_of(cfg)
    ukmp = [sys.executable, "-m", "ukmp.cli"]
    run = d / "run"
    commands = {
        # --force-stage: a stage left finished by an interrupted earlier call is measured again, not skipped
        "prune": [*ukmp, "prune", str(d / "run.yaml"), "--force-stage"],
        "eval_pruned": [*ukmp, "eval", str(d / "run.yaml"), "--model", str(run / "prune" / "model")],
        "finetune": [*ukmp, "finetune", str(d / "run.yaml"), "--force-stage"],
        "eval_finetuned": [*ukmp, "eval", str(d / "run.yaml"), "--model", str(run / "finetune" / "model")],
    }
    out: dict[str, Any] = {"config": name, "depth": depth, "parameters": params, "layers": layers, "stages": {}}
    for stage in STAGES:
        print(f"  {name} d={depth}: {stage} ...", flush=True)
        rc, wall, rss = run_child(commands[stage], d / f"{stage}.log", threads)
        out["stages"][stage] = {"exit_code": rc, "seconds": round(wall, 1), "peak_rss_bytes": rss}
        if rc != 0:
            tail = (d / f"{stage}.log").read_text(errors="replace").strip().splitlines()[-1:]
            out["stages"][stage]["error"] = tail[0] if tail else ""
            break
    summary = run / "prune" / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        out["achieved_ratio"], out["calibration"] = s.get("achieved_ratio"), s.get("calibration", {})
    if all(s["exit_code"] == 0 for s in out["stages"].values()) and len(out["stages"]) == len(STAGES):
        done.write_text(json.dumps(out, indent=1))
    return out


def run_variant(name: str, depth: int, root: Path, threads: int, label: str, overrides: list[str]) -> dict[str, Any]:
    """The prune stage alone of a finished depth run, again with ``overrides`` (e.g. the scoring memory options), into
    its own run directory; cached in ``variant_<label>.json``."""
    d = root / f"{name}_d{depth}"
    done = d / f"variant_{label}.json"
    if done.is_file():
        return json.loads(done.read_text())
    args = [sys.executable, "-m", "ukmp.cli", "prune", str(d / "run.yaml"), f"name=variant_{label}", *overrides,
            "--force-stage"]
    rc, wall, rss = run_child(args, d / f"variant_{label}.log", threads)
    out: dict[str, Any] = {"config": name, "depth": depth, "variant": label, "overrides": overrides,
                           "exit_code": rc, "seconds": round(wall, 1), "peak_rss_bytes": rss}
    summary = d / f"variant_{label}" / "prune" / "summary.json"
    if rc == 0 and summary.is_file():
        out["calibration"] = json.loads(summary.read_text())["calibration"]
        done.write_text(json.dumps(out, indent=1))
    return out


def lstsq(rows: list[list[float]], ys: list[float]) -> list[float]:
    import numpy as np

    coef, *_ = np.linalg.lstsq(np.asarray(rows, dtype=float), np.asarray(ys, dtype=float), rcond=None)
    return [float(c) for c in coef]


def fit(runs: list[dict[str, Any]], full: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Per stage: the global model a*P + b*L + c, its residuals, and per config a*P + c and both extrapolations."""
    out: dict[str, Any] = {}
    ok = [r for r in runs if all(r["stages"].get(s, {}).get("exit_code") == 0 for s in STAGES)]
    for stage in STAGES:
        pts = [(r["config"], r["parameters"], r["layers"], r["stages"][stage]["peak_rss_bytes"]) for r in ok]
        if len(pts) < 3:
            continue
        a, b, c = lstsq([[p, n, 1.0] for _, p, n, _ in pts], [y for *_, y in pts])
        resid = max(abs(a * p + b * n + c - y) for _, p, n, y in pts)
        per: dict[str, Any] = {}
        for name in sorted({p[0] for p in pts}):
            mine = [(p, y) for cfg, p, _, y in pts if cfg == name]
            P, L = full[name]
            row = {"global_gib": round((a * P + b * L + c) / GIB, 2), "depths": len(mine)}
            if len(mine) >= 2:
                a1, c1 = lstsq([[p, 1.0] for p, _ in mine], [y for _, y in mine])
                row["per_config_gib"] = round((a1 * P + c1) / GIB, 2)
                row["bytes_per_parameter"] = round(a1, 3)
            per[name] = row
        out[stage] = {"a_bytes_per_parameter": round(a, 4), "b_bytes_per_layer": round(b), "c_bytes": round(c),
                      "max_residual_gib": round(resid / GIB, 3), "full_depth": per}
    return out


def variant_markdown(res: dict[str, Any]) -> str:
    """The prune stage with and without a memory option, per config and depth that ran both."""
    base = {(r["config"], r["depth"]): r for r in res["runs"]}
    lines = ["| config | depth | prune stage | peak RSS (GiB) | accumulators held (GiB) | seconds |",
             "|---|---:|---|---:|---:|---:|"]
    for v in res.get("variants", []):
        b = base.get((v["config"], v["depth"]))
        if b is None or v["exit_code"] != 0:
            continue
        for label, rss, cal, secs in (("default", b["stages"]["prune"]["peak_rss_bytes"], b.get("calibration", {}),
                                       b["stages"]["prune"]["seconds"]),
                                      (" ".join(v["overrides"]), v["peak_rss_bytes"], v["calibration"], v["seconds"])):
            held = cal.get("accumulator_peak_bytes_cpu")
            lines.append(f"| {v['config']} | {v['depth']} | {label} | {rss / GIB:.2f} | "
                         f"{'–' if held is None else f'{held / GIB:.2f}'} | {secs:.0f} |")
    return "\n".join(lines) + "\n"


def markdown(res: dict[str, Any]) -> str:
    lines = ["| config | depth | parameters | " + " | ".join(f"{s} peak RSS (GiB)" for s in STAGES)
             + " | seconds (all stages) |", "|---|---:|---:|" + "---:|" * len(STAGES) + "---:|"]
    for r in res["runs"]:
        cells = []
        for s in STAGES:
            st = r["stages"].get(s)
            cells.append("–" if st is None else (f"{st['peak_rss_bytes'] / GIB:.2f}" if st["exit_code"] == 0
                                                 else f"failed ({st.get('error', '')[:40]})"))
        secs = sum(s["seconds"] for s in r["stages"].values())
        lines.append(f"| {r['config']} | {r['depth']} | {r['parameters']:,} | " + " | ".join(cells)
                     + f" | {secs:.0f} |")
    lines += ["", "| stage | a (bytes/param) | b (bytes/layer) | c (GiB) | max residual (GiB) | "
              + " | ".join(f"{c} full (GiB, global / per config)" for c in res["configs"]) + " |",
              "|---|---:|---:|---:|---:|" + "---:|" * len(res["configs"])]
    for stage, m in res["model"].items():
        cells = []
        for c in res["configs"]:
            row = m["full_depth"].get(c)
            cells.append("–" if row is None else f"{row['global_gib']} / {row.get('per_config_gib', '–')}")
        lines.append(f"| {stage} | {m['a_bytes_per_parameter']} | {m['b_bytes_per_layer']:,} | "
                     f"{m['c_bytes'] / GIB:.2f} | {m['max_residual_gib']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(STAGES), figsize=(4.2 * len(STAGES), 3.8), sharey=True)
    for ax, stage in zip(axes, STAGES):
        for name in res["configs"]:
            pts = sorted((r["parameters"] / 1e9, r["stages"][stage]["peak_rss_bytes"] / GIB) for r in res["runs"]
                         if r["config"] == name and r["stages"].get(stage, {}).get("exit_code") == 0)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_title(stage)
        ax.set_xlabel("parameters (billions, truncated model)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("peak RSS (GiB, fp32 on CPU)")
    axes[0].legend(fontsize=7)
    fig.suptitle("ukmp stages at real widths, few layers: peak memory per process")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--depths", default="1,2,4", help="layers per stack")
    p.add_argument("--max-depth", default="llama-3-8b=2",
                   help="per-config depth caps, name=d,...: runs that would not fit beside other work in 24 GiB")
    p.add_argument("--threads", type=int, default=2, help="OMP threads of each stage process")
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench_fullsize"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--render-only", action="store_true", help="tables and plot from the finished runs only")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL:CONFIG:DEPTH:KEY=VALUE[,KEY=VALUE]",
                   help="also run the prune stage of a finished run with these overrides, e.g. "
                        "passes4:blip2-flan-t5-xl:2:prune.score_passes=4 (repeatable)")
    args = p.parse_args(argv)
    from ukmp.io import atomic_write_json, atomic_write_text

    configs = [c for c in args.configs.split(",") if c]
    depths = [int(x) for x in args.depths.split(",") if x]
    caps = {k: int(v) for k, v in (kv.split("=") for kv in args.max_depth.split(",") if kv)}
    root = Path(args.out)
    load_start = list(os.getloadavg())
    runs = []
    for name in configs:
        for depth in depths:
            if depth > caps.get(name, depth):
                continue
            cached = root / f"{name}_d{depth}" / "result.json"
            if args.render_only:
                if cached.is_file():
                    runs.append(json.loads(cached.read_text()))
                continue
            runs.append(run_depth(name, depth, root, args.threads))
    if args.render_only:  # every variant that finished earlier
        variants = [json.loads(p.read_text()) for p in sorted(root.glob("*_d*/variant_*.json"))]
    else:
        variants = []
        for spec in args.variant:
            label, name, depth, over = spec.split(":", 3)
            variants.append(run_variant(name, int(depth), root, args.threads, label, over.split(",")))
    for r in runs:  # sizes from the saved truncated config (the same function as the full-size ones)
        r["parameters"], r["layers"] = size_of(json.loads((root / f"{r['config']}_d{r['depth']}" / "model.json")
                                                          .read_text()))
    full = {name: size_of(name) for name in configs}
    res = {
        "benchmark": "bench_fullsize",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads_per_stage": args.threads, "dtype": "float32 (this CPU has no fast bf16)",
                    "load_average_at_start": load_start, "load_average_at_end": list(os.getloadavg())},
        "configs": configs,
        "full_size": {n: {"parameters": P, "layers": L} for n, (P, L) in full.items()},
        "runs": runs,
        "model": fit(runs, full),
        "variants": variants,
    }
    for r in runs:  # the calibration record of runs cached before it was kept
        if "calibration" not in r:
            summary = root / f"{r['config']}_d{r['depth']}" / "run" / "prune" / "summary.json"
            if summary.is_file():
                r["calibration"] = json.loads(summary.read_text()).get("calibration", {})
    md = markdown(res) + ("\n" + variant_markdown(res) if variants else "")
    print(md)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(results / "bench_fullsize.json", res)
    atomic_write_text(results / "bench_fullsize.md", md)
    plot(res, results / "bench_fullsize.png")
    print(f"wrote {results / 'bench_fullsize.json'}, .md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
