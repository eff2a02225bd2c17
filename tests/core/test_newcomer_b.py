"""A new user's path, round 2 (issue 24, part B): plans carry their own ratio and model, self-allocating methods'
scores are not re-allocated, Ctrl-C during caption scoring never hangs, and the smaller rough edges."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pytest

from ukmp.cli import main
from ukmp.plan import PruningPlan

DEMO = str(resources.files("ukmp") / "configs" / "demo.yaml")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """Prune stages of the tiny BLIP-2 at 0.3: magnitude (re-allocatable scores) and FLAP (its own plan)."""
    tmp = tmp_path_factory.mktemp("pruned")
    for method in ("magnitude", "flap"):
        assert main(["prune", DEMO, f"output_dir={tmp}", f"name={method}", f"prune.method={method}",
                     "prune.ratio=0.3"]) == 0
    return tmp


# ---------------------------------------------------------------------------------- item 6: --plan's own ratio
def test_prune_with_plan_labels_the_plans_ratio(pruned, tmp_path, caplog, monkeypatch):
    from ukmp.prune import stage

    titles = []
    monkeypatch.setattr(stage, "plot_kept_width", lambda groups, plan, path, title="": titles.append(title))
    scores = pruned / "magnitude" / "prune" / "scores.safetensors"
    assert main(["plan", "--scores", str(scores), "--ratio", "0.4", "--out", str(tmp_path / "p.json")]) == 0
    with caplog.at_level(logging.INFO, logger="ukmp.prune.stage"):  # the config says 0.5
        assert main(["prune", DEMO, "--plan", str(tmp_path / "p.json"), f"output_dir={tmp_path}", "name=c",
                     "prune.method=magnitude"]) == 0
    summary = json.loads((tmp_path / "c" / "prune" / "summary.json").read_text())
    assert summary["target_ratio"] == 0.4  # exact: the ratio `ukmp plan --ratio` recorded (was the config's 0.5)
    assert "(target 40.00%)" in caplog.text and "(target 50.00%)" not in caplog.text
    assert titles and titles[0].endswith("(target 0.4)")


def test_a_stage_plan_applied_with_plan_keeps_its_ratio(pruned, tmp_path):
    plan = PruningPlan.load(pruned / "magnitude" / "prune" / "plan.json")  # every stage records its ratio now
    assert main(["prune", DEMO, "--plan", str(pruned / "magnitude" / "prune" / "plan.json"), f"output_dir={tmp_path}",
                 "name=c", "prune.method=magnitude"]) == 0
    summary = json.loads((tmp_path / "c" / "prune" / "summary.json").read_text())
    assert summary["target_ratio"] == plan.meta["whole_model_ratio"] == 0.3


def test_hand_written_plan_is_labelled_with_what_it_removes(pruned, tmp_path):
    plan = PruningPlan.load(pruned / "magnitude" / "prune" / "plan.json")
    plan.meta = {}  # no target, no model size recorded
    plan.save(tmp_path / "p.json")
    assert main(["prune", DEMO, "--plan", str(tmp_path / "p.json"), f"output_dir={tmp_path}", "name=c",
                 "prune.method=magnitude"]) == 0
    summary = json.loads((tmp_path / "c" / "prune" / "summary.json").read_text())
    assert summary["target_ratio"] == summary["achieved_ratio"]
    assert abs(summary["achieved_ratio"] - 0.3) < 0.02  # the magnitude plan's own 0.3 (+- one coarse step)


# ------------------------------------------------------------------ item 8: scores of a self-allocating method
def test_plan_refuses_scores_of_a_method_with_its_own_allocation(pruned, tmp_path, capsys):
    scores = pruned / "flap" / "prune" / "scores.safetensors"
    assert main(["plan", "--scores", str(scores), "--ratio", "0.4", "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "flap makes its own plan" in err and "prune.method=flap" in err
    assert not (tmp_path / "p.json").exists()


def test_prune_refuses_a_self_allocating_methods_own_scores_from(pruned, tmp_path, capsys):
    scores = pruned / "flap" / "prune" / "scores.safetensors"
    assert main(["prune", DEMO, f"output_dir={tmp_path}", "prune.method=flap", f"prune.scores_from={scores}",
                 "prune.ratio=0.4"]) == 2  # was: UKMP's allocator on FLAP's scores, labelled flap, no bias
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "flap makes its own plan" in err
    other = pruned / "magnitude" / "prune" / "scores.safetensors"  # re-allocating a ranking method: as before
    assert main(["prune", DEMO, f"output_dir={tmp_path}", "prune.method=magnitude", f"prune.scores_from={other}",
                 "prune.ratio=0.4"]) == 0


@pytest.mark.parametrize("meta, own", [
    ({"method": "flap"}, True), ({"method": "wanda_sp", "method_allocation": "{}"}, True),  # files before own_plan
    ({"method": "wanda_sp", "method_allocation": '{"scope": "local"}'}, False),  # the floor variant: overrides
    ({"method": "llm_pruner", "method_allocation": '{"normalization": "none"}'}, False),
    ({"method": "flap", "own_plan": "false"}, False),  # FLAP scores re-allocated by a prune stage: a UKMP plan
    ({"method": "ukmp", "own_plan": "true"}, True),
])
def test_allocates_itself(meta, own):
    from ukmp.prune.reuse import allocates_itself

    assert allocates_itself(meta) is own


# ---------------------------------------------------------------------------- item 10: a plan of another model
def test_plan_of_another_model_is_refused_naming_both_sizes(pruned, tmp_path, capsys):
    from ukmp.models import adapter_for
    from ukmp.models.build import build_tiny

    plan_file = pruned / "magnitude" / "prune" / "plan.json"
    plan = PruningPlan.load(plan_file)
    other, _ = build_tiny(seed=0, name="tiny-instructblip-t5")
    plan.validate(adapter_for(other).groups())  # same group ids and unit counts: only the size tells them apart
    assert main(["prune", DEMO, "--plan", str(plan_file), f"output_dir={tmp_path}", "name=c",
                 "model.source=tiny-instructblip-t5"]) == 2
    err = capsys.readouterr().err.strip()
    total = sum(p.numel() for p in other.parameters())
    assert len(err.splitlines()) == 1
    assert f"{plan.meta['total_params']:,} parameters (blip-2)" in err and f"{total:,} (instructblip)" in err
    assert not (tmp_path / "c" / "prune" / "plan.json").exists()


# ------------------------------------------------------------------------ item 2: Ctrl-C during caption scoring
_FAKE_METEOR = "import pathlib, sys, time; sys.stdin.readline(); pathlib.Path(sys.argv[1]).touch(); time.sleep(60)"
_CHILD = """
import signal, subprocess, sys, threading
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even when pytest runs in the background
from pycocoevalcap.meteor import meteor

