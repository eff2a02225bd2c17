"""Distillation step throughput: one LPD optimizer step of a WR-LoRA student against the dense teacher.

Set-up: a random-weight dense model is the teacher; a copy pruned with a quick plan (magnitude scores through the
UKMP allocator at ``--ratio``) and injected with WR-LoRA on every ViT/T5 block Linear (``inject_wr_lora_``, r = r_recall
= 8) is the student. One step is what ``ukmp.recover.train.train_lpd`` does per micro-batch: teacher forward (no grad)
with feature taps, student forward through ``LPDObjective`` (``lpd_loss``), backward, AdamW step over the LoRA factors.
Measured for sub-stage 7 (CE + KL on the logits) and sub-stage 6 (normalised MSE on every supervised ViT, encoder and
decoder block of Table A).

Reported per sub-stage: median step seconds, samples/s, peak memory, trainable parameters, and the model FLOPs
utilisation on CUDA: FLOPs of one step are *counted* with ``torch.utils.flop_counter.FlopCounterMode`` (every matmul,
convolution and attention kernel of the teacher forward, student forward and backward) rather than 6*N*tokens: the base
weights are frozen (no weight-gradient matmuls), the teacher only runs forward, and the ViT / Q-Former / T5 parts see
different token counts, so 6*N*tokens would overstate the work. MFU = counted FLOPs / step seconds / bf16 dense peak
(989 TFLOP/s for an H100 SXM; ``--peak-tflops`` to change). Run with ``--help`` for the options.
"""

from __future__ import annotations

import copy
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402

TARGET_MFU = 0.35


def build_pair(setup: C.Setup, ratio: float, seed: int, r: int, r_recall: int, teacher=None, processor=None):
    """(teacher, student with WR-LoRA, processor, plan, trainable parameter dict). ``teacher`` and ``processor``:
    an already loaded dense model (from :func:`_common.load_bench_model`) to use instead of loading one."""
    from ukmp.models import adapter_for
    from ukmp.recover.train import disable_dropout_
    from ukmp.recover.wr_lora import inject_wr_lora_, named_lora_parameters

    if teacher is None:
        teacher, processor = C.load_bench_model(setup, seed)
    plan = C.magnitude_plan(teacher, ratio)
    student = copy.deepcopy(teacher)
    adapter = adapter_for(student)
    removed = adapter.apply_(student, plan)
    inject_wr_lora_(student, removed, adapter.lora_targets(), r=r, r_recall=r_recall, alpha=16.0, dropout=0.05)
    del removed
    disable_dropout_(student)
    disable_dropout_(teacher)
    teacher.requires_grad_(False).eval()
    student.train()
    return teacher, student, processor, plan, named_lora_parameters(student)


def run_stage(setup: C.Setup, teacher, student, named, stage, batches, warmup: int, autocast: bool) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    from ukmp.recover.schedule import FeatureTaps
    from ukmp.recover.train import LPDObjective, param_groups

    objective = LPDObjective(student)
    s_taps = FeatureTaps(student, stage.tapped_layers())
    t_taps = FeatureTaps(teacher, stage.tapped_layers())
    objective.set_stage(stage, s_taps)
    opt = torch.optim.AdamW(param_groups(named, 0.05), lr=2e-5, weight_decay=0.05)
    amp = (lambda: torch.autocast(setup.device.type, dtype=torch.bfloat16)) if autocast else nullcontext
    parts_log: list[dict[str, float]] = []

    def step(batch: dict[str, torch.Tensor]) -> None:
        with torch.no_grad(), amp():
            t_logits = teacher(**batch).logits
        t_feats = dict(t_taps.feats)
        t_taps.clear()
        with amp():
            loss, parts = objective(batch, t_feats, t_logits)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        parts_log.append(parts)

    dev_batches = [C.to_device(b, setup.device, setup.dtype) for b in batches]
    for b in dev_batches[:warmup]:
        step(b)
    timed = dev_batches[warmup:-1]
    times = []
    with C.PeakMemory(setup.device) as mem:
        for b in timed:
            times.append(C.timed(lambda b=b: step(b), setup.device)[0])
    with FlopCounterMode(display=False) as counter:  # one more step, counted, not timed
        step(dev_batches[-1])
    flops = int(counter.get_total_flops())
    s_taps.remove()
    t_taps.remove()
    bs = int(batches[0]["input_ids"].shape[0])
    med = statistics.median(times)
    res = {
        "sub_stage": stage.index + 1, "losses": "CE + KL" if stage.use_kl else "MSE", "batch_size": bs,
        "mse_layers": {k: list(v) for k, v in stage.mse_layers.items()}, "use_task": stage.use_task,
        "use_kl": stage.use_kl, "step_s_median": med, "step_s_all": times, "samples_per_s": bs / med,
        "peak_memory": mem.to_dict(), "flops_per_step_counted": flops, "achieved_tflops": flops / med / 1e12,
        "loss_parts_last": parts_log[-1],
        "tokens_per_batch": {"encoder": int(batches[0]["input_ids"].numel()),
                             "decoder": int(batches[0]["labels"].numel())},
    }
    return res


