"""UKMP scoring memory options (``prune.accumulate_on: cpu``, ``prune.score_passes: k``): the same scores as the
default within 1e-6 relative (fp32), and the accumulators' peak, as the scorer measures the tensors it holds,
drops to about 1/k of the default."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

from ukmp.config import ConfigError, load_config
from ukmp.groups import ParamSlice, PrunableGroup
from ukmp.importance import taylor as taylor_mod
from ukmp.importance.taylor import partition_groups
from ukmp.prune.reuse import load_scores
from ukmp.prune.stage import run_prune_stage

REL = 1e-6  # fp32 rounding of a sum in another order (a product added on its own instead of fused into addmm_)
FAMILIES = {"tiny": ["data.calibration=sample:cc595k"], "tiny-llava": ["data.calibration=sample:cc595k"]}


def _cfg(tmp_path, source, *over):
    demo = str(resources.files("ukmp") / "configs" / "demo.yaml")
    return load_config([demo], [f"output_dir={tmp_path}", f"model.source={source}", *FAMILIES[source], *over])


def _prune(tmp_path, source, name, *over):
    out = tmp_path / name
    out.mkdir()
    run_prune_stage(_cfg(tmp_path, source, *over), out)
    scores = load_scores(out / "scores.safetensors")[1]["taylor"]
    return scores, json.loads((out / "summary.json").read_text())["calibration"]


def _max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float(((a[k] - b[k]).abs() / b[k].abs().clamp_min(1e-30)).max()) for k in a)


@pytest.mark.integration
@pytest.mark.parametrize("source", FAMILIES)
def test_cpu_accumulators_and_passes_give_the_default_scores(source, tmp_path, monkeypatch):
    calls = []
    real = taylor_mod._offload_into

    def spy(acc, stage):  # the host path is the one taken: every tracked Linear gets an offloading sink
        calls.append(acc.shape)
        return real(acc, stage)

    base, base_cal = _prune(tmp_path, source, "default")
    monkeypatch.setattr(taylor_mod, "_offload_into", spy)
    host, host_cal = _prune(tmp_path, source, "cpu", "prune.accumulate_on=cpu")
    assert calls, "accumulate_on=cpu did not take the offloading path"
    monkeypatch.undo()
    two, two_cal = _prune(tmp_path, source, "two", "prune.score_passes=2")
    three, three_cal = _prune(tmp_path, source, "three", "prune.score_passes=3", "prune.accumulate_on=cpu")
    for other in (host, two, three):
        assert _max_rel(other, base) <= REL
    assert {c["tokens_selected"] for c in (base_cal, host_cal, two_cal, three_cal)} == {base_cal["tokens_selected"]}
    # measured by the scorers: k passes hold about 1/k of the accumulators at a time (the parts are whole
    # weights, so a part may exceed total/k by at most the largest group's weights)
    full = base_cal["accumulator_peak_bytes_cpu"]
    assert base_cal["score_passes"] == 1 and two_cal["score_passes"] == 2 and three_cal["score_passes"] == 3
    assert two_cal["accumulator_peak_bytes_cpu"] <= 0.6 * full
    assert three_cal["accumulator_peak_bytes_cpu"] <= 0.45 * full
    # not vacuous: one calibration batch fewer moves the scores far beyond the tolerance
    fewer, _ = _prune(tmp_path, source, "fewer", "prune.num_samples=4")
    assert _max_rel(fewer, base) > 1e-3


def _group(gid: str, modules: list[str], rows: int = 4) -> PrunableGroup:
    return PrunableGroup(gid, "mlp", "channels", "language", 0, rows, 1,
                         tuple(ParamSlice(m, "weight", 0, 1) for m in modules))


@pytest.mark.unit
def test_partition_keeps_shared_weights_together_and_balances_bytes():
    sizes = {f"{m}.weight": b for m, b in {"a": 100, "b": 90, "c": 50, "d": 40, "e": 10}.items()}
    groups = [_group("g0", ["a"]), _group("g1", ["b", "e"]), _group("g2", ["c"]), _group("g3", ["d", "e"]),
              _group("g4", ["a"])]  # g0/g4 share a; g1/g3 share e
    parts = partition_groups(groups, 2, sizes.__getitem__)
    ids = [[g.id for g in p] for p in parts]
    # clusters {g1, g3} (b, d, e: 140 bytes), {g0, g4} (a: 100), {g2} (c: 50), placed largest first
    assert ids == [["g1", "g3"], ["g0", "g2", "g4"]]
    assert partition_groups(groups, 1, sizes.__getitem__) == [groups]
    assert len(partition_groups(groups, 9, sizes.__getitem__)) == 3  # only three clusters exist
    assert partition_groups(groups, 2, sizes.__getitem__) == parts  # deterministic
    with pytest.raises(ValueError, match="passes"):
        partition_groups(groups, 0, sizes.__getitem__)


@pytest.mark.unit
def test_bad_values_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="prune.score_passes"):
        _cfg(tmp_path, "tiny", "prune.score_passes=0")
    with pytest.raises(ConfigError, match="prune.accumulate_on"):
        _cfg(tmp_path, "tiny", "prune.accumulate_on=gpu")


@pytest.mark.unit
def test_several_passes_need_a_batch_maker():
    from ukmp.prune.scoring import taylor_pass

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="score_passes"):
        taylor_pass(model, [_group("g", ["0"], 2)], [{}], 0.4, passes=2)
