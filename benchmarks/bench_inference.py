"""Pruned vs dense inference speed: prefill latency and greedy generation throughput at several batch sizes.

The pruned model comes from a quick UKMP-shaped plan at ``--ratio`` (default 0.5): data-free magnitude scores through
``ukmp.prune.allocate.allocate`` (global, modality-normalised, whole-model parameter ratio), applied physically with
``Blip2T5Adapter.apply_``. Only the kept widths matter for speed, so this stands in for a calibrated UKMP plan (the
plan's per-layer widths differ from UKMP's; the parameter count is the same target).

* prefill latency: one forward of ViT + Q-Former + T5 encoder + one decoder position (median of ``--repeats``);
* generation throughput: ``generate`` with greedy decoding and ``min_new_tokens = max_new_tokens``, so every row
  produces exactly ``--new-tokens`` tokens; tokens/s = batch x new tokens / seconds (median of ``--repeats``).
Dense and pruned runs alternate inside each repeat so that machine-load drift hits both alike.
Run ``python benchmarks/bench_inference.py --help`` for the options.
"""

from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402

TARGET_GPU_SPEEDUP_B32 = 1.8


def prefill_fn(model, inputs: dict[str, torch.Tensor]):
    start = model.config.text_config.decoder_start_token_id
    dec = torch.full((inputs["input_ids"].shape[0], 1), int(start), dtype=torch.long, device=inputs["input_ids"].device)

    def run():
        with torch.inference_mode():
            return model(**inputs, decoder_input_ids=dec).logits

    return run


def generate_fn(model, inputs: dict[str, torch.Tensor], new_tokens: int):
    def run():
        with torch.inference_mode():
            return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  num_beams=1)

    return run


def measure(models: dict[str, Any], inputs: dict[str, torch.Tensor], new_tokens: int, repeats: int,
            device: torch.device) -> dict[str, dict[str, Any]]:
    pre = {k: prefill_fn(m, inputs) for k, m in models.items()}
    gen = {k: generate_fn(m, inputs, new_tokens) for k, m in models.items()}
    for k in models:  # warm-up
        pre[k]()
        gen[k]()
    times: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "generate": []} for k in models}
    produced: dict[str, int] = {}
    for _ in range(repeats):
        for k in models:
            times[k]["prefill"].append(C.timed(pre[k], device)[0])
            t, out = C.timed(gen[k], device)
            times[k]["generate"].append(t)
            produced[k] = int(out.shape[1]) - 1  # the decoder start token is returned too
    bs = inputs["input_ids"].shape[0]
    res = {}
    for k in models:
        gen_s = statistics.median(times[k]["generate"])
        res[k] = {"prefill_s": statistics.median(times[k]["prefill"]), "generate_s": gen_s,
                  "new_tokens_per_row": produced[k], "tokens_per_s": bs * produced[k] / gen_s,
                  "prefill_all_s": times[k]["prefill"], "generate_all_s": times[k]["generate"]}
    return res


def pruned_copy(dense, ratio: float, scope: str = "global"):
    """(a copy of ``dense`` physically pruned with the quick magnitude plan at ``ratio``, that plan)."""
    from ukmp.models import adapter_for

    plan = C.magnitude_plan(dense, ratio, scope)
    pruned = copy.deepcopy(dense)
    adapter_for(pruned).apply_(pruned, plan)
    return pruned, plan


