"""benchmarks/gpu/run.sh (gpu_check.py) in its tiny CPU mode, so the prepared GPU check cannot rot, and its guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GPU_DIR = ROOT / "benchmarks" / "gpu"


@pytest.fixture(scope="module")
def gpu_modules():
    sys.path[:0] = [str(GPU_DIR), str(ROOT / "benchmarks")]
    for m in ("gpu_check", "gpu_budget"):
        sys.modules.pop(m, None)
    import gpu_budget as budget
    import gpu_check

    yield gpu_check, budget
    for p in (str(GPU_DIR), str(ROOT / "benchmarks")):
        sys.path.remove(p)


def no_exit(code: int) -> None:
    """In-process runs must not end the test process if a very slow machine reaches the watchdog's limit."""


def check_tiny_json(res: dict, budget) -> None:
    assert res["mode"] == "tiny" and res["skipped"] == {} and res["unmeasured"] == {}
    for key in ("machine", "date_utc", "command", "gpu"):
        assert key in res
    figs = res["figures"]
    assert set(figs) == {name for name, _ in budget.FIGURES}
    bad = {k: v for k, v in figs.items() if not budget.is_number(v)}
    assert not bad, f"figures without a number: {bad}"
    sc = res["scoring"]
    # both memory options give the default's scores (fp32 on the CPU; tolerance 1e-6 of each group's largest score)
    assert figs["scoring_cpu_acc_max_rel_diff"] <= 1e-6 and figs["scoring_passes2_max_rel_diff"] <= 1e-6
    # the accumulator bytes come from the scorer: two passes hold at most ~half (groups split by weight bytes)
    dev, two = (sc[k]["accumulator_peak_bytes"]["cpu"] for k in ("device", "score_passes_2"))
    assert 0 < two <= 0.6 * dev
    assert sc["device_large"]["samples"] == 8 and sc["device"]["samples"] == 4
    assert res["generation"]["batch_size"] == 32 and res["generation"]["dense"]["new_tokens_per_row"] == 4


@pytest.mark.integration
def test_tiny_mode_fills_every_figure(gpu_modules, tmp_path):
    gpu_check, budget = gpu_modules
    assert gpu_check.main(["--tiny", "--threads", "1", "--out", str(tmp_path)], exit_fn=no_exit) == 0
    check_tiny_json(json.loads((tmp_path / "gpu_check_tiny.json").read_text()), budget)


