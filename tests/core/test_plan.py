import json

import pytest
import torch

from ukmp.models import adapter_for
from ukmp.plan import PlanError, PruningPlan


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda k: k.__setitem__("vision.layers.99.attn", [0]), "vision.layers.99.attn"),
        (lambda k: k.__setitem__("text_enc.block.0.attn", [0, 4]), "index 4 out of range"),
        (lambda k: k.__setitem__("text_enc.block.0.attn", [-1]), "index -1 out of range"),
        (lambda k: k.__setitem__("text_dec.block.1.ffn", [3, 3]), "duplicate index 3"),
        (lambda k: k.__setitem__("vision.layers.1.mlp", []), "keeps nothing"),
        (lambda k: k.__setitem__("text_dec.block.0.cross_attn", [0.5]), "not an integer"),
    ],
)
def test_bad_plan_is_one_line_error_and_model_untouched(tiny, edit, needle):
    model, _ = tiny
    adapter = adapter_for(model)
    groups = adapter.groups()
    keep = {g.id: list(range(g.n_units // 2)) for g in groups}
    edit(keep)
    plan = PruningPlan(keep=keep)
    before = _state(model)
    with pytest.raises(PlanError) as e:
        adapter.apply_(model, plan)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(PlanError):
        with adapter.mask(model, plan):
            pass


def test_plan_json_round_trip_and_digest(tmp_path, tiny):
    model, _ = tiny
    groups = adapter_for(model).groups()
    plan = PruningPlan(keep={groups[0].id: [2, 0]}, units={groups[0].id: groups[0].n_units}, meta={"ratio": 0.5})
    plan.save(tmp_path / "plan.json")
    again = PruningPlan.load(tmp_path / "plan.json")
    assert again.to_dict() == plan.to_dict()
    assert again.digest() == plan.digest()
    other = PruningPlan(keep={groups[0].id: [2, 1]}, units=plan.units)
    assert other.digest() != plan.digest()
    assert json.loads((tmp_path / "plan.json").read_text())["version"] == 1


def test_plan_file_errors_name_the_file_or_field(tmp_path):
    with pytest.raises(PlanError, match="plan file not found"):
        PruningPlan.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="bad.json: not valid JSON"):
        PruningPlan.load(bad)
    bad.write_text(json.dumps({"format": "ukmp.pruning_plan", "version": 1}))
    with pytest.raises(PlanError, match="missing field 'keep'"):
        PruningPlan.load(bad)
    bad.write_text(json.dumps({"format": "other", "version": 1, "keep": {}}))
    with pytest.raises(PlanError, match="field 'format'"):
        PruningPlan.load(bad)


def test_unit_count_mismatch_is_rejected(tiny):
    model, _ = tiny
    adapter = adapter_for(model)
    g = adapter.groups()[0]
    with pytest.raises(PlanError, match="units in the plan"):
        adapter.apply_(model, PruningPlan(keep={g.id: [0]}, units={g.id: g.n_units + 1}))


def test_applying_twice_is_rejected(tiny):
    model, _ = tiny
    adapter = adapter_for(model)
    g = [g for g in adapter.groups() if g.kind == "enc_heads"][0]
    plan = PruningPlan(keep={g.id: [1, 3]})
    adapter.apply_(model, plan)
    with pytest.raises(PlanError, match="already pruned"):
        adapter.apply_(model, plan)
