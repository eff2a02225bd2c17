"""The embedded default pipeline: all stages, results, resume, and partial re-runs."""

import json
import shutil

import pytest

from ukmp.cli import main
from ukmp.config import ConfigError, load_config, validate
from ukmp.io import load_pruned, read_plan
from ukmp.pipeline import run
from ukmp.plan import PruningPlan


def _demo_cfg(tmp_path, *overrides):
    from importlib import resources

    demo = str(resources.files("ukmp") / "configs" / "demo.yaml")
    return load_config([demo], [f"output_dir={tmp_path}", *overrides])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    cfg = _demo_cfg(tmp)
    return cfg, run(cfg), tmp / "demo"


def test_all_stages_and_a_number_for_every_task(demo_run):
    cfg, out, root = demo_run
    for stage in ("eval_dense", "prune", "eval_pruned", "finetune", "eval_finetuned"):
        assert (root / stage / "stage.json").is_file(), stage
        assert not out["stages"][stage]["skipped"]
    metrics = out["metrics"]
    assert set(metrics["pruned"]) == set(cfg.eval.after_prune)
    assert set(metrics["recovered"]) == set(cfg.eval.after_finetune) == set(metrics["dense"])
    for state in metrics.values():
        for task, m in state.items():
            numbers = [v for k, v in m.items() if k not in ("count", "seconds", "scorer", "lemmatizer")]
            assert numbers and all(isinstance(v, (int, float)) for v in numbers), task
    assert abs(out["achieved_ratio"] - cfg.prune.ratio) < 0.02
    saved = json.loads((root / "results.json").read_text())
    assert saved["metrics"] == metrics
    assert "| task | metric |" in (root / "results.md").read_text()
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["versions"]["torch"] and manifest["plan_digest"] == read_plan(root / "prune" / "model").digest()
    assert len(manifest["calibration_sample_ids"]) == cfg.prune.num_samples
    for png in ("prune/kept_width.png", "finetune/loss.png"):
        assert (root / png).stat().st_size > 1000
    # the recovered model is a plain pruned model with the same plan, and it differs from the pruned one
    rec, pru = load_pruned(root / "finetune" / "model"), load_pruned(root / "prune" / "model")
    assert read_plan(root / "finetune" / "model").digest() == read_plan(root / "prune" / "model").digest()
    diffs = [float((a - b).abs().max()) for (n, a), (_, b) in
             zip(rec.state_dict().items(), pru.state_dict().items())]
    assert max(diffs) > 1e-6


# the resume logic does not depend on which tasks run: one cheap task per evaluation stage, so that the three
# re-runs below cost seconds (with the demo's five tasks, each re-run of eval_finetuned scores captions in Java)
RESUME = ["eval.dense=true", "eval.after_prune=[gqa]", "eval.after_finetune=[okvqa]", "finetune.max_steps_per_stage=1"]


def test_second_run_skips_and_deleted_stage_reruns_with_dependents(tmp_path):
    cfg = _demo_cfg(tmp_path, *RESUME)
    first, root = run(cfg), tmp_path / "demo"
    assert not any(s["skipped"] for s in first["stages"].values())
    again = run(cfg)
    assert all(s["skipped"] for s in again["stages"].values())
    assert again["metrics"] == first["metrics"]
    shutil.rmtree(root / "eval_pruned")
    third = run(cfg)
    ran = {k for k, s in third["stages"].items() if not s["skipped"]}
    assert ran == {"eval_pruned"}
    shutil.rmtree(root / "finetune")
    fourth = run(cfg)
    assert {k for k, s in fourth["stages"].items() if not s["skipped"]} == {"finetune", "eval_finetuned"}
    # changing the finetune config invalidates finetune and what reads it, nothing upstream
    cfg.finetune.lr = cfg.finetune.lr / 2
    fifth = run(cfg)
    assert {k for k, s in fifth["stages"].items() if not s["skipped"]} == {"finetune", "eval_finetuned"}


def test_replan_from_cached_scores_reproduces_the_plan(demo_run, tmp_path, capsys):
    cfg, _, root = demo_run
    scores = root / "prune" / "scores.safetensors"
    assert main(["plan", "--scores", str(scores), "--ratio", str(cfg.prune.ratio),
                 "--out", str(tmp_path / "p.json")]) == 0
    again = PruningPlan.load(tmp_path / "p.json")
    original = PruningPlan.load(root / "prune" / "plan.json")
    assert again.keep == original.keep and again.digest() == original.digest()
    assert main(["plan", "--scores", str(scores), "--ratio", "0.3", "--out", str(tmp_path / "q.json")]) == 0
    smaller = PruningPlan.load(tmp_path / "q.json")
    assert smaller.meta["achieved_ratio"] < original.meta["achieved_ratio"]
    capsys.readouterr()
    assert main(["plan", "--scores", str(tmp_path / "nope.safetensors"), "--ratio", "0.3"]) == 2
    assert "nope.safetensors" in capsys.readouterr().err


