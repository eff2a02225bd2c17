"""SIGKILL a prune and a finetune mid-stage, then re-run: no temporary directory is left, and a finetune whose newest
checkpoint was truncated by the kill survives with a one-line warning and completes. Subprocesses: behind ``slow``
(the fast, in-process variant is tests/core/test_bad_input.py::test_stale_tmp_removed_and_lock_refuses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pytest

DEMO = str(resources.files("ukmp") / "configs" / "demo.yaml")


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join(sys.path))


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ukmp.cli", *args], env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _kill_when(args: list[str], ready, timeout: float = 120) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "ukmp.cli", *args], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        while not ready():
            assert proc.poll() is None, "finished before it could be killed"
            assert time.monotonic() - t0 < timeout, "never got ready"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _temporaries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if p.name.endswith((".tmp", ".lock")))


@pytest.mark.slow
def test_sigkill_prune_then_finetune_leaves_no_temporaries(tmp_path):
    run = tmp_path / "demo"
    prune = ["prune", DEMO, f"output_dir={tmp_path}", "prune.num_samples=64", "prune.batch_size=2"]
    _kill_when(prune, lambda: any(run.glob(".prune.*.tmp")) and (tmp_path / "_sample_data").is_dir())
    assert list(run.glob(".prune.*.tmp"))  # not vacuous: the kill left one
    small = ["prune", DEMO, f"output_dir={tmp_path}", "prune.num_samples=2", "prune.batch_size=2"]  # the same stage
    done = _cli(*small)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _temporaries(tmp_path) == [] and (run / "prune" / "stage.json").is_file()

    ckpts = run / "finetune.work"
    finetune = ["finetune", DEMO, f"output_dir={tmp_path}", "finetune.checkpoint_every=1"]
    _kill_when(finetune, lambda: len(list(ckpts.glob("*/train/checkpoints/step-*"))) >= 2)
    assert list(run.glob(".finetune.*.tmp"))
    root = next(ckpts.glob("*/train/checkpoints"))
    newest = root / json.loads((root / "latest.json").read_text())["name"]  # what a resume reads first
    adapter = newest / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])  # as if the kill hit while this file was written
    done = _cli(*finetune)
    assert done.returncode == 0, done.stderr[-2000:]
    warnings = [ln for ln in done.stderr.splitlines() if ln.startswith("WARNING") and "adapter.safetensors" in ln]
    assert len(warnings) == 1 and newest.name in warnings[0], done.stderr[-2000:]
    assert (run / "finetune" / "stage.json").is_file() and (run / "finetune" / "model" / "ukmp.json").is_file()
    assert _temporaries(tmp_path) == [] and not ckpts.exists()
