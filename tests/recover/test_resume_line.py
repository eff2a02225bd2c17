"""A finetune that resumes says so, with the step, in one log line."""

from __future__ import annotations

import logging

from lpd_setup import loader_factory, student_teacher

from ukmp.recover.schedule import ScheduleConfig
from ukmp.recover.train import TrainConfig, train_lpd


def test_resume_logs_one_line_with_the_step(tmp_path, caplog):
    student, teacher = student_teacher(seed=0, dropout=0.0)
    cfg = TrainConfig(lr=1e-3, warmup_steps=1, batch_size=2, max_steps_per_stage=3, checkpoint_every=2,
                      stages=(0,), schedule=ScheduleConfig(sample_scale=4e-4))
    with caplog.at_level(logging.INFO, logger="ukmp.recover.train"):
        train_lpd(student, teacher, loader_factory(student.config, 2), cfg, tmp_path)
        assert not [r for r in caplog.records if "resumed" in r.getMessage()]  # a fresh start says nothing
        train_lpd(student, teacher, loader_factory(student.config, 2), cfg, tmp_path)
    lines = [r.getMessage() for r in caplog.records if "resumed" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("finetune: resumed from step 3 ")