def test_prune_cli_with_overrides_and_bad_key(tmp_path, capsys):
    from importlib import resources

    demo = str(resources.files("ukmp") / "configs" / "demo.yaml")
    assert main(["prune", demo, f"output_dir={tmp_path}", "name=p", "prune.method=magnitude",
                 "prune.ratio=0.3"]) == 0
    summary = json.loads((tmp_path / "p" / "prune" / "summary.json").read_text())
    assert summary["method"] == "magnitude" and abs(summary["achieved_ratio"] - 0.3) < 0.02
    capsys.readouterr()
    assert main(["prune", demo, f"output_dir={tmp_path}", "prune.ratoi=0.3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "prune.ratoi" in err and "\n" not in err


def test_same_seed_same_plan(tmp_path):
    from ukmp.prune.stage import run_prune_stage

    digests = []
    for k in range(2):
        cfg = _demo_cfg(tmp_path / str(k))
        out = tmp_path / str(k) / "prune"
        out.mkdir(parents=True)
        digests.append(run_prune_stage(cfg, out)["plan_digest"])
    assert digests[0] == digests[1]


def test_fused_pass_equals_the_two_separate_passes(tmp_path):
    """One forward feeding both UKMP passes gives the scores of the two separate passes on the same batches."""
    import torch

    from ukmp.models import adapter_for
    from ukmp.prune.scoring import entropy_pass, fused_pass, taylor_pass
    from ukmp.prune.stage import calibration_batches
    from ukmp.runtime import load_dense

    cfg = _demo_cfg(tmp_path)
    model, processor = load_dense(cfg.model)
    groups = adapter_for(model).groups()
    batches, n, _ = calibration_batches(cfg, processor, model)
    ent = entropy_pass(model, groups, batches(1))
    tay, stats = taylor_pass(model, groups, batches(1), 0.4)
    ftay, fent, fstats = fused_pass(model, groups, batches(1), 0.4)
    assert stats == fstats and ent.keys() == fent.keys() and tay.keys() == ftay.keys()
    for k in ent:  # same inputs, same kernels: equal up to summation order (fp32)
        assert torch.allclose(ent[k], fent[k], rtol=1e-5, atol=1e-7), k
    for k in tay:
        assert torch.allclose(tay[k], ftay[k], rtol=1e-5, atol=1e-12), k
    other = entropy_pass(model, groups, batches(0))  # another epoch: other prefix splits and crops
    assert any(not torch.allclose(ent[k], other[k], rtol=1e-5, atol=1e-7) for k in ent)


def test_length_grouped_calibration_keeps_the_scores(tmp_path):
    """Grouping calibration samples by length changes the batches (less padding), not the summed scores."""
    import torch

    from ukmp.models import adapter_for
    from ukmp.prune.scoring import entropy_pass, taylor_pass
    from ukmp.prune.stage import calibration_batches
    from ukmp.runtime import load_dense

    cfg = _demo_cfg(tmp_path, "prune.batch_size=4")
    model, processor = load_dense(cfg.model)
    groups = adapter_for(model).groups()
    grouped, _, _ = calibration_batches(cfg, processor, model)
    plain, _, _ = calibration_batches(_demo_cfg(tmp_path, "prune.batch_size=4", "prune.group_by_length=false"),
                                      processor, model)
    pad = [sum(int((b["labels"] == -100).sum()) for b in f(1)) for f in (grouped, plain)]
    assert pad[0] < pad[1], pad  # the grouping does remove padding
    ta, _ = taylor_pass(model, groups, grouped(1), 0.4)
    tb, _ = taylor_pass(model, groups, plain(1), 0.4)
    assert all(torch.allclose(ta[k], tb[k], rtol=1e-5, atol=1e-12) for k in ta)
    ea, eb = entropy_pass(model, groups, grouped(0)), entropy_pass(model, groups, plain(0))
    # entropy tolerance: another batch shape changes matmul rounding, which can move a cosine lying within ~1e-7
    # of a bin edge to the neighbouring bin; with ~100 tokens per neuron one move shifts a unit's mean entropy by
    # up to ~1e-2. So: every unit within 2e-2, and almost all (>= 95 %) exactly equal up to 1e-6.
    diffs = torch.cat([(ea[k] - eb[k]).abs() for k in ea])
    assert float(diffs.max()) <= 2e-2 and float((diffs <= 1e-6).float().mean()) >= 0.95, diffs.max()
    padded = entropy_pass(model, groups, plain(0), exclude_padding=False)  # not vacuous: padding counted
    assert float((torch.cat([(padded[k] - eb[k]).abs() for k in eb]) > 1e-6).float().mean()) > 0.5


def test_calibration_batches_same_with_and_without_prefetch(tmp_path):
    """The prefetching thread (prune.prefetch, default 2) hands over exactly the batches an inline loop builds."""
    import torch

    from ukmp.prune.stage import calibration_batches
    from ukmp.runtime import load_dense

    cfg = _demo_cfg(tmp_path, "prune.batch_size=3")
    model, processor = load_dense(cfg.model)
    ahead, n, _ = calibration_batches(cfg, processor, model)
    inline, _, _ = calibration_batches(_demo_cfg(tmp_path, "prune.batch_size=3", "prune.prefetch=0"), processor, model)
    for epoch in (0, 1):
        a, b = list(ahead(epoch)), list(inline(epoch))
        assert len(a) == len(b) == n > 1
        for x, y in zip(a, b):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(ConfigError, match="prune.prefetch"):
        validate(_demo_cfg(tmp_path, "prune.prefetch=-1"))


def test_stage_commands_and_run_share_stage_hashes(tmp_path):
    """`ukmp prune` / `ukmp finetune` followed by `ukmp run` reuse those stages instead of redoing them."""
    from importlib import resources

    demo = str(resources.files("ukmp") / "configs" / "demo.yaml")
    over = [f"output_dir={tmp_path}", "eval.dense=false", "eval.after_prune=[gqa]", "eval.after_finetune=[gqa]"]
    assert main(["prune", demo, *over]) == 0
    assert main(["finetune", demo, *over]) == 0
    out = run(_demo_cfg(tmp_path, *over[1:]))
    assert out["stages"]["prune"]["skipped"] and out["stages"]["finetune"]["skipped"]
    assert not out["stages"]["eval_pruned"]["skipped"]
