"""The prepared GPU check (``benchmarks/gpu/run.sh``): the GPU rows of BENCHMARKS.md in one run of <= 9 minutes.

On CUDA: the full-size ``blip2-flan-t5-xl`` config in bf16 with random weights, loaded once and used by every section.

* scoring: UKMP's Taylor + entropy passes (``fused_pass``) over N synthetic calibration samples, three ways: the
  accumulators on the device (today's default), ``accumulate_on="cpu"`` (``prune.accumulate_on=cpu``) and
  ``passes=2`` (``prune.score_passes=2``); seconds, peak ``torch.cuda.max_memory_allocated`` and the accumulator bytes
  the scorer reports, and each option's largest score difference from the default. Then the default at the large N
  (1000, the target's) if its time, extrapolated from the small N, fits the section's budget;
* generation: batch 32, greedy, dense against a 50 %-pruned copy (``bench_inference.measure``): tokens/s, prefill
  latency and ms per generated token;
* distillation: one LPD step (sub-stage 7, CE + KL) of a WR-LoRA student against the dense teacher
  (``bench_distill.run_stage``): step seconds, counted FLOPs and MFU.

``--tiny`` runs the same code on the tiny config in fp32 on the CPU in seconds (the test suite does). Every section
has a time budget; one that does not fit in the time left is skipped with its reason in the JSON, which is written
after every section (and by a watchdog at the total limit), so a slow GPU still returns what it measured.
"""

from __future__ import annotations

import time

T_START = time.monotonic()  # run as a script, the total limit counts the imports too

import copy  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import _common as C  # noqa: E402
import torch  # noqa: E402
from gpu_budget import FIGURES, Budget, Watchdog, figures, write_json  # noqa: E402

# (full-size on a GPU, --tiny on the CPU)
DEFAULTS = {
    "samples": (128, 4), "samples_large": (1000, 8), "batch_size": (8, 2), "gen_batch": (32, 32),
    "new_tokens": (32, 4), "repeats": (3, 1), "distill_batch": (16, 2), "distill_steps": (3, 1),
    "total_s": (500.0, 120.0), "scoring_s": (230.0, 60.0), "generation_s": (100.0, 30.0), "distill_s": (90.0, 30.0),
}
OPTION_COST = {"accumulate_on_cpu": 1.5, "score_passes_2": 2.0}  # assumed time factors over the default, for the guard


def peak_tflops(gpu: str | None, given: float | None) -> tuple[float, str]:
    """bf16 dense tensor-core peak for MFU: ``--peak-tflops`` if given, else by GPU name (H100 SXM / H200: 989,
    H100 PCIe: 756), else the H100 SXM figure, stated as assumed."""
    if given:
        return given, "--peak-tflops"
    name = (gpu or "").upper()
    if "H100" in name and "PCIE" in name:
        return 756.0, f"{gpu}: H100 PCIe bf16 dense peak"
    if "H100" in name or "H200" in name:
        return C.H100_BF16_DENSE_TFLOPS, f"{gpu}: H100 SXM / H200 bf16 dense peak"
    return C.H100_BF16_DENSE_TFLOPS, f"assumed H100 SXM bf16 dense peak ({gpu or 'no GPU'})"


# ---------------------------------------------------------------------------------------------------- sections
def failure(e: Exception) -> str:
    """The JSON's reason for a part that raised (its traceback goes to stderr); frees what CUDA can."""
    traceback.print_exc()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return f"failed: {type(e).__name__}: {e}"[:600]


def scoring_run(setup: C.Setup, model, groups, batches, threshold: float, **memory) -> tuple[dict[str, Any], dict]:
    """One fused UKMP scoring pass (entropy + Taylor) with its peak memory; (figures, Taylor scores)."""
    from ukmp.prune.scoring import fused_pass

    with C.PeakMemory(setup.device) as mem:  # fused_pass re-reads the batches once per pass
        seconds, (taylor, _, stats) = C.timed(lambda: fused_pass(model, groups, lambda: batches, threshold, **memory),
                                              setup.device)
    acc = {k[len("accumulator_peak_bytes_"):]: v for k, v in stats.items() if k.startswith("accumulator_peak_bytes_")}
    n = sum(int(b["input_ids"].shape[0]) for b in batches)
    return {"samples": n, "seconds": seconds, "samples_per_s": n / seconds, "peak_bytes": mem.peak,
            "peak_gib": mem.peak / C.GIB, "memory": mem.to_dict(), "accumulator_peak_bytes": acc,
            "accumulator_gib_on_device": acc.get(setup.device.type, 0) / C.GIB,
            "accumulator_gib_on_cpu": acc.get("cpu", 0) / C.GIB, "options": memory,
            "tokens_selected": stats.get("tokens_selected")}, taylor


