"""The LPD loop: LR schedule, optimizer groups, checkpoint serialisation, stage-1 gradient routing, exact resume after
SIGKILL, and 2-process DDP (gloo on CPU) against 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lpd_setup import loader_factory, student_teacher
from safetensors.torch import load_file

from ukmp.recover import checkpoint as ckpt
from ukmp.recover.schedule import ScheduleConfig
from ukmp.recover.train import TrainConfig, lr_factor, param_groups, train_lpd
from ukmp.recover.wr_lora import adapter_state_dict

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "run_lpd.py"
DDP_TOL = 1e-6  # max |adapter difference| between 2 processes and 1 process with grad accumulation
TOTAL_STEPS = 36  # run_lpd.py: 2 + 2 + 8 + 4 + 8 + 8 + 4 optimizer steps at batch 2


# -------------------------------------------------------------------------------------------- unit
@pytest.mark.unit
def test_lr_warmup_then_constant_or_cosine():
    cfg = TrainConfig()  # lr 2e-5, 50 warm-up steps from lr/40 = 5e-7
    assert abs(lr_factor(0, cfg, 1000) * cfg.lr - 5e-7) <= 1e-15
    assert abs(lr_factor(25, cfg, 1000) - (1 / 40 + (39 / 40) * 0.5)) <= 1e-12
    assert [lr_factor(s, cfg, 1000) for s in (50, 51, 999, 5000)] == [1.0] * 4
    cos = TrainConfig(lr_schedule="cosine")
    assert lr_factor(50, cos, 1000) == 1.0
    assert abs(lr_factor(1000, cos, 1000) * cos.lr - cos.min_lr) <= 1e-15
    assert lr_factor(500, cos, 1000) < 1.0
    with pytest.raises(ValueError, match="train.mixed_precision"):
        TrainConfig(mixed_precision="fp16")
    with pytest.raises(ValueError, match="train.grad_accum"):
        TrainConfig(grad_accum=0)


@pytest.mark.unit
def test_weight_decay_only_on_matrices():
    named = {"a": torch.nn.Parameter(torch.zeros(3, 4)), "b": torch.nn.Parameter(torch.zeros(4))}
    groups = param_groups(named, 0.05)
    assert groups[0]["weight_decay"] == 0.05 and groups[0]["params"] == [named["a"]]
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["params"] == [named["b"]]


@pytest.mark.unit
def test_optimizer_and_rng_state_round_trip_without_pickle(tmp_path):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(2, 2))]
    opt = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05)
    for _ in range(2):
        sum(p.square().sum() for p in ps).backward()
        opt.step()
        opt.zero_grad()
    tmp = ckpt.prepare_tmp(tmp_path, "step-00000001")
    ckpt.write_main_files(tmp, {"x": torch.zeros(1)}, opt.state_dict(), {"position": {}})
    ckpt.write_rank_files(tmp, 0)
    expected_draw = torch.rand(3)
    ckpt.publish(tmp_path, "step-00000001", keep=2)
    last = ckpt.latest_checkpoint(tmp_path)
    state = ckpt.read_state(last)
    ckpt.restore_rng(last, 0)
    assert torch.equal(torch.rand(3), expected_draw)
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = torch.optim.AdamW(ps2, lr=1e-2, weight_decay=0.05)
    opt2.load_state_dict(ckpt.read_optimizer(last, state, torch.device("cpu")))
    for o, group in ((opt, ps), (opt2, ps2)):
        sum(p.square().sum() for p in group).backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(ps, ps2))
    assert not list(tmp_path.glob("checkpoints/.*.tmp"))


# -------------------------------------------------------------------------------------------- in-process loop
@pytest.mark.integration
def test_stage_one_moves_only_lora_upstream_of_supervised_vit_block(tmp_path):
    torch.manual_seed(0)
    student, teacher = student_teacher(seed=0, dropout=0.05)
    before = adapter_state_dict(student)
    cfg = TrainConfig(lr=1e-3, warmup_steps=2, batch_size=2, max_steps_per_stage=3, checkpoint_every=2,
                      stages=(0,), schedule=ScheduleConfig(sample_scale=4e-4))
    res = train_lpd(student, teacher, loader_factory(student.config, 2), cfg, tmp_path)
    after = load_file(str(res.adapter_path))
    assert res.global_step == 3 and res.plot_path.stat().st_size > 0
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("vision_model.encoder.layers.0.") for k in moved)  # ViT block 0 only
    assert any(k.startswith("vision_model.encoder.layers.0.") and "lora_B" in k for k in moved)
    log = json.loads(res.log_path.read_text())["steps"]
    assert [e["lr"] for e in log] == pytest.approx([1e-3 / 40, 1e-3 / 40 + (1 - 1 / 40) * 1e-3 / 2, 1e-3])
    assert all(set(e["parts_rank0"]) == {"mse_vision", "loss"} for e in log)
    # a second call finds the finished checkpoint and does nothing more
    res2 = train_lpd(student, teacher, loader_factory(student.config, 2), cfg, tmp_path)
    assert res2.global_step == 3
    assert all(torch.equal(after[k], v) for k, v in load_file(str(res2.adapter_path)).items())
    other = TrainConfig(**{**cfg.__dict__, "stages": (0, 1)})
    with pytest.raises(ValueError, match="exact resume"):
        train_lpd(student, teacher, loader_factory(student.config, 2), other, tmp_path)


# -------------------------------------------------------------------------------------------- subprocesses
def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    return env


def _run(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """One uninterrupted run with the script's defaults (micro-batches prefetched by a thread, dropout on): the
    reference of both the resume test and the prefetching test, run once for the two."""
    ref = tmp_path_factory.mktemp("lpd") / "ref"
    _run([sys.executable, str(SCRIPT), str(ref)])
    return ref


@pytest.mark.integration
def test_sigkill_at_random_step_then_resume_is_bit_identical(reference_run, tmp_path):
    kill_at = random.SystemRandom().randint(1, TOTAL_STEPS - 1)
    ref, cut = reference_run, tmp_path / "cut"
    killed = _run([sys.executable, str(SCRIPT), str(cut), "--kill-at", str(kill_at)], check=False)
    assert killed.returncode == -9, f"kill_at={kill_at}: expected SIGKILL, got {killed.returncode}"
    assert not (cut / "adapter.safetensors").exists()
    _run([sys.executable, str(SCRIPT), str(cut)])
    a, b = load_file(str(ref / "adapter.safetensors")), load_file(str(cut / "adapter.safetensors"))
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"kill_at={kill_at}: {len(diff)} adapter tensors differ, e.g. {diff[:2]}"
    la = json.loads((ref / "train_log.json").read_text())["steps"]
    lb = json.loads((cut / "train_log.json").read_text())["steps"]
    assert [e["loss"] for e in la] == [e["loss"] for e in lb] and len(la) == TOTAL_STEPS
    # not vacuous: training moved the adapters (every B starts at zero)
    assert max(float(v.abs().max()) for k, v in a.items() if k.endswith("lora_B")) > 1e-4


@pytest.mark.integration
def test_prefetching_thread_trains_bit_identically(reference_run, tmp_path):
    """Micro-batches collated ahead in a background thread (the default: the reference run) train exactly as
    inline collation, dropout included (the thread draws no global random numbers)."""
    ahead, inline = reference_run, tmp_path / "inline"
    _run([sys.executable, str(SCRIPT), str(inline), "--prefetch", "0"])
    a, b = load_file(str(ahead / "adapter.safetensors")), load_file(str(inline / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert max(float(v.abs().max()) for k, v in a.items() if k.endswith("lora_B")) > 1e-4  # training moved them


@pytest.mark.integration
def test_two_gloo_processes_match_one_process_with_accumulation(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--batch", "2", "--dropout", "0", "--checkpoint-every", "100"]
    _run([sys.executable, str(SCRIPT), str(one), "--grad-accum", "2", *common])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
          str(two), "--grad-accum", "1", *common])
    a, b = load_file(str(one / "adapter.safetensors")), load_file(str(two / "adapter.safetensors"))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= DDP_TOL, f"max adapter difference {worst}"
    la = json.loads((one / "train_log.json").read_text())["steps"]
    lb = json.loads((two / "train_log.json").read_text())["steps"]
    assert len(la) == len(lb) == TOTAL_STEPS // 2  # global batch 4 in both runs
    assert [e["loss"] for e in la] == pytest.approx([e["loss"] for e in lb], rel=1e-5)
    assert max(float(v.abs().max()) for k, v in a.items() if k.endswith("lora_B")) > 1e-4
