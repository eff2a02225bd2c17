"""A new user's path: overrides anywhere, `ukmp run` without a config, eval directories, file modes, readable
predictions and plots, applying a `ukmp plan` output, and which config changes re-run which stages."""

import json
import os
import runpy
import stat
from importlib import resources
from pathlib import Path

import pytest
import torch

from ukmp import cli
from ukmp.cli import build_parser, main, parse_args
from ukmp.config import load_config
from ukmp.io import atomic_write_json
from ukmp.pipeline import run
from ukmp.plan import PruningPlan

DEMO = str(resources.files("ukmp") / "configs" / "demo.yaml")
ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ the command line
@pytest.mark.parametrize("argv, expected", [
    (["run", "a.yaml", "--force", "prune", "x=1"], ["a.yaml", "x=1"]),
    (["run", "--only", "finetune", "a.yaml", "x=1"], ["a.yaml", "x=1"]),
    (["prune", "a.yaml", "--force-stage", "prune.ratio=0.3"], ["a.yaml", "prune.ratio=0.3"]),
    (["prune", "a.yaml", "--plan", "p.json", "name=b"], ["a.yaml", "name=b"]),
    (["eval", "a.yaml", "--model", "m", "--tasks", "gqa", "eval.batch_size=2"], ["a.yaml", "eval.batch_size=2"]),
    (["finetune", "a.yaml", "--pruned", "m", "finetune.lr=1e-3"], ["a.yaml", "finetune.lr=1e-3"]),
    (["compare", "a.yaml", "--ratio", "0.5", "--recover", "prune.num_samples=4"], ["a.yaml", "prune.num_samples=4"]),
    (["demo", "--ratio", "0.3", "eval.vqa_scorer=official"], ["eval.vqa_scorer=official"]),
])
def test_overrides_after_options(argv, expected):
    assert parse_args(build_parser(), argv).config == expected


def test_unknown_option_after_overrides_still_fails():
    with pytest.raises(SystemExit):
        parse_args(build_parser(), ["run", "a.yaml", "x=1", "--nope"])


@pytest.mark.parametrize("script", ["ukmp_0.5.py", "ukmp_0.2.py", "compare_0.5.py"])
def test_scripts_take_overrides_after_options(script, monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "main", lambda argv: seen.append(argv) or 0)
    extra = ["--force", "prune"] if script != "compare_0.5.py" else ["--recover"]
    monkeypatch.setattr("sys.argv", [script, *extra, "model.device=cpu"])
    with pytest.raises(SystemExit):
        runpy.run_path(str(ROOT / "scripts" / "structured_blip2" / script), run_name="__main__")
    args = parse_args(build_parser(), seen[0])
    assert args.config[-1] == "model.device=cpu" and args.config[0].endswith(".yaml")