def figure(res: dict[str, Any]):
    fig, (a1, a2) = C.new_figure(2)
    rows = res["stages"]
    labels = [f"sub-stage {r['sub_stage']}\n({r['losses']})" for r in rows]
    a1.bar(labels, [r["step_s_median"] for r in rows], color="#37a")
    a1.set_ylabel("seconds per optimizer step (median)")
    a1.set_title(f"LPD step, batch {rows[0]['batch_size']}")
    a2.bar(labels, [r["samples_per_s"] for r in rows], color="#3a7")
    a2.set_ylabel("samples / s")
    for i, r in enumerate(rows):
        note = f"MFU {r['mfu']:.1%}" if r.get("mfu") is not None else f"{r['achieved_tflops'] * 1000:.0f} GFLOP/s"
        a2.text(i, r["samples_per_s"], note, ha="center", va="bottom")
    a2.set_title("throughput (counted FLOPs rate above bars)")
    fig.suptitle(f"WR-LoRA distillation - {res['setup']['config']} on {res['machine']['device']}, "
                 f"{res['trainable_parameters']:,} trainable parameters")
    return fig


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=None, help="samples per step (default: 16 on CUDA, 8 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per sub-stage (default: 10 CUDA, 5 CPU)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    p.add_argument("--ratio", type=float, default=0.5, help="pruning ratio of the student's quick plan")
    p.add_argument("--sub-stages", default="7,6", help="1-based Table A sub-stages to measure")
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--r-recall", type=int, default=8, help="rank of the recall branches")
    p.add_argument("--no-autocast", action="store_true", help="on CUDA, skip bf16 autocast (factors stay fp32)")
    p.add_argument("--peak-tflops", type=float, default=C.H100_BF16_DENSE_TFLOPS,
                   help="bf16 dense peak of the GPU for MFU")
    p.add_argument("--name", default="bench_distill", help="results file stem")
    args = p.parse_args(argv)
    setup = C.resolve_setup(args)
    bs = args.batch_size or (16 if setup.cuda else 8)
    steps = args.steps or (10 if setup.cuda else 5)
    autocast = setup.cuda and not args.no_autocast

    from ukmp.models.blip2 import count_parameters
    from ukmp.recover.schedule import build_schedule

    machine = C.machine_info(setup.device)
    print(f"bench_distill: {setup.config} ({str(setup.dtype).replace('torch.', '')}{', bf16 autocast' * autocast}) "
          f"on {setup.device}; CPU {machine['cpu_model']} x{machine['cpu_cores']}, torch {machine['torch']}, "
          f"load {machine['load_average_at_start']}", flush=True)
    teacher, student, processor, plan, named = build_pair(setup, args.ratio, args.seed, args.r, args.r_recall)
    n_trainable = sum(p.numel() for p in named.values())
    stages = build_schedule(student.config)
    collate = C.calibration_collator(teacher, processor, bs * (args.warmup + steps + 1), seed=args.seed)
    batches = C.make_batches(collate, bs * (args.warmup + steps + 1), bs)
    rows = []
    for sub in [int(x) for x in args.sub_stages.split(",")]:
        if not 1 <= sub <= len(stages):
            raise ValueError(f"--sub-stages: {sub} is not in 1..{len(stages)}")
        r = run_stage(setup, teacher, student, named, stages[sub - 1], batches, args.warmup, autocast)
        r["mfu"] = r["achieved_tflops"] / args.peak_tflops if setup.cuda else None
        rows.append(r)
        print(f"  sub-stage {sub}: {r['step_s_median']:.2f} s/step, {r['samples_per_s']:.2f} samples/s", flush=True)
    C.print_table(f"LPD step (batch {bs}, median of {steps}; {n_trainable:,} trainable LoRA parameters)",
                  ["sub-stage", "losses", "s/step", "samples/s", "peak mem MiB", "GFLOP/step", "TFLOP/s", "MFU"],
                  [[r["sub_stage"], r["losses"], r["step_s_median"], r["samples_per_s"],
                    r["peak_memory"]["peak_bytes"] / C.MIB, r["flops_per_step_counted"] / 1e9, r["achieved_tflops"],
                    f"{r['mfu']:.1%}" if r["mfu"] is not None else None] for r in rows])
    print("peak mem: " + ("torch.cuda.max_memory_allocated (both models resident)" if setup.cuda else
                          "process RSS sampled during the timed steps (both models resident)"))
    missing: list[str] = []
    if not setup.cuda:
        missing.append(f"GPU: step time, samples/s, peak memory and MFU on blip2-flan-t5-xl bf16 (target >= "
                       f"{TARGET_MFU:.0%} of the {args.peak_tflops:g} TFLOP/s bf16 dense peak) (no CUDA device)")
    elif setup.config != "blip2-flan-t5-xl":
        missing.append("GPU MFU target: this run used a smaller config")
    res = {"benchmark": "bench_distill", "machine": machine, "command": " ".join(sys.argv),
           "setup": {"config": setup.config, "dtype": str(setup.dtype), "device": str(setup.device),
                     "autocast_bf16": autocast, "r": args.r, "r_recall": args.r_recall},
           "plan": {"source": "magnitude scores + ukmp.prune.allocate.allocate", "target_ratio": args.ratio,
                    "params_teacher": count_parameters(teacher)},
           "trainable_parameters": n_trainable, "stages": rows, "peak_tflops": args.peak_tflops,
           "target_mfu": TARGET_MFU, "flops_method": "torch.utils.flop_counter.FlopCounterMode over one full step "
                                                     "(teacher fwd + student fwd + bwd; optimizer excluded)",
           "missing": missing}
    return C.finish(setup, args.name, res, missing, figure)


if __name__ == "__main__":
    raise SystemExit(main())