@pytest.mark.integration
def test_a_section_over_budget_or_failing_leaves_the_others(gpu_modules, tmp_path, monkeypatch):
    gpu_check, budget = gpu_modules

    def broken(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(gpu_check, "section_generation", broken)
    rc = gpu_check.main(["--tiny", "--threads", "1", "--out", str(tmp_path), "--name", "partial",
                         "--total-s", "100", "--scoring-s", "150"], exit_fn=no_exit)
    assert rc == 1  # a failure is an error exit; a skip for time is not
    res = json.loads((tmp_path / "partial.json").read_text())
    assert set(res["skipped"]) == {"scoring", "generation"}
    assert "150 s" in res["skipped"]["scoring"] and "scoring" not in res
    assert res["skipped"]["generation"] == "failed: RuntimeError: CUDA out of memory (simulated)"
    assert budget.is_number(res["figures"]["distill_mfu"])  # the section after the failure still ran
    assert res["figures"]["gen_speedup"] is None and res["unmeasured"]["gen_speedup"] == res["skipped"]["generation"]
    assert res["unmeasured"]["scoring_device_s"] == res["skipped"]["scoring"]


@pytest.mark.integration
def test_watchdog_in_main_writes_what_it_has(gpu_modules, tmp_path):
    """The total limit passes during the model load: the watchdog writes the JSON naming that step and asks to exit
    with code 3 (a no-op here, so the run goes on and every section is skipped for lack of time)."""
    gpu_check, _ = gpu_modules
    codes = []
    assert gpu_check.main(["--tiny", "--threads", "1", "--out", str(tmp_path), "--name", "dog", "--total-s", "0.001"],
                          exit_fn=codes.append) == 0
    assert codes == [3]
    res = json.loads((tmp_path / "dog.json").read_text())
    why = res["skipped"]["watchdog"]  # the step: the model load (or the print just before it, on a slow machine)
    assert why.startswith("stopped at the total limit") and why.split("during: ")[1] in ("loading the model",
                                                                                          "start-up")
    assert {"scoring", "generation", "distill"} <= set(res["skipped"])
    assert all(v is None for k, v in res["figures"].items() if k != "load_s")


@pytest.mark.slow
def test_run_sh_tiny_end_to_end(gpu_modules, tmp_path):
    """The shell entry point itself, as the device machine runs it (~15-20 s on the 2 shared cores: a fresh
    interpreter imports torch and transformers); $OUT is where the JSON goes."""
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(GPU_DIR / "run.sh"), "--tiny"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "distill_mfu" in r.stdout
    check_tiny_json(json.loads((tmp_path / "gpu_check_tiny.json").read_text()), gpu_modules[1])


@pytest.mark.unit
def test_run_sh_names_missing_packages(tmp_path):
    """A Python without the packages (here: site-packages off, ``-S``) gets one line naming them and exit code 2."""
    bare = tmp_path / "bare-python"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    r = subprocess.run(["bash", str(GPU_DIR / "run.sh"), "--tiny"], env={**os.environ, "PYTHON": str(bare),
                       "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "lacks: torch transformers omegaconf" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not list(tmp_path.glob("*.json"))


# ---------------------------------------------------------------------------------------------------- the guard
class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.unit
def test_budget_skips_a_section_that_would_overrun(gpu_modules):
    _, budget = gpu_modules
    clock = FakeClock()
    b = budget.Budget(540, {"scoring": 250, "generation": 110}, clock=clock)
    assert b.start("scoring") is None
    clock.t += 200
    assert b.step(30, "estimate") is None  # 50 s left of the section
    why = b.step(60, "1.5x the default's 40 s")
    assert why and "60 s" in why and "1.5x" in why
    clock.t += 250  # 450 s gone: 90 s left of the total
    why = b.start("generation")
    assert why and "110 s" in why and "90 s" in why
    # a section's end never passes the total limit
    b2 = budget.Budget(100, {"scoring": 250}, clock=FakeClock())
    assert b2.start("scoring") is not None
    # t0 before construction (the script's imports) counts against the total
    b3 = budget.Budget(300, {"scoring": 250}, clock=clock, t0=clock.t - 60)
    assert b3.left() == 240 and "240 s of the 300 s" in b3.start("scoring")


@pytest.mark.unit
def test_figures_of_a_partial_run_name_why(gpu_modules):
    _, budget = gpu_modules
    res = {"load": {"seconds": 12.5},
           "scoring": {"samples": 128, "device": {"seconds": 3.0, "peak_gib": 30.1, "accumulator_gib_on_device": 15.0}},
           "skipped": {"scoring/device_large": "skipped: estimated 400 s", "generation": "skipped: budget"}}
    figs = budget.figures(res)
    assert figs["load_s"] == 12.5 and figs["scoring_device_peak_gib"] == 30.1
    assert figs["scoring_large_s"] is None and figs["gen_speedup"] is None
    why = budget.unmeasured(res)
    assert why["scoring_large_s"] == "skipped: estimated 400 s"
    assert why["gen_dense_tokens_per_s"] == "skipped: budget"
    assert why["distill_mfu"] == "not measured"
    assert "load_s" not in why and "scoring_device_s" not in why
    assert not budget.is_number(float("nan")) and not budget.is_number(True)


@pytest.mark.unit
def test_watchdog_writes_and_exits_at_the_limit(gpu_modules):
    import threading

    _, budget = gpu_modules
    seen, done = [], threading.Event()

    def exit_fn(code):
        seen.append(code)
        done.set()

    with budget.Watchdog(0.05, lambda step: seen.append(step), exit_fn=exit_fn) as dog:
        dog.running("scoring: score_passes_2")
        assert done.wait(5)
    assert seen == ["scoring: score_passes_2", budget.Watchdog.EXIT_CODE]
    with budget.Watchdog(5, lambda step: seen.append(step), exit_fn=exit_fn):
        pass  # left before the deadline: cancelled, nothing called
    assert len(seen) == 2