def figure(res: dict[str, Any]):
    import numpy as np

    fig, (a1, a2) = C.new_figure(2)
    rows = res["batches"]
    x = np.arange(len(rows))
    labels = [str(r["batch_size"]) for r in rows]
    for off, k, col in ((-0.2, "dense", "#999"), (0.2, "pruned", "#3a7")):
        a1.bar(x + off, [r[k]["prefill_s"] * 1000 for r in rows], 0.4, label=k, color=col)
        a2.bar(x + off, [r[k]["tokens_per_s"] for r in rows], 0.4, label=k, color=col)
    for ax, yl, title in ((a1, "prefill latency (ms)", "prefill (one forward)"),
                          (a2, "generated tokens / s", f"greedy generation, {res['new_tokens']} new tokens")):
        ax.set_xticks(x, labels)
        ax.set_xlabel("batch size")
        ax.set_ylabel(yl)
        ax.set_title(title)
        ax.legend(fontsize=8)
    for i, r in enumerate(rows):
        a1.text(i, r["dense"]["prefill_s"] * 1000, f"{r['prefill_speedup']:.2f}x", ha="center", va="bottom")
        a2.text(i, r["pruned"]["tokens_per_s"], f"{r['throughput_speedup']:.2f}x", ha="center", va="bottom")
    fig.suptitle(f"pruned ({res['plan']['achieved_ratio']:.0%} of parameters removed) vs dense - "
                 f"{res['setup']['config']} on {res['machine']['device']}")
    return fig


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of all parameters to remove")
    p.add_argument("--scope", default="global", choices=["global", "local"],
                   help="allocation scope of the quick plan (local: the same share of units removed in every group)")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default: 1,32 on CUDA, 1,4,8 on CPU)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per row (default: 32 CUDA, 16 CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported (default: 5 CUDA, 3 CPU)")
    p.add_argument("--name", default="bench_inference", help="results file stem")
    args = p.parse_args(argv)
    setup = C.resolve_setup(args)
    batch_sizes = [int(x) for x in (args.batch_sizes or ("1,32" if setup.cuda else "1,4,8")).split(",")]
    new_tokens = args.new_tokens or (32 if setup.cuda else 16)
    repeats = args.repeats or (5 if setup.cuda else 3)

    from ukmp.models import adapter_for
    from ukmp.models.blip2 import count_parameters
    from ukmp.prune.stage import kind_breakdown

    machine = C.machine_info(setup.device)
    print(f"bench_inference: {setup.config} ({str(setup.dtype).replace('torch.', '')}) on {setup.device}; "
          f"CPU {machine['cpu_model']} x{machine['cpu_cores']}, torch {machine['torch']}, "
          f"load {machine['load_average_at_start']}", flush=True)
    dense, processor = C.load_bench_model(setup, args.seed)
    pruned, plan = pruned_copy(dense, args.ratio, args.scope)
    n_dense, n_pruned = count_parameters(dense), count_parameters(pruned)
    kinds = kind_breakdown(adapter_for(dense).groups(), plan)
    print(f"plan: magnitude scores + ukmp allocate ({args.scope}) at ratio {args.ratio}: {n_dense:,} -> {n_pruned:,} "
          f"parameters ({(n_dense - n_pruned) / n_dense:.1%} removed); kept units: " +
          ", ".join(f"{k} {v['units_after']}/{v['units_before']}" for k, v in kinds.items()), flush=True)
    models = {"dense": dense, "pruned": pruned}
    rows = []
    for bs in batch_sizes:
        inputs = C.to_device(C.generation_inputs(dense, processor, bs, seed=args.seed), setup.device, setup.dtype)
        r = measure(models, inputs, new_tokens, repeats, setup.device)
        r["batch_size"] = bs
        r["prefill_speedup"] = r["dense"]["prefill_s"] / r["pruned"]["prefill_s"]
        r["throughput_speedup"] = r["pruned"]["tokens_per_s"] / r["dense"]["tokens_per_s"]
        rows.append(r)
        print(f"  batch {bs}: prefill {r['prefill_speedup']:.2f}x, generation {r['throughput_speedup']:.2f}x",
              flush=True)
    C.print_table(f"prefill latency and generation throughput ({new_tokens} new tokens, greedy, median of {repeats})",
                  ["batch", "dense prefill ms", "pruned prefill ms", "speed-up", "dense tok/s", "pruned tok/s",
                   "speed-up"],
                  [[r["batch_size"], r["dense"]["prefill_s"] * 1000, r["pruned"]["prefill_s"] * 1000,
                    r["prefill_speedup"], r["dense"]["tokens_per_s"], r["pruned"]["tokens_per_s"],
                    r["throughput_speedup"]] for r in rows])
    missing: list[str] = []
    if not setup.cuda:
        missing.append("GPU: blip2-flan-t5-xl bf16 prefill latency and generation throughput at batch 1 and 32, "
                       f"and the speed-up target (>= {TARGET_GPU_SPEEDUP_B32}x at batch 32) (no CUDA device)")
    elif setup.config != "blip2-flan-t5-xl" or 32 not in batch_sizes:
        missing.append("GPU target at batch 32 on the full-size model: not part of this run's settings")
    else:
        b32 = next(r for r in rows if r["batch_size"] == 32)
        print(f"GPU target at batch 32: >= {TARGET_GPU_SPEEDUP_B32}x; prefill {b32['prefill_speedup']:.2f}x, "
              f"generation {b32['throughput_speedup']:.2f}x")
    res = {"benchmark": "bench_inference", "machine": machine, "command": " ".join(sys.argv),
           "setup": {"config": setup.config, "dtype": str(setup.dtype), "device": str(setup.device)},
           "plan": {"source": f"magnitude scores + ukmp.prune.allocate.allocate ({args.scope}, mean_iterative)",
                    "target_ratio": args.ratio, "params_dense": n_dense, "params_pruned": n_pruned,
                    "achieved_ratio": (n_dense - n_pruned) / n_dense, "digest": plan.digest(),
                    "by_group_kind": kinds},
           "new_tokens": new_tokens, "repeats": repeats, "batches": rows,
           "target_gpu_speedup_batch32": TARGET_GPU_SPEEDUP_B32, "missing": missing}
    return C.finish(setup, args.name, res, missing, figure)


if __name__ == "__main__":
    raise SystemExit(main())
