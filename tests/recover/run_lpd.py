"""Train LPD on a tiny pruned BLIP-2 (used by test_train.py in subprocesses; also runs under torchrun).

    python tests/recover/run_lpd.py OUT_DIR [--kill-at STEP] [--grad-accum N] [--batch B] [--dropout P]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from lpd_setup import loader_factory, student_teacher  # noqa: E402

from ukmp.recover.schedule import ScheduleConfig  # noqa: E402
from ukmp.recover.train import TrainConfig, train_lpd  # noqa: E402

SAMPLE_SCALE = 2e-4  # Table A counts 20K.. -> 4, 4, 16, 8, 16, 16 samples; the rest: 8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--kill-at", type=int, default=None)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--checkpoint-every", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the student, bf16 teacher")
    ap.add_argument("--prefetch", type=int, default=2, help="micro-batches collated ahead (0: inline)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    student, teacher = student_teacher(seed=0, dropout=args.dropout)
    cfg = TrainConfig(lr=args.lr, warmup_steps=2, batch_size=args.batch, grad_accum=args.grad_accum,
                      checkpoint_every=args.checkpoint_every, seed=args.seed, prefetch=args.prefetch,
                      mixed_precision="bf16" if args.bf16 else "no", teacher_dtype="bf16" if args.bf16 else None,
                      schedule=ScheduleConfig(sample_scale=SAMPLE_SCALE))

    def kill(info: dict) -> None:
        if args.kill_at is not None and info["global_step"] == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    train_lpd(student, teacher, loader_factory(student.config, args.batch), cfg, args.out_dir, on_step=kill)


if __name__ == "__main__":
    main()
