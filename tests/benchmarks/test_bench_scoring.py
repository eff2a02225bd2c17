"""Smoke test of benchmarks/bench_scoring.py on the tiny config: it runs end to end and its comparisons hold."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_bench_scoring_section_a_on_tiny(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("bench_scoring", None)
    import bench_scoring

    rc = bench_scoring.main(["--device", "cpu", "--config", "tiny", "--samples", "4", "--batch-size", "2",
                             "--sections", "a", "--repeats", "2", "--out", str(tmp_path), "--name", "smoke"])
    assert rc == 0
    res = json.loads((tmp_path / "smoke.json").read_text())
    ta = res["taylor"]
    assert ta["repeats"] == 2 and all(len(v) == 2 for v in ta["seconds_every_repeat"].values())
    assert ta["tokens_batched"] == ta["tokens_reference"]  # the same tokens selected batched and one by one
    # batched ukmp scores equal the reference loop's (fp32; tolerance 1e-5 of each group's largest score)
    assert ta["max_rel_diff_group_scale"] <= 1e-5
    assert all(p["units_differing"] == 0 for p in ta["fp32_plans"])
    assert (tmp_path / "smoke.png").stat().st_size > 0
