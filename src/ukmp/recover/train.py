"""The LPD training loop on HF accelerate: one code path for 1 CPU process, 1 GPU or several DDP processes.

Per sub-stage (Table A, :mod:`ukmp.recover.schedule`): a fresh AdamW over the LoRA factors only, linear warm-up from
``lr * warmup_start_factor`` then constant (or cosine), teacher and student forward on the same batch, the stage's
loss (:func:`ukmp.recover.losses.lpd_loss`), gradient accumulation, atomic checkpoints every ``checkpoint_every``
optimizer steps and exact resume from the latest one.

Data: ``make_loader(stage_index, n_samples, seed)`` returns a DataLoader of *per-process* micro-batches of size
``cfg.batch_size`` whose order depends only on its arguments; ``seed`` is derived from ``(cfg.seed, stage, epoch)``.
accelerate shards it (process p gets micro-batches p, p+P, …), so one optimizer step sees
``batch_size * grad_accum * num_processes`` samples. Every loss is computed per micro-batch, so 1 process with
``grad_accum = P`` matches P processes with ``grad_accum = 1`` (up to float summation order).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ukmp.data.batches import prefetched
from ukmp.io import atomic_write_json
from ukmp.models import forward_inputs
import ukmp.recover.checkpoint as ckpt
from ukmp.recover.losses import lpd_loss
from ukmp.recover.schedule import FeatureTaps, ScheduleConfig, Stage, build_schedule
from ukmp.recover.wr_lora import WRLoRALinear, adapter_state_dict, load_adapter_state_dict_, named_lora_parameters
from ukmp.recover.wr_lora import save_adapter

_log = logging.getLogger(__name__)

BATCH_KEYS = ("pixel_values", "input_ids", "attention_mask", "labels", "decoder_attention_mask",
              "qformer_input_ids", "qformer_attention_mask",  # InstructBLIP's Q-Former prompt
              "image_sizes")  # the real size of each padded image (BatchLayout.native_resolution)
PRECISIONS = ("no", "bf16")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    lr: float = 2e-5
    warmup_steps: int = 50
    warmup_start_factor: float = 1.0 / 40  # LAVIS: 5e-7 -> 2e-5
    lr_schedule: str = "constant"  # "cosine": from lr to min_lr over the rest of each sub-stage
    min_lr: float = 2.5e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.05  # on parameters with ndim >= 2 only
    batch_size: int = 20  # per-process micro-batch (the caller's loader batch size)
    grad_accum: int = 1
    max_steps_per_stage: int | None = None
    epochs_per_stage: int = 1
    checkpoint_every: int = 500  # optimizer steps; a checkpoint is also written at the end of every sub-stage
    keep_checkpoints: int = 2
    seed: int = 0
    mixed_precision: str = "no"
    teacher_dtype: str | None = None  # None: the student's dtype; "bf16"
    max_grad_norm: float | None = None
    stages: tuple[int, ...] | None = None  # 0-based sub-stage indices to run (default: all seven)
    resume: bool = True
    prefetch: int = 2  # micro-batches collated ahead in a background thread (0: inline); the batches are the same
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"train.mixed_precision: unknown value {self.mixed_precision!r} "
                             f"(choose from {PRECISIONS})")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"train.lr_schedule: unknown value {self.lr_schedule!r} (choose from {LR_SCHEDULES})")
        if self.teacher_dtype not in (None, "bf16"):
            raise ValueError(f"train.teacher_dtype: must be null or 'bf16', got {self.teacher_dtype!r}")
        if int(self.prefetch) < 0:
            raise ValueError(f"train.prefetch: must be >= 0, got {self.prefetch}")
        for name in ("batch_size", "grad_accum", "checkpoint_every", "epochs_per_stage"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or not 0 < self.warmup_start_factor <= 1:
            raise ValueError("train.warmup_steps / warmup_start_factor: need steps >= 0 and 0 < factor <= 1")


@dataclass
class TrainResult:
    adapter_path: Path
    log_path: Path
    plot_path: Path
    global_step: int


# -------------------------------------------------------------------------------------------- pure pieces
def lr_factor(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Multiplier of ``cfg.lr`` before optimizer step ``step`` (0-based) of a sub-stage of ``total_steps``."""
    w = cfg.warmup_steps
    if step < w:
        return cfg.warmup_start_factor + (1.0 - cfg.warmup_start_factor) * step / w
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, total_steps - w)
    t = min(1.0, (step - w) / span)
    floor = cfg.min_lr / cfg.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def param_groups(named: dict[str, nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in named.values() if p.ndim >= 2]
    no_decay = [p for p in named.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def derive_seed(seed: int, stage: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + stage * 10_007 + epoch) % (2**31 - 1)


def disable_dropout_(model: nn.Module) -> None:
    """Set every backbone dropout to 0 (nn.Dropout modules and float ``dropout`` / ``attention_dropout`` attributes),
    leaving LoRA dropout (inside WR-LoRA and peft LoRA layers) untouched."""
    lora_owned: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, WRLoRALinear) or name.endswith("lora_dropout"):
            lora_owned |= {id(x) for x in m.modules()}
    for m in model.modules():
        if id(m) in lora_owned:
            continue
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in ("dropout", "attention_dropout", "dropout_rate"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


def loss_terms(log: list[dict[str, Any]]) -> list[str]:
    """The loss terms logged (``mse_<family>``, ``ce``, ``kl`` ...), in order of first use; ``["loss"]`` if none."""
    terms: list[str] = []
    for e in log:
        terms += [k for k in e.get("parts_rank0", {}) if k != "loss" and k not in terms]
    return terms or ["loss"]


def save_loss_plot(log: list[dict[str, Any]], path: Path) -> None:
    """One panel per loss term (MSE sub-stages run at another scale than CE and KL), x = optimizer step, one
    colour per sub-stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = loss_terms(log)
    cols = min(3, len(terms))
    rows = math.ceil(len(terms) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, term in zip(axes.flat, terms):
        vals = []
        for stage in sorted({e["stage"] for e in log}):
            pts = [(e["global_step"], e["loss"] if term == "loss" else e["parts_rank0"][term])
                   for e in log if e["stage"] == stage and (term == "loss" or term in e.get("parts_rank0", {}))]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"sub-stage {stage + 1}",
                        color=f"C{stage % 10}")  # a sub-stage keeps its colour in every panel
                vals += [p[1] for p in pts]
        ax.set_title(term)
        ax.set_xlabel("optimizer step")
        if vals and min(vals) > 0:
            ax.set_yscale("log")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(terms):]:
        ax.axis("off")
    fig.suptitle("recovery loss terms (" + ", ".join(terms) + ")", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------- the loop
class LPDObjective(nn.Module):
    """The module that DDP wraps: student forward + the sub-stage loss, returning the loss itself.

    DDP finds the parameters that take no part in the loss by walking the graph back from what ``forward`` returns;
    returning the loss (not the logits) is what lets LoRA factors downstream of every supervised feature stay
    untouched (no gradient at all) in the MSE sub-stages, on one process or many.
    """

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student
        self.stage: Stage | None = None
        self.taps: FeatureTaps | None = None

    def set_stage(self, stage: Stage, taps: FeatureTaps) -> None:
        self.stage, self.taps = stage, taps

    def forward(self, batch: dict[str, torch.Tensor], teacher_feats: dict[str, torch.Tensor],
                teacher_logits: torch.Tensor):
        if self.stage is None or self.taps is None:
            raise ValueError("LPDObjective: call set_stage before the forward pass")
        out = self.student(**forward_inputs(self.student, batch))
        st = self.stage
        ce = out.loss
        if ce is None and st.use_task:  # decoder-only: labels are aligned with the logits, not passed to the model
            ce = F.cross_entropy(out.logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        loss, parts = lpd_loss(self.taps.feats, teacher_feats, st.mse_layers, use_task=st.use_task, use_kl=st.use_kl,
                               ce=ce, student_logits=out.logits, teacher_logits=teacher_logits)
        self.taps.clear()
        return loss, parts


class _Run:
    """State of one ``train_lpd`` call (kept small: the loop itself reads top to bottom in :func:`train_lpd`)."""

    def __init__(self, acc, model, student, teacher, cfg: TrainConfig, out_dir: Path, stages: list[Stage]):
        self.acc, self.model, self.student, self.teacher = acc, model, student, teacher
        self.cfg, self.out_dir, self.stages = cfg, out_dir, stages
        self.log: list[dict[str, Any]] = []

    def step_loss(self, batch: dict[str, torch.Tensor], t_taps: FeatureTaps):
        batch = {k: v for k, v in batch.items() if k in BATCH_KEYS}
        with torch.no_grad(), self.acc.autocast():
            t_logits = self.teacher(**forward_inputs(self.teacher, batch)).logits
        t_feats = dict(t_taps.feats)
        t_taps.clear()
        return self.model(batch, t_feats, t_logits)

    def save(self, opt, sched, position: dict[str, Any]) -> None:
        acc = self.acc
        name = f"step-{position['global_step']:08d}"
        if acc.is_main_process:
            ckpt.prepare_tmp(self.out_dir, name)
        acc.wait_for_everyone()
        tmp = ckpt.tmp_dir(self.out_dir, name)
        ckpt.write_rank_files(tmp, acc.process_index)
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {"position": position, "scheduler": None if sched is None else sched.state_dict(),
                     "log": self.log, "num_processes": acc.num_processes,
                     "stage_indices": [s.index for s in self.stages]}
            ckpt.write_main_files(tmp, adapter_state_dict(self.student), None if opt is None else opt.state_dict(),
                                  state)
            ckpt.publish(self.out_dir, name, self.cfg.keep_checkpoints)
            self.write_log()
        acc.wait_for_everyone()

    def write_log(self) -> None:
        atomic_write_json(self.out_dir / "train_log.json", {
            "config": asdict(self.cfg), "stages": [asdict(s) for s in self.stages], "steps": self.log,
        })


def _iter_rng_neutral(loader):
    """Iterate ``loader`` without consuming the global torch RNG when the iteration starts (DataLoader draws a base
    seed, RandomSampler a shuffle seed, at the first ``next``), so a resumed run continues the exact dropout stream
    of an uninterrupted one."""
    state = torch.get_rng_state()
    it = iter(loader)
    try:
        first = next(it)
    except StopIteration:
        torch.set_rng_state(state)
        return iter(())
    torch.set_rng_state(state)
    return itertools.chain([first], it)


def _new_optimizer(named: dict[str, nn.Parameter], cfg: TrainConfig, total_steps: int):
    opt = torch.optim.AdamW(param_groups(named, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, total_steps))
    return opt, sched


def train_lpd(
    student: nn.Module,
    teacher: nn.Module,
    make_loader: Callable[[int, int | None, int], Any],
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    accelerator=None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Run the LPD sub-stages on a student already injected with (WR-)LoRA; resume from ``out_dir`` if possible."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    # torchrun / `accelerate launch` without GPUs: accelerate only uses gloo DDP when told the run is on CPU
    cpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    acc = accelerator or Accelerator(
        mixed_precision=cfg.mixed_precision, cpu=cpu_ddp,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if acc.mixed_precision not in PRECISIONS:
        raise ValueError(f"accelerator.mixed_precision: {acc.mixed_precision!r} is not supported (use 'no' or 'bf16')")
    out_dir = Path(out_dir)
    named = named_lora_parameters(student)
    if not named:
        raise ValueError("student: no LoRA factors found (call inject_wr_lora_ first)")
    student.requires_grad_(False)
    for p in named.values():
        p.requires_grad_(True)
    disable_dropout_(student)
    disable_dropout_(teacher)
    teacher.requires_grad_(False).eval()
    t_dtype = torch.bfloat16 if cfg.teacher_dtype == "bf16" else next(student.parameters()).dtype
    teacher.to(device=acc.device, dtype=t_dtype)
    student.train()
    objective = LPDObjective(student)
    model = acc.prepare_model(objective)
    stages = build_schedule(student.config, cfg.schedule)
    if cfg.stages is not None:
        bad = [i for i in cfg.stages if not 0 <= i < len(stages)]
        if bad:
            raise ValueError(f"train.stages: indices {bad} out of range [0, {len(stages)})")
        stages = [stages[i] for i in cfg.stages]
    stages = [s for s in stages if s.has_loss]
    run = _Run(acc, model, student, teacher, cfg, out_dir, stages)

    start = {"stage_pos": 0, "epoch": 0, "step_in_epoch": 0, "step_in_stage": 0, "global_step": 0}
    resume_opt = None
    last = ckpt.resume_point(out_dir, acc.process_index, acc.device) if cfg.resume else None
    if last is not None:
        state = last.state
        if state.get("stage_indices") != [s.index for s in stages] or state.get("num_processes") != acc.num_processes:
            raise ValueError(f"{last.path / 'state.json'}: written for sub-stages {state.get('stage_indices')} on "
                             f"{state.get('num_processes')} processes; exact resume needs the same (or a new out_dir)")

        load_adapter_state_dict_(student, last.adapter)
        start = state["position"]
        run.log = list(state["log"])
        if last.optimizer is not None:
            resume_opt = (last.optimizer, state["scheduler"])
        ckpt.set_rng_state(*last.rng)
        if acc.is_main_process:
            _log.info("finetune: resumed from step %d (%s)", start["global_step"], last.path)
    else:
        set_seed(cfg.seed)

    global_step = start["global_step"]
    for pos in range(start["stage_pos"], len(stages)):
        stage = stages[pos]
        fresh = pos != start["stage_pos"]
        epoch0 = 0 if fresh else start["epoch"]
        step = 0 if fresh else start["step_in_stage"]
        skip = 0 if fresh else start["step_in_epoch"]
        loaders = {0: acc.prepare_data_loader(make_loader(stage.index, stage.n_samples,
                                                          derive_seed(cfg.seed, stage.index, 0)))}
        per_epoch = len(loaders[0]) // cfg.grad_accum
        if per_epoch == 0:
            raise ValueError(f"sub-stage {stage.index + 1}: loader has fewer than grad_accum={cfg.grad_accum} batches")
        total = per_epoch * cfg.epochs_per_stage
        if cfg.max_steps_per_stage is not None:
            total = min(total, int(cfg.max_steps_per_stage))
        opt, sched = _new_optimizer(named, cfg, total)
        if resume_opt is not None and not fresh:
            opt.load_state_dict(resume_opt[0])
            sched.load_state_dict(resume_opt[1])
        s_taps = FeatureTaps(student, stage.tapped_layers())
        t_taps = FeatureTaps(teacher, stage.tapped_layers())
        objective.set_stage(stage, s_taps)
        bar = tqdm(total=total, initial=step, desc=f"LPD {stage.index + 1}/7", disable=not acc.is_main_process)
        for epoch in range(epoch0, cfg.epochs_per_stage):
            if step >= total:
                break
            loader = loaders[epoch] if epoch in loaders else acc.prepare_data_loader(
                make_loader(stage.index, stage.n_samples, derive_seed(cfg.seed, stage.index, epoch)))
            if epoch == epoch0 and skip:
                loader = acc.skip_first_batches(loader, skip * cfg.grad_accum)
            it = prefetched(_iter_rng_neutral(loader), cfg.prefetch)
            in_epoch = skip if epoch == epoch0 else 0
            while in_epoch < per_epoch and step < total:
                running = torch.zeros((), device=acc.device)
                parts_sum: dict[str, float] = {}
                for micro in range(cfg.grad_accum):
                    batch = next(it)
                    sync = nullcontext() if micro == cfg.grad_accum - 1 else acc.no_sync(model)
                    with sync:
                        loss, parts = run.step_loss(batch, t_taps)
                        acc.backward(loss / cfg.grad_accum)
                    running += loss.detach().float() / cfg.grad_accum
                    for k, v in parts.items():
                        parts_sum[k] = parts_sum.get(k, 0.0) + v / cfg.grad_accum
                if cfg.max_grad_norm is not None:
                    acc.clip_grad_norm_(list(named.values()), cfg.max_grad_norm)
                lr = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step, in_epoch, global_step = step + 1, in_epoch + 1, global_step + 1
                mean_loss = float(acc.reduce(running, reduction="mean"))
                run.log.append({"stage": stage.index, "step": step, "global_step": global_step, "lr": lr,
                                "loss": mean_loss, "parts_rank0": parts_sum})
                bar.update(1)
                bar.set_postfix(loss=f"{mean_loss:.4g}", lr=f"{lr:.2e}")
                done = step >= total
                if done or step % cfg.checkpoint_every == 0:
                    if done:
                        position = {"stage_pos": pos + 1, "epoch": 0, "step_in_epoch": 0, "step_in_stage": 0,
                                    "global_step": global_step}
                        run.save(None, None, position)
                    else:
                        position = {"stage_pos": pos, "epoch": epoch if in_epoch < per_epoch else epoch + 1,
                                    "step_in_epoch": in_epoch % per_epoch, "step_in_stage": step,
                                    "global_step": global_step}
                        run.save(opt, sched, position)
                if on_step is not None:
                    on_step({"stage": stage.index, "step": step, "global_step": global_step, "loss": mean_loss})
            skip = 0
        bar.close()
        s_taps.remove()
        t_taps.remove()

    adapter_path, log_path = out_dir / "adapter.safetensors", out_dir / "train_log.json"
    plot_path = out_dir / "loss.png"
    if acc.is_main_process:
        save_adapter(student, adapter_path)
        run.write_log()
        save_loss_plot(run.log, plot_path)
    acc.wait_for_everyone()
    return TrainResult(adapter_path, log_path, plot_path, global_step)
