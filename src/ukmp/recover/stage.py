"""The finetune stage: WR-LoRA (or plain LoRA) + progressive distillation from the dense teacher, then merge.

The recall branches get their frozen P tensors from the dense teacher and the plan (no removed-weights file is
needed). Training checkpoints live in a work directory outside the stage directory, so a killed run resumes from
its last checkpoint; the stage directory receives the merged, reloadable model at the end. The work directory is
``<run>/finetune.work/<hash of the settings>/``: a run with another knob starts afresh beside an interrupted one,
says so on one log line naming the stranded directories, and deletes only its own once its model is saved.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ukmp.config import RunConfig, hashed_section, section_hash
from ukmp.io import MARKER, atomic_write_json, fingerprint, load_pruned, read_marker, read_plan, save_pruned
from ukmp.models import adapter_for
from ukmp.runtime import is_main_process, load_dense, load_processor, resolve_dataset, resolve_device

log = logging.getLogger(__name__)


class _Indices(Dataset):
    def __init__(self, indices: list[int]):
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> int:
        return self.indices[i]


def stage_slices(n_data: int, counts: list[int | None], seed: int) -> list[list[int]]:
    """Disjoint consecutive slices of one shuffled order, one per sub-stage (Table A's sample indices).

    A count of ``None`` takes the rest of the data. When the data is smaller than the schedule (small runs), the
    order is cycled, so a slice may revisit samples (with different augmentations: the epoch is the sub-stage).
    """
    order = list(range(n_data))
    random.Random(seed).shuffle(order)
    out, pos = [], 0
    for c in counts:
        n = max(0, n_data - pos) if c is None else c
        out.append([order[(pos + k) % n_data] for k in range(n)])
        pos += n
    return out


def _describe(origin: dict[str, Any]) -> str:
    return f"model.source={origin.get('source')!r}, seed {origin.get('seed')}"


def check_teacher_config(origin: dict[str, Any] | None, mc, pruned_dir: Path) -> None:
    """Refuse, before loading anything, a teacher that is visibly not the pruned model's origin: a model built from
    a config (tiny, a shipped name, a .json) with another source or seed. Other sources are compared by
    :func:`ukmp.io.fingerprint` once the teacher is loaded (the same weights may live under another path)."""
    if not origin:
        return
    from ukmp.models.build import SHIPPED_CONFIGS

    def built(source: str) -> bool:
        return source == "tiny" or source in SHIPPED_CONFIGS or source.endswith(".json")

    src = str(origin.get("source", ""))
    if (built(src) or built(mc.source)) and (src, origin.get("seed")) != (mc.source, mc.seed):
        raise ValueError(f"{Path(pruned_dir) / MARKER}: pruned from {_describe(origin)}, but the teacher would be "
                         f"model.source={mc.source!r}, seed {mc.seed}; finetune needs the same dense model")


def train_config(cfg: RunConfig):
    from ukmp.recover.schedule import ScheduleConfig
    from ukmp.recover.train import TrainConfig

    fc = cfg.finetune
    sched = ScheduleConfig(mode=fc.schedule, sample_scale=fc.sample_scale)
    return TrainConfig(
        lr=fc.lr, warmup_steps=fc.warmup_steps, lr_schedule=fc.lr_schedule, weight_decay=fc.weight_decay,
        batch_size=fc.batch_size, grad_accum=fc.grad_accum,
        max_steps_per_stage=fc.max_steps_per_stage or None, checkpoint_every=fc.checkpoint_every, seed=cfg.seed,
        mixed_precision=fc.mixed_precision, schedule=sched,
    )


def report_stale_work(work: Path) -> list[Path]:
    """One log line naming the checkpoint directories beside ``work`` (``finetune.work/<hash>/``): recoveries
    interrupted under other settings, which this run neither resumes nor deletes (it removes only its own, once
    its model is saved); returns them."""
    parent = Path(work).parent
    stale = sorted(p for p in parent.iterdir() if p.is_dir() and p.name != Path(work).name) if parent.is_dir() else []
    if stale and is_main_process():
        size = sum(f.stat().st_size for p in stale for f in p.rglob("*") if f.is_file())
        log.warning("finetune: checkpoints of %d interrupted recover%s with other settings are left in %s (%.1f MB: "
                    "%s); this run does not resume them: delete them when no longer wanted", len(stale),
                    "y" if len(stale) == 1 else "ies", parent, size / 2**20, ", ".join(p.name for p in stale))
    return stale


def run_finetune_stage(cfg: RunConfig, pruned_dir: Path, out: Path, work: Path) -> dict[str, Any]:
    from ukmp.data.batches import dataset_size, make_collator
    from ukmp.data.loaders import load_dataset
    from ukmp.recover.schedule import build_schedule
    from ukmp.recover.train import train_lpd
    from ukmp.recover.wr_lora import inject_wr_lora_, merge_wr_lora_

    fc = cfg.finetune
    device = resolve_device(cfg.model.device)
    if not (Path(pruned_dir) / "plan.json").is_file():
        raise FileNotFoundError(f"{pruned_dir}: no pruned model there; run `ukmp prune CONFIG` first (or give one "
                                "with `ukmp finetune CONFIG --pruned DIR`)")
    plan = read_plan(pruned_dir)
    origin = read_marker(pruned_dir).get("dense_model")
    check_teacher_config(origin, cfg.model, pruned_dir)
    ds = load_dataset(resolve_dataset(cfg.data.finetune, cfg.output_dir))  # bad data fails before the models load
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # checkpoints are only resumable by the same run: key the work directory by everything that shapes training
    work = Path(work) / section_hash(asdict(cfg.model), hashed_section("data", cfg.data), asdict(fc), cfg.seed,
                                     plan.digest(), world)
    report_stale_work(work)
    student = load_pruned(pruned_dir, device=device, dtype=cfg.model.dtype,
                          attn_implementation=cfg.model.attn_implementation)
    processor = load_processor(pruned_dir)
    teacher, _ = load_dense(cfg.model, device)
    if origin and origin.get("fingerprint") and fingerprint(teacher) != origin["fingerprint"]:
        raise ValueError(f"{pruned_dir / MARKER}: the teacher model.source={cfg.model.source!r} (seed "
                         f"{cfg.model.seed}) is not the dense model this was pruned from ({_describe(origin)})")
    teacher.requires_grad_(False)
    adapter = adapter_for(teacher)
    removed = adapter.removed_weights(teacher, plan)
    # the student's own targets: a plan's drop_layers (LLaVA's unused vision layers) leave the student shorter
    trainable = inject_wr_lora_(student, removed, adapter_for(student).lora_targets(), r=fc.r, r_recall=fc.r_recall,
                                alpha=fc.alpha, dropout=fc.dropout, plain_lora=fc.adapter == "lora")
    n_trainable = sum(p.numel() for p in trainable)

    from ukmp.data.prompts import resolve_style
    from ukmp.data.records import TextDataset

    style = ("plain" if isinstance(ds, TextDataset) else
             resolve_style(getattr(ds, "prompt_style", None), processor, teacher.config,
                           f"data.finetune: {cfg.data.finetune}"))
    collate = make_collator(ds, processor, adapter.batch_layout(), cfg.data.image_size or None,
                            cfg.data.max_text_tokens, cfg.data.augment, cfg.seed, prompt_style=style)
    tcfg = train_config(cfg)
    stages = build_schedule(teacher.config, tcfg.schedule)
    counts: list[int | None] = [s.n_samples if s.has_loss else 0 for s in stages]
    if counts[-1] is None and fc.final_stage_samples:
        counts[-1] = fc.final_stage_samples
    slices = stage_slices(dataset_size(ds, collate), counts, cfg.seed)

    def make_loader(stage: int, n_samples: int | None, seed: int) -> DataLoader:
        idx = slices[stage]
        order = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed)).tolist()
        return DataLoader(_Indices([idx[i] for i in order]), batch_size=fc.batch_size, shuffle=False,
                          collate_fn=lambda b, s=stage: collate(b, epoch=2 + s))

    log.info("finetune: %s trainable LoRA parameters, %d sub-stages, %s samples", f"{n_trainable:,}", len(stages),
             [len(s) for s in slices])
    result = train_lpd(student, teacher, make_loader, tcfg, work / "train")
    if not is_main_process():
        return {}
    merge_wr_lora_(student)
    save_pruned(student, plan, out / "model", processor=processor)
    for name in ("train_log.json", "loss.png"):
        src = Path(work) / "train" / name
        if src.is_file():
            shutil.copyfile(src, out / name)
    shutil.rmtree(work, ignore_errors=True)  # the merged model is saved; checkpoints are no longer needed
    try:
        work.parent.rmdir()  # the <stage>.work directory, when no other run's checkpoints are in it
    except OSError:
        pass
    info = {"trainable_params": n_trainable, "global_step": result.global_step,
            "samples_per_stage": [len(s) for s in slices], "adapter": fc.adapter, "schedule": fc.schedule}
    atomic_write_json(out / "summary.json", info)
    return info
