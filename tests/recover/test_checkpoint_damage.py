"""A damaged recovery checkpoint is reported with its file and training falls back to the previous good one (or
starts afresh), then completes exactly as an uninterrupted run."""

from __future__ import annotations

import logging

import pytest
import torch
from lpd_setup import loader_factory, student_teacher
from safetensors.torch import load_file

from ukmp.recover import checkpoint as ckpt
from ukmp.recover.schedule import ScheduleConfig
from ukmp.recover.train import TrainConfig, train_lpd

CFG = TrainConfig(lr=1e-3, warmup_steps=1, batch_size=2, max_steps_per_stage=3, checkpoint_every=1,
                  keep_checkpoints=2, stages=(0,), schedule=ScheduleConfig(sample_scale=4e-4))


class _Kill(Exception):
    pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The adapter of an uninterrupted run."""
    return _train(tmp_path_factory.mktemp("clean"))


def _train(out, stop_at: int | None = None):
    torch.manual_seed(0)
    student, teacher = student_teacher(seed=0, dropout=0.05)

    def on_step(info):
        if stop_at is not None and info["global_step"] == stop_at:
            raise _Kill

    res = train_lpd(student, teacher, loader_factory(student.config, 2), CFG, out, on_step=on_step)
    return load_file(str(res.adapter_path)), res.global_step


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.integration
@pytest.mark.parametrize("damage", ["truncated_adapter", "bad_state"])
def test_damaged_latest_checkpoint_falls_back_and_completes(tmp_path, caplog, damage, reference):
    reference, steps = reference
    out = tmp_path / "run"
    with pytest.raises(_Kill):
        _train(out, stop_at=2)  # checkpoints step-1 and step-2 are on disk
    root = ckpt.checkpoint_root(out)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000001", "step-00000002"]
    latest = root / "step-00000002"
    bad = {"truncated_adapter": latest / "adapter.safetensors", "bad_state": latest / "state.json"}[damage]
    _truncate(bad) if damage == "truncated_adapter" else bad.write_text("{not json")
    (root / ckpt.LATEST).write_text("[1,")  # a damaged pointer too: the step directories are scanned
    (root / ".step-00000003.tmp").mkdir()  # a save interrupted by a kill
    with caplog.at_level(logging.WARNING, logger="ukmp.recover.checkpoint"):
        resumed, n = _train(out)
    assert n == steps == 3
    assert all(torch.equal(resumed[k], v) for k, v in reference.items())  # exact, as if never interrupted
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and all("\n" not in w for w in warnings)
    assert any(bad.name in w for w in warnings), warnings
    assert not list(root.glob(".*.tmp"))


@pytest.mark.integration
def test_no_readable_checkpoint_starts_afresh(tmp_path, caplog, reference):
    reference, _ = reference
    out = tmp_path / "run"
    with pytest.raises(_Kill):
        _train(out, stop_at=2)
    for d in ckpt.checkpoint_root(out).glob("step-*"):
        _truncate(d / "adapter.safetensors")
    with caplog.at_level(logging.WARNING, logger="ukmp.recover.checkpoint"):
        assert ckpt.resume_point(out, 0, torch.device("cpu")) is None  # both damaged: nothing to resume from
        resumed, n = _train(out)
    assert n == 3 and all(torch.equal(resumed[k], v) for k, v in reference.items())
    assert any("starts afresh" in r.getMessage() for r in caplog.records)