def section_scoring(setup, args, model, processor, budget: Budget, dog: Watchdog, res: dict[str, Any]) -> dict:
    from bench_scoring import rel_diff

    from ukmp.models import adapter_for
    from ukmp.prune.scoring import fused_pass

    groups = adapter_for(model).groups()
    kinds = {g.id: g.kind for g in groups}
    n, bs, T = args.samples, args.batch_size, args.threshold
    collate = C.calibration_collator(model, processor, args.samples_large, seed=args.seed, augment=False)
    t_collate, batches = C.timed(lambda: C.make_batches(collate, n, bs, group_by_length=True), torch.device("cpu"))
    out: dict[str, Any] = {"samples": n, "batch_size": bs, "threshold": T, "seconds_collate_cpu": t_collate,
                           "pass": "fused_pass (entropy histograms + Taylor, one forward/backward per batch)"}
    dog.running("scoring: warm-up")
    fused_pass(model, groups, batches[:1], T)
    dog.running("scoring: accumulators on the device")
    out["device"], ref = scoring_run(setup, model, groups, batches, T)
    base = out["device"]["seconds"]
    for name, memory in (("accumulate_on_cpu", {"accumulate_on": "cpu"}), ("score_passes_2", {"passes": 2})):
        why = budget.step(base * OPTION_COST[name], f"{OPTION_COST[name]}x the default's {base:.1f} s")
        if why:
            res["skipped"][f"scoring/{name}"] = why
            continue
        dog.running(f"scoring: {name}")
        try:
            out[name], scores = scoring_run(setup, model, groups, batches, T, **memory)
        except Exception as e:  # an option's failure must not cost the other figures
            res["skipped"][f"scoring/{name}"] = failure(e)
            continue
        out[name]["max_rel_diff_vs_device"] = rel_diff(scores, ref, kinds)["max_rel_diff_group_scale"]
        del scores
    big = args.samples_large
    scale = big / n
    why = budget.step((base + t_collate) * scale, f"{n} samples took {base:.1f} s + {t_collate:.1f} s collation")
    if why:
        res["skipped"]["scoring/device_large"] = why
    else:
        dog.running(f"scoring: accumulators on the device, {big} samples")
        large = C.make_batches(collate, big, bs, group_by_length=True)
        out["device_large"], _ = scoring_run(setup, model, groups, large, T)
        del large
    return out


def section_generation(setup, args, model, processor, dog: Watchdog) -> dict:
    from bench_inference import measure, pruned_copy

    from ukmp.models.blip2 import count_parameters

    dog.running("generation: pruning a copy")
    pruned, plan = pruned_copy(model, args.ratio)
    n_dense, n_pruned = count_parameters(model), count_parameters(pruned)
    inputs = C.to_device(C.generation_inputs(model, processor, args.gen_batch, seed=args.seed), setup.device,
                         setup.dtype)
    dog.running("generation: dense vs pruned")
    r = measure({"dense": model, "pruned": pruned}, inputs, args.new_tokens, args.repeats, setup.device)
    del pruned
    for k in ("dense", "pruned"):
        r[k]["prefill_ms"] = r[k]["prefill_s"] * 1000
        r[k]["ms_per_token"] = r[k]["generate_s"] * 1000 / max(r[k]["new_tokens_per_row"], 1)
    return {"batch_size": args.gen_batch, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "decoding": "greedy, min_new_tokens = max_new_tokens", **r,
            "throughput_speedup": r["pruned"]["tokens_per_s"] / r["dense"]["tokens_per_s"],
            "prefill_speedup": r["dense"]["prefill_s"] / r["pruned"]["prefill_s"],
            "plan": "quick magnitude plan (bench_inference.pruned_copy)", "target_ratio": args.ratio,
            "params_dense": n_dense, "params_pruned": n_pruned, "achieved_ratio": (n_dense - n_pruned) / n_dense}


def section_distill(setup, args, model, processor, dog: Watchdog, gpu: str | None) -> dict:
    from bench_distill import build_pair, run_stage

    from ukmp.recover.schedule import build_schedule

    dog.running("distill: building the student")
    teacher, student, _, _, named = build_pair(setup, args.ratio, args.seed, 8, 8, teacher=model, processor=processor)
    stage = build_schedule(student.config)[6]  # sub-stage 7: CE + KL on the logits
    n = args.distill_batch * (1 + args.distill_steps + 1)  # warm-up, timed, counted
    batches = C.make_batches(C.calibration_collator(teacher, processor, n, seed=args.seed), n, args.distill_batch)
    dog.running("distill: LPD steps")
    r = run_stage(setup, teacher, student, named, stage, batches, 1, setup.cuda)
    peak, source = peak_tflops(gpu, args.peak_tflops)
    r.update({"mfu": r["achieved_tflops"] / peak, "peak_tflops": peak, "peak_tflops_source": source,
              "peak_gib": r["peak_memory"]["peak_bytes"] / C.GIB, "autocast_bf16": setup.cuda,
              "trainable_parameters": sum(p.numel() for p in named.values()), "timed_steps": args.distill_steps})
    del student, named
    return r