def fake_init(self):  # METEOR's java stand-in: reads the first SCORE line, then never answers
    self.meteor_p = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    self.lock = threading.Lock()

meteor.Meteor.__init__ = fake_init  # the real compute_score and __del__ (with their lock) stay
from ukmp import cli
from ukmp.eval.metrics import _caption_scorers

class Bar:
    def update(self, n): pass
    def set_postfix_str(self, s): pass

cli._cmd_inspect = lambda args: _caption_scorers({"0": ["a cat sits"]}, {"0": ["a cat sat"]}, False, Bar())
sys.exit(cli.main(["inspect", "tiny"]))
"""


def test_ctrl_c_while_meteor_scores_exits_130_promptly(tmp_path):
    mark = tmp_path / "meteor_waiting"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, _FAKE_METEOR, str(mark)], start_new_session=True,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not mark.exists():  # METEOR holds its lock and waits for an answer
            assert child.poll() is None and time.monotonic() < deadline, "the scorer never reached METEOR"
            time.sleep(0.05)
        t0 = time.monotonic()
        os.kill(child.pid, signal.SIGINT)
        try:
            rc = child.wait(timeout=15)  # before: hung in Meteor.__del__ (its lock) until a second Ctrl-C
        except subprocess.TimeoutExpired:
            pytest.fail("Ctrl-C during METEOR: still running 15 s later")
        assert rc == 130 and time.monotonic() - t0 < 15
        assert "interrupted" in child.stderr.read()
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


# ---------------------------------------------------------------------- errors that stopped one step short, GGUF
def test_finetune_before_prune_says_to_prune_first(tmp_path, capsys):
    assert main(["finetune", DEMO, f"output_dir={tmp_path}", "name=n"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run `ukmp prune CONFIG` first" in err  # was "plan file not found"


def test_gguf_directory_without_gguf_file_names_the_setting(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "smol.gguf").write_bytes(b"GGUF")
    assert main(["prune", DEMO, f"output_dir={tmp_path}", f"model.source={tmp_path / 'm'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "set model.gguf_file=smol.gguf" in err  # was "config.json missing"
    assert main(["inspect", str(tmp_path / "m")]) == 2
    assert f"ukmp inspect {tmp_path / 'm' / 'smol.gguf'}" in capsys.readouterr().err


def test_pruned_model_as_source_gives_the_cli_command(pruned, tmp_path, capsys):
    model = pruned / "magnitude" / "prune" / "model"
    assert main(["prune", DEMO, f"output_dir={tmp_path}", f"model.source={model}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"ukmp eval CONFIG --model {model}" in err and "load_pruned" not in err


def _write_tiny_gguf(path: Path) -> None:
    gguf = pytest.importorskip("gguf")  # the realparts extra (make realparts-install)
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(100)
    w.add_tensor("token_embd.weight", np.zeros((100, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_inspect_reads_a_gguf_file(tmp_path, capsys):
    from transformers import LlamaConfig

    from ukmp.inspect import inspect_model
    from ukmp.models.build import build_model

    _write_tiny_gguf(tmp_path / "m.gguf")
    report = inspect_model(tmp_path / "m.gguf")
    kinds = report["group_kinds"]
    assert (kinds["lm_heads"]["layers"], kinds["lm_heads"]["units_per_layer"], kinds["lm_mlp"]["units_per_layer"]) \
        == (2, 2, 64)  # 2 layers, 4 query heads in 2 KV groups, 64 MLP channels
    same = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True)  # no output.weight
    assert report["parameters"]["total"] == sum(p.numel() for p in build_model(same, device="meta").parameters())
    assert main(["inspect", str(tmp_path / "m.gguf")]) == 0


def test_the_ceiling_check_reads_a_gguf_header(tmp_path):
    """check_ceiling reads a GGUF model's structure as inspect does (header only): 2 layers x (2 KV groups + 64
    channels) leave 1 of each, so 0.99 is refused and 0.1 passes; an unreadable file is left to the model load."""
    from ukmp.config import load_config
    from ukmp.pipeline import check_ceiling

    _write_tiny_gguf(tmp_path / "m.gguf")
    over = [f"model.source={tmp_path}", "model.gguf_file=m.gguf"]
    with pytest.raises(ValueError, match=r"prune.ratio: 0.99 cannot be reached .* removes 0\.[0-9]+ of its param"):
        check_ceiling(load_config([DEMO], [*over, "prune.ratio=0.99"]))
    check_ceiling(load_config([DEMO], [*over, "prune.ratio=0.1"]))
    (tmp_path / "bad.gguf").write_bytes(b"GGUF")  # cut short inside the header
    check_ceiling(load_config([DEMO], [f"model.source={tmp_path}", "model.gguf_file=bad.gguf", "prune.ratio=0.99"]))
    with pytest.raises(ValueError, match=r"bad.gguf: not a readable GGUF file"):  # inspect: one line, no traceback
        from ukmp.inspect import gguf_config

        gguf_config(tmp_path / "bad.gguf")


# ------------------------------------------------------------------------------------- results.md, plots, demo
@pytest.mark.parametrize("tasks, says_scorer", [(("perplexity",), False), (("perplexity", "okvqa"), True)])
def test_results_md_names_the_vqa_scorer_only_with_vqa_and_no_token_counts(tmp_path, tasks, says_scorer):
    from ukmp.config import load_config
    from ukmp.io import atomic_write_json
    from ukmp.pipeline import write_results
    from ukmp.stages import StageRecord

    cfg = load_config([DEMO], [f"output_dir={tmp_path}"])
    root = tmp_path / "demo"
    metrics = {"perplexity": {"perplexity": 14.7, "nll": 2.69, "tokens": 4096},
               "okvqa": {"accuracy": 30.0, "count": 8}}
    atomic_write_json(root / "eval_dense" / "metrics.json", {t: metrics[t] for t in tasks})
    atomic_write_json(root / "prune" / "summary.json", {"achieved_ratio": 0.5})
    records = {s: StageRecord(s, root / s, "h", "r", False, 1.0, {}) for s in ("eval_dense", "prune")}
    write_results(cfg, root, records)
    md = (root / "results.md").read_text()
    assert ("lavis scorer" in md) is says_scorer
    assert "| perplexity | perplexity |" in md and "| nll |" in md and "tokens" not in md


def test_loss_plot_one_colour_per_sub_stage_across_panels(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from ukmp.recover.train import save_loss_plot

    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    log = [{"stage": s, "global_step": s + 1, "loss": 1.0 + s, "parts_rank0": parts}
           for s, parts in ((0, {"mse_vision": 5.0}), (1, {"mse_vision": 4.0}), (6, {"ce": 2.0, "kl": 1.0}))]
    save_loss_plot(log, tmp_path / "loss.png")
    colours: dict[str, set] = {}
    for ax in figs[0].axes:
        for line in ax.get_lines():
            colours.setdefault(line.get_label(), set()).add(line.get_color())
    assert set(colours) == {"sub-stage 1", "sub-stage 2", "sub-stage 7"}
    assert all(len(c) == 1 for c in colours.values()), colours  # was: sub-stage 7 in C2 on "loss", C0 on "ce"
    assert len({next(iter(c)) for c in colours.values()}) == 3  # and the sub-stages tell apart


def test_comparison_plot_is_a_grid_with_readable_labels(tmp_path):
    import matplotlib.image

    from ukmp.compare import DEFAULT_METHODS, plot_comparison

    tasks = ["okvqa", "gqa", "vqav2", "nocaps", "flickr30k"]
    metrics = {"okvqa": {"accuracy": 30.0}, "gqa": {"accuracy": 20.0}, "vqav2": {"accuracy": 40.0},
               "nocaps": {"cider": 3.5}, "flickr30k": {"r_mean": 50.0}}
    rows = {m: {"pruned": metrics, "recovered": metrics} for m in DEFAULT_METHODS}
    titles = plot_comparison(rows, metrics, tasks, tmp_path / "c.png", "t")
    assert titles == ["okvqa (accuracy)", "gqa (accuracy)", "vqav2 (accuracy)", "nocaps (cider)",
                      "flickr30k (r_mean)"]
    height, width = matplotlib.image.imread(tmp_path / "c.png").shape[:2]
    # was one 5-panel row, 3,547 x 462 px for nine methods (7.7 : 1): scaled to a page, 6 pt labels vanish
    assert width / height < 2.5 and height >= 800, (width, height)


def test_compare_evaluates_the_dense_model_once_across_ratios(tmp_path, caplog):
    over = [DEMO, f"output_dir={tmp_path}", "eval.after_prune=[gqa]", "eval.max_samples=4", "--methods", "random"]
    with caplog.at_level(logging.INFO, logger="ukmp.stages"):
        assert main(["compare", *over, "--ratio", "0.3"]) == 0
        assert main(["compare", *over, "--ratio", "0.4"]) == 0  # was: a second dense evaluation
        second = json.loads((tmp_path / "demo_compare_0.4" / "comparison.json").read_text())
        assert main(["compare", *over, "eval.num_beams=1", "--ratio", "0.4"]) == 0  # what it depends on changed
    dense = [r.getMessage().split(" ")[2] for r in caplog.records if r.getMessage().startswith("stage eval_dense:")]
    assert [m for m in dense if m in ("running", "up")] == ["running", "up", "running"], dense
    first = json.loads((tmp_path / "demo_compare_0.3" / "comparison.json").read_text())
    assert first["dense"] == second["dense"]


def test_structure_demo_generates_visible_text(tmp_path):
    from ukmp.demo import run_demo

    summary = run_demo(tmp_path, ratio=0.5, seed=0)  # the default ratio: greedy picks fell on unspellable rows
    assert len(summary["generated"][0].strip()) >= 4, summary["generated"]


def test_make_demo_ends_on_a_short_summary_and_the_result_paths(tmp_path, capsys, monkeypatch):
    from ukmp import pipeline

    metrics = {"okvqa": {"accuracy": 12.5, "count": 8}, "nocaps": {"cider": 3.25, "bleu_4": 1.0}}
    out = {"name": "demo", "method": "ukmp", "target_ratio": 0.5, "achieved_ratio": 0.5012,
           "metrics": {"dense": metrics, "pruned": {"okvqa": {"accuracy": 0.0}}, "recovered": metrics}}
    monkeypatch.setattr(pipeline, "run", lambda cfg, **kw: out)  # the full pipeline is `make demo`'s 20-50 s
    assert main(["demo", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) <= 6, lines  # was the 120-line JSON of every metric
    assert lines[0] == "demo: ukmp removed 50.1 % of the parameters (target 50 %)"
    assert lines[2].split() == ["okvqa", "accuracy", "12.50", "0.00", "12.50"]
    assert lines[3].split() == ["nocaps", "cider", "3.25", "–", "3.25"]
    assert lines[-1] == f"full results: {tmp_path / 'demo' / 'results.md'}  {tmp_path / 'demo' / 'results.json'}"


# ------------------------------------------------------------------- stranded checkpoints of an older recovery
def test_finetune_names_stale_work_dirs_and_deletes_only_its_own(pruned, tmp_path, caplog):
    stale = tmp_path / "n" / "finetune.work" / "0123456789abcdef" / "train"
    stale.mkdir(parents=True)
    (stale / "checkpoint.safetensors").write_bytes(b"x" * 2048)  # a run interrupted under another finetune.lr
    with caplog.at_level(logging.WARNING, logger="ukmp.recover.stage"):
        assert main(["finetune", DEMO, "--pruned", str(pruned / "magnitude" / "prune" / "model"),
                     f"output_dir={tmp_path}", "name=n", "finetune.max_steps_per_stage=1"]) == 0
    lines = [r.getMessage() for r in caplog.records if "interrupted recovery" in r.getMessage()]
    assert len(lines) == 1 and "0123456789abcdef" in lines[0]  # was: nothing said
    assert (stale / "checkpoint.safetensors").is_file()  # not this run's to delete
    assert [p.name for p in (tmp_path / "n" / "finetune.work").iterdir()] == ["0123456789abcdef"]  # its own: gone