def test_run_without_config_refuses_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv in (["run"], ["run", "prune.ratio=0.3"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "make demo" in err and "configs/" in err
    assert not (tmp_path / "outputs").exists()  # nothing was written into the demo's folder


def test_every_subcommand_has_a_description():
    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    assert set(subs) == {"inspect", "run", "prune", "plan", "eval", "finetune", "compare", "demo", "export"}
    for name, sp in subs.items():
        assert sp.description and len(sp.description) > 40, name


# ------------------------------------------------------------------------------------------------------ artifacts
def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_atomic_writes_respect_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        atomic_write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o666 & ~mask


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two different pruned models (magnitude at 0.3 and 0.5) with one umask, their prune stages and the eval of
    each through `ukmp eval --model .../prune/model`."""
    tmp = tmp_path_factory.mktemp("models")
    old = os.umask(0o022)
    try:
        for name, ratio in (("a", 0.3), ("b", 0.5)):
            assert main(["prune", DEMO, f"output_dir={tmp}", f"name={name}", "prune.method=magnitude",
                         f"prune.ratio={ratio}"]) == 0
        for name, scorer in (("a", "lavis"), ("b", "official")):
            assert main(["eval", DEMO, "--model", str(tmp / name / "prune" / "model"), "--tasks",
                         "okvqa,flickr30k", f"output_dir={tmp}", "name=e", f"eval.vqa_scorer={scorer}"]) == 0
    finally:
        os.umask(old)
    return tmp


def test_eval_dirs_of_two_models_are_apart_and_named(two_models):
    e = two_models / "e"
    assert sorted(p.name for p in e.iterdir() if p.is_dir()) == ["eval_a_prune", "eval_b_prune"]
    ma = json.loads((e / "eval_a_prune" / "metrics.json").read_text())
    mb = json.loads((e / "eval_b_prune" / "metrics.json").read_text())
    assert ma["model"]["path"] == str((two_models / "a" / "prune" / "model").resolve())
    assert mb["model"]["path"] == str((two_models / "b" / "prune" / "model").resolve())
    assert len(ma["model"]["digest"]) == 16 and ma["model"]["digest"] != mb["model"]["digest"]
    # each names its VQA scorer; the OK-VQA lemmatiser says whether it ran
    assert ma["okvqa"]["scorer"] == "lavis" and mb["okvqa"]["scorer"] == "official"
    assert ma["okvqa"]["lemmatizer"].startswith(("not applied", "spacy"))


def test_artifacts_have_the_usual_modes(two_models):
    modes = _modes(two_models)
    assert len(modes) > 20  # stage files, plans, models, metrics, predictions
    bad = {k: oct(v) for k, v in modes.items() if v != 0o644}
    assert not bad, bad


def test_retrieval_predictions_are_numbers(two_models):
    text = (two_models / "e" / "eval_a_prune" / "flickr30k" / "predictions.json").read_text()
    assert "tensor" not in text
    preds = json.loads(text)
    assert preds["k"] == 10 and preds["i2t"] and preds["t2i"]
    for row in preds["i2t"]:
        assert isinstance(row["image"], int) and all(isinstance(t, int) for t in row["texts"])
        assert all(isinstance(s, float) for s in row["scores"]) and row["scores"] == sorted(row["scores"], reverse=True)


def test_retrieval_predictions_golden():
    from ukmp.eval.retrieval import retrieval_predictions

    ninf = float("-inf")
    details = {"score_i2t": torch.tensor([[0.1, 0.9, ninf], [0.5, ninf, 0.7]]),
               "score_t2i": torch.tensor([[0.2, 0.3], [ninf, 0.4], [0.6, ninf]])}
    out = retrieval_predictions(details, k=2)
    # best first; -inf (outside the re-ranked top k_test) is left out
    assert out["i2t"] == [{"image": 0, "texts": [1, 0], "scores": [0.9, 0.1]},
                          {"image": 1, "texts": [2, 0], "scores": [0.7, 0.5]}]
    assert out["t2i"][1] == {"text": 1, "images": [1], "scores": [0.4]}
    assert json.loads(json.dumps(out)) == out


def test_prune_applies_a_plan_from_ukmp_plan(two_models, tmp_path, capsys):
    scores = two_models / "a" / "prune" / "scores.safetensors"
    assert main(["plan", "--scores", str(scores), "--ratio", "0.4", "--out", str(tmp_path / "p.json")]) == 0
    plan = PruningPlan.load(tmp_path / "p.json")
    assert main(["prune", DEMO, "--plan", str(tmp_path / "p.json"), f"output_dir={tmp_path}", "name=c",
                 "prune.method=magnitude"]) == 0
    applied = PruningPlan.load(tmp_path / "c" / "prune" / "plan.json")
    summary = json.loads((tmp_path / "c" / "prune" / "summary.json").read_text())
    assert applied.keep == plan.keep
    assert abs(summary["achieved_ratio"] - plan.meta["achieved_ratio"]) < 1e-9  # same plan, same parameter count
    assert abs(summary["achieved_ratio"] - 0.3) > 0.05  # not model a's own 0.3 plan


# ------------------------------------------------------------------------------------------- compare precedence
def test_method_delta_never_overrides_the_user(tmp_path):
    from ukmp.compare import method_config

    methods = ROOT / "configs" / "methods"
    user = tmp_path / "mine.yaml"
    user.write_text("prune:\n  num_samples: 3\n")
    # the delta (num_samples 1024) sits on the base: alone it wins over the base ...
    assert method_config([DEMO], [], "flap", 0.5, tmp_path, methods).prune.num_samples == 1024
    # ... but a later file and an override of the user win over the delta
    cfg = method_config([DEMO, str(user)], ["prune.options.flap.metric=ifv"], "flap", 0.5, tmp_path, methods)
    assert cfg.prune.num_samples == 3 and cfg.prune.options["flap"]["metric"] == "ifv"
    assert cfg.prune.options["flap"]["bias_compensation"] is True  # the rest of the delta still applies


# ---------------------------------------------------------------------------------------------------- plots
def test_loss_plot_one_panel_per_term(tmp_path):
    from ukmp.recover.train import loss_terms, save_loss_plot

    log = [{"stage": 0, "global_step": 1, "loss": 1e5, "parts_rank0": {"mse_vision": 1e5, "loss": 1e5}},
           {"stage": 6, "global_step": 2, "loss": 3.0, "parts_rank0": {"ce": 2.0, "kl": 1.0, "loss": 3.0}}]
    assert loss_terms(log) == ["mse_vision", "ce", "kl"]
    assert loss_terms([{"stage": 0, "global_step": 1, "loss": 1.0}]) == ["loss"]
    save_loss_plot(log, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 5000


# ------------------------------------------------------------------------------------------------- stage hashes
def test_execution_only_knob_reruns_nothing_result_knob_reruns_prune_and_after(tmp_path):
    over = [f"output_dir={tmp_path}", "eval.dense=true", "eval.after_prune=[gqa]", "eval.after_finetune=[gqa]",
            "finetune.max_steps_per_stage=1"]
    first = run(load_config([DEMO], over))
    assert not any(s["skipped"] for s in first["stages"].values())
    same = run(load_config([DEMO], [*over, "prune.prefetch=0"]))
    assert all(s["skipped"] for s in same["stages"].values()) and same["metrics"] == first["metrics"]
    changed = run(load_config([DEMO], [*over, "prune.threshold=0.9"]))
    ran = {k for k, s in changed["stages"].items() if not s["skipped"]}
    assert ran == {"prune", "eval_pruned", "finetune", "eval_finetuned"}


def test_comparison_plot_has_a_panel_per_task_with_its_headline_metric(tmp_path):
    from ukmp.compare import plot_comparison

    tasks = ["okvqa", "nocaps", "flickr30k"]
    metrics = {"okvqa": {"accuracy": 0.0}, "nocaps": {"cider": 3.5}, "flickr30k": {"r_mean": 50.0}}
    rows = {"ukmp": {"pruned": metrics, "recovered": None}, "random": {"pruned": metrics, "recovered": None}}
    titles = plot_comparison(rows, metrics, tasks, tmp_path / "c.png", "t")
    assert titles == ["okvqa (accuracy)", "nocaps (cider)", "flickr30k (r_mean)"]
    assert (tmp_path / "c.png").stat().st_size > 5000