# ---------------------------------------------------------------------------------------------------- main
def parse(argv: list[str] | None):
    p = C.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny config in fp32 on the CPU (the test suite's mode)")
    for k, (gpu, tiny) in DEFAULTS.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=type(gpu), default=None, help=f"default {gpu} (tiny: {tiny})")
    p.add_argument("--threshold", type=float, default=0.4, help="token-selection T of the Taylor loss")
    p.add_argument("--ratio", type=float, default=0.5, help="pruning ratio of the generation / distillation student")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak for MFU (default: by GPU name)")
    p.add_argument("--name", default=None, help="results file stem (default gpu_check, tiny: gpu_check_tiny)")
    args = p.parse_args(argv)
    if args.tiny:
        args.device = "cpu" if args.device == "auto" else args.device
        args.config, args.dtype = args.config or "tiny", args.dtype or "float32"
    for k, (gpu, tiny) in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, tiny if args.tiny else gpu)
        if getattr(args, k) <= 0:
            p.error(f"--{k.replace('_', '-')}: must be positive")
    if args.samples_large < args.samples:
        p.error("--samples-large: must be at least --samples")
    args.out = args.out or os.environ.get("OUT") or str(C.RESULTS_DIR / "gpu")
    args.name = args.name or ("gpu_check_tiny" if args.tiny else "gpu_check")
    return args


def print_summary(res: dict[str, Any]) -> None:
    figs = figures(res)
    C.print_table(f"gpu_check: {res['setup']['config']} ({res['setup']['dtype']}) on {res['gpu'] or 'CPU'}",
                  ["figure", "value"], [[name, figs[name]] for name, _ in FIGURES])
    for what, why in res["skipped"].items():
        print(f"  {what}: {why}")


def main(argv: list[str] | None = None, exit_fn: Callable[[int], None] = os._exit, t0: float | None = None) -> int:
    """``exit_fn``: what the watchdog calls after writing the JSON at the total limit (tests pass a no-op);
    ``t0``: ``time.monotonic()`` when the total limit started (the script: its start, imports included; else now)."""
    args = parse(argv)
    budget = Budget(args.total_s, {"scoring": args.scoring_s, "generation": args.generation_s,
                                   "distill": args.distill_s}, t0=t0)
    setup = C.resolve_setup(args)
    path = Path(args.out) / f"{args.name}.json"
    machine = C.machine_info(setup.device)
    res: dict[str, Any] = {
        "benchmark": "gpu_check", "mode": "tiny" if args.tiny else "full", "machine": machine,
        "gpu": machine.get("gpu"), "date_utc": machine["date_utc"], "command": " ".join(sys.argv),
        "setup": {"config": setup.config, "dtype": str(setup.dtype).replace("torch.", ""), "device": str(setup.device)},
        "budget_s": {"total": args.total_s, **budget.sections}, "skipped": {},
    }

    def on_expire(step: str) -> None:
        res["skipped"]["watchdog"] = f"stopped at the total limit of {args.total_s:.0f} s during: {step}"
        print(f"\n{res['skipped']['watchdog']}", flush=True)
        for _ in range(3):  # the main thread may be changing ``res`` right now: try again
            try:
                write_json(path, copy.deepcopy(res))
                return
            except RuntimeError:
                time.sleep(0.2)

    with Watchdog(budget.left(), on_expire, exit_fn) as dog:
        print(f"gpu_check: {setup.config} on {setup.device} ({res['gpu'] or 'no GPU'}), total budget "
              f"{args.total_s:.0f} s; writing {path}", flush=True)
        dog.running("loading the model")
        t, (model, processor) = C.timed(lambda: C.load_bench_model(setup, args.seed), setup.device)
        res["load"] = {"seconds": t}
        res["setup"]["n_parameters"] = sum(p.numel() for p in model.parameters())
        write_json(path, res)
        runs = (("scoring", lambda: section_scoring(setup, args, model, processor, budget, dog, res)),
                ("generation", lambda: section_generation(setup, args, model, processor, dog)),
                ("distill", lambda: section_distill(setup, args, model, processor, dog, res["gpu"])))
        for name, fn in runs:
            why = budget.start(name)
            if why:
                res["skipped"][name] = why
            else:
                try:
                    t, res[name] = C.timed(fn, setup.device)
                except Exception as e:  # one section's failure must not cost the others' figures
                    res["skipped"][name] = failure(e)
                else:
                    res[name]["section_seconds"] = t
                    print(f"  {name}: {t:.1f} s (budget {budget.sections[name]:.0f} s)", flush=True)
            gc.collect()
            if setup.cuda:
                torch.cuda.empty_cache()
            res["elapsed_s"] = budget.elapsed()
            write_json(path, res)
        dog.running("writing the results")
        res["machine"]["load_average_at_end"] = list(os.getloadavg())
        write_json(path, res)
    print_summary(res)
    print(f"\nwrote {path}")
    return 1 if any(why.startswith("failed") for why in res["skipped"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main(t0=T_START))
