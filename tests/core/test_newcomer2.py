"""A new user's path, round 2 (issue 24, part A): every task checked against the model family and every dataset
against its purpose before any work, commands that run stages need a config file, YAML's booleans in enum values,
the tiny overlay (configs/tiny.yaml) for every shipped config and script, --threads, and --help that is complete
and fast."""

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch

from ukmp.cli import build_parser, main
from ukmp.config import ConfigError, load_config

DEMO = str(resources.files("ukmp") / "configs" / "demo.yaml")
ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = str(ROOT / "configs" / "tiny.yaml")


def refused(capsys, argv, *needles) -> str:
    """``ukmp argv`` exits 2 with one stderr line holding every needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def run_configs() -> list[Path]:
    """Every run config under configs/ (dataset YAMLs, which have a ``format`` key, are not run configs)."""
    out = []
    for p in sorted((ROOT / "configs").rglob("*.yaml")):
        if p.name != "tiny.yaml" and "format:" not in p.read_text():
            out.append(p)
    return out


# -------------------------------------------------------------------- 1: tasks against the model family
def test_a_task_the_family_cannot_run_is_refused_before_any_stage(tmp_path, capsys):
    """LLaVA has no image-text matching head: flickr30k is refused in one line naming task and family, before the
    prune stage (it used to crash in the evaluation after prune, with an AttributeError)."""
    err = refused(capsys, ["run", DEMO, f"output_dir={tmp_path}", "model.source=tiny-llava", "eval.dense=false",
                           "finetune.enabled=false", "eval.after_prune=[okvqa,flickr30k]"], "flickr30k", "LLaVA")
    assert "eval.after_prune" in err
    assert not (tmp_path / "demo").exists()
    refused(capsys, ["run", DEMO, f"output_dir={tmp_path}", "model.source=tiny-llama"], "okvqa", "vision tower")
    refused(capsys, ["run", DEMO, f"output_dir={tmp_path}", "eval.after_prune=[perplexity]"],  # BLIP-2 FlanT5
            "perplexity", "decoder-only")
    assert not (tmp_path / "demo").exists()


def test_family_configs_list_only_what_their_family_runs(monkeypatch):
    """The shipped LLaVA config does not inherit flickr30k; InstructBLIP keeps it (its ViT fits the BLIP-2 matching
    model, and the tiny retrieval model is now built for it)."""
    from ukmp.preflight import check_reach, pipeline_reach

    monkeypatch.chdir(ROOT)
    llava = load_config([ROOT / "configs" / "llava" / "llava_ukmp_0.2.yaml", TINY_YAML])
    assert "flickr30k" not in llava.eval.after_finetune and llava.eval.after_finetune
    for path in run_configs():
        cfg = load_config([path, TINY_YAML])
        check_reach(cfg, pipeline_reach(cfg))  # every task of every shipped config runs on its family


def test_instructblip_runs_flickr30k_with_a_tiny_retrieval_model():
    from ukmp.eval.retrieval import build_tiny_retrieval, transplant_vision_
    from ukmp.models.build import build_tiny

    model, _ = build_tiny(seed=0, name="tiny-instructblip-llama")
    retrieval, tok = build_tiny_retrieval(model.config)
    transplant_vision_(retrieval, model)
    assert retrieval.vision_model is model.vision_model


def test_the_eval_stage_checks_every_task_before_the_first(tmp_path):
    """A family known only once the model has loaded (no config offline) is checked before any task runs."""
    from ukmp.eval.stage import check_tasks
    from ukmp.models.build import build_tiny

    model, _ = build_tiny(seed=0, name="tiny-llava")
    check_tasks(model, ["okvqa", "gqa", "nocaps", "perplexity"])
    with pytest.raises(ValueError, match="'flickr30k': LLaVA cannot run it"):
        check_tasks(model, ["okvqa", "flickr30k"])


def test_family_tables_cover_the_registry_and_need_no_torch():
    from ukmp.data.config import FORMAT_KINDS
    from ukmp.data.loaders import LOADERS, TEXT_LOADERS
    from ukmp.eval.stage import TASKS
    from ukmp.models import families
    from ukmp.models.registry import LANGUAGE_MODELS, MODELS
    from ukmp.config import EVAL_TASK_KINDS

    assert set(MODELS) <= set(families.VISION_TASK_KINDS)
    assert set(LANGUAGE_MODELS) <= set(families.LANGUAGE_TASK_KINDS)
    assert {t.name: t.kind for t in TASKS.values()} == EVAL_TASK_KINDS
    assert set(FORMAT_KINDS) == set(LOADERS) | set(TEXT_LOADERS)
    code = ("import sys; from ukmp.models import families; from ukmp.preflight import check_reach; "
            "assert families.tiny_source('llava-hf/llava-1.5-7b-hf') == 'tiny-llava'; "
            "assert 'torch' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# -------------------------------------------------------------------------- 3: a config file is required
@pytest.mark.parametrize("argv", [["prune", "prune.ratio=0.3"], ["eval"], ["finetune"]])
def test_stage_commands_without_a_config_refuse(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    refused(capsys, argv, "no config file", "make demo", "configs/")
    assert not (tmp_path / "outputs").exists()  # nothing written into the demo's folder


# ------------------------------------------------------------------------------ 5: data against its task
@pytest.mark.parametrize("override, needles", [
    ("data.calibration={okvqa}", ("data.calibration", "'okvqa'", "VQA questions", "calibration needs")),
    ("eval.datasets.okvqa={nocaps}", ("eval.datasets.okvqa", "'nocaps'", "captioning references")),
    ("eval.datasets.nocaps={flickr30k}", ("eval.datasets.nocaps", "'flickr30k'", "retrieval")),
    ("data.finetune={text}", ("data.finetune", "plain text", "recovery needs")),
])
def test_a_dataset_given_for_the_wrong_task_is_refused_first(tmp_path, capsys, sample_data, override, needles):
    over = override.format(**{k: str(v) for k, v in sample_data.items()})
    refused(capsys, ["run", DEMO, f"output_dir={tmp_path}", over], *needles)
    assert not (tmp_path / "demo").exists()


def test_no_java_is_found_before_any_caption_is_generated(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    refused(capsys, ["run", DEMO, f"output_dir={tmp_path}", "eval.dense=false", "finetune.enabled=false",
                     "eval.after_prune=[gqa,nocaps]"], "java", "'nocaps'")
    assert not (tmp_path / "demo").exists()


# --------------------------------------------------------------------------------------- 7: fail early
def test_an_unknown_method_is_refused_before_the_dense_evaluation(tmp_path, capsys):
    refused(capsys, ["run", DEMO, f"output_dir={tmp_path}", "prune.method=ukmpp"], "prune.method", "ukmpp")
    assert not (tmp_path / "demo").exists()


def _dataset_yaml(tmp_path: Path, sample: Path, **changes) -> Path:
    data = {k: v for k, v in (ln.split(": ", 1) for ln in sample.read_text().splitlines() if ": " in ln)}
    data.update(changes)
    out = tmp_path / f"{sample.stem}_changed.yaml"
    out.write_text("".join(f"{k}: {v}\n" for k, v in data.items()))
    return out


def test_eval_data_is_checked_before_prune_and_finetune(tmp_path, capsys, sample_data):
    missing = _dataset_yaml(tmp_path, sample_data["gqa"], annotations="gqa/nothing_here.json")
    refused(capsys, ["run", DEMO, f"output_dir={tmp_path}", "eval.dense=false", f"eval.datasets.gqa={missing}"],
            "eval.datasets.gqa", "nothing_here.json")
    (tmp_path / "no_images").mkdir()
    empty = _dataset_yaml(tmp_path, sample_data["cc595k"], images=str(tmp_path / "no_images"))
    refused(capsys, ["prune", DEMO, f"output_dir={tmp_path}", f"data.calibration={empty}"],
            "data.calibration", "empty", "no_images")
    assert not (tmp_path / "demo").exists()


def test_a_ratio_above_the_structural_ceiling_is_refused_before_scoring(tmp_path, capsys):
    err = refused(capsys, ["run", DEMO, f"output_dir={tmp_path}", "prune.ratio=0.99"], "prune.ratio", "0.99")
    assert "cannot be reached on tiny" in err and "removes 0.6" in err
    assert not (tmp_path / "demo").exists()


def test_the_ceiling_follows_layers_scope_and_the_unit_budget():
    """The preflight's ceiling is the allocation's own limit: groups outside prune.layers are never pruned (their
    ceiling is far lower), local scope stops at max_group_prune_ratio, and prune.budget=units counts units, where a
    0.9 that the parameter count would refuse is reachable."""
    from ukmp.pipeline import check_ceiling, structural_ceiling

    def ceiling(*ov):
        cfg = load_config([DEMO], list(ov))
        check = structural_ceiling(cfg, _meta(cfg))[0]
        return cfg, check

    _, whole = ceiling()
    _, layers = ceiling("prune.layers={text_dec: '0:1'}")
    _, local = ceiling("prune.scope=local", "prune.max_group_prune_ratio=0.5")
    _, units = ceiling("prune.budget=units")
    assert 0.6 < whole < 0.7 and layers < whole / 2 and local < whole and units > 0.95, (whole, layers, local, units)
    with pytest.raises(ValueError, match=r"prune.ratio: 0.2 cannot .*only inside prune.layers\) removes 0.149"):
        check_ceiling(load_config([DEMO], ["prune.ratio=0.2", "prune.layers={text_dec: '0:1'}"]))
    check_ceiling(load_config([DEMO], ["prune.ratio=0.9", "prune.budget=units"]))  # reachable: no error
    with pytest.raises(ValueError, match=r"at most 0.5 of each group, leaving one\) removes 0.5000 of its units"):
        check_ceiling(load_config([DEMO], ["prune.ratio=0.6", "prune.budget=units", "prune.scope=local",
                                           "prune.max_group_prune_ratio=0.5"]))


def _meta(cfg):
    from ukmp.models.build import build_model, config_from_dict
    from ukmp.models.families import source_config

    return build_model(config_from_dict(dict(source_config(cfg.model.source)), cfg.model.source), device="meta",
                       seed=None)


def test_an_empty_last_recovery_sub_stage_is_found_before_training(tmp_path, capsys):
    """The demo's 8 images against sub-stages 1-6 taking 128 samples: sub-stage 7 would get none."""
    refused(capsys, ["run", DEMO, f"output_dir={tmp_path}", "finetune.final_stage_samples=0"],
            "finetune.final_stage_samples", "sub-stage 7", "has 8")
    assert not (tmp_path / "demo").exists()


# ------------------------------------------------------------------ 9: enum values YAML reads as booleans
def test_enum_values_that_yaml_reads_as_booleans(tmp_path):
    assert load_config([DEMO], ["finetune.mixed_precision=no"]).finetune.mixed_precision == "no"
    f = tmp_path / "c.yaml"
    f.write_text("finetune:\n  mixed_precision: no\n")
    assert load_config([DEMO, f]).finetune.mixed_precision == "no"
    with pytest.raises(ConfigError, match="finetune.mixed_precision"):
        load_config([DEMO], ["finetune.mixed_precision=yes"])  # no 'yes' among its choices


# ----------------------------------------------------------------------------- 11: the tiny overlay
@pytest.mark.parametrize("path", run_configs(), ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_loads_with_the_tiny_overlay(path, monkeypatch):
    from ukmp.models.families import TINY

    monkeypatch.chdir(ROOT)  # the shipped configs name their dataset YAMLs relative to the repository
    cfg = load_config([path, TINY_YAML])
    assert cfg.model.source in TINY and cfg.output_dir == "outputs/tiny"
    specs = [cfg.data.calibration, cfg.data.finetune, *cfg.eval.datasets.values()]
    assert all(s.startswith("sample:") for s in specs), specs


def test_the_tiny_overlay_maps_each_family_to_its_tiny_build(monkeypatch):
    monkeypatch.chdir(ROOT)
    expected = {"llava/llava_ukmp_0.2.yaml": "tiny-llava", "instructblip/instructblip_ukmp_0.2.yaml":
                "tiny-instructblip-llama", "blip2_opt_ukmp_0.5.yaml": "tiny-blip2-opt", "ukmp_0.5.yaml": "tiny",
                "causal_lm/smollm2_ukmp_0.2.yaml": "tiny-llama",
                "llava_onevision/llava_onevision_ukmp_0.2.yaml": "tiny-llava-onevision"}
    for rel, tiny in expected.items():
        cfg = load_config([ROOT / "configs" / rel, TINY_YAML])
        assert cfg.model.source == tiny, rel
    cfg = load_config([ROOT / "configs" / "causal_lm" / "smollm2_ukmp_0.2.yaml", TINY_YAML])
    assert cfg.data.calibration == "sample:text" and cfg.eval.datasets["perplexity"] == "sample:text"
    with pytest.raises(ConfigError, match="tiny: no tiny build"):
        load_config([DEMO, TINY_YAML], ["model.source=/nowhere/model"])


def _scripts() -> list[Path]:
    return sorted((ROOT / "scripts").rglob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("script", _scripts(), ids=lambda p: str(p.relative_to(ROOT / "scripts")))
def test_every_script_runs_on_the_tiny_overlay(script, tmp_path):
    """Each script to completion on its family's tiny model (about 2 min for all five on 1 thread, 2026-12-07)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(script), str(TINY_YAML), f"output_dir={tmp_path}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = list(tmp_path.rglob("results.json")) + list(tmp_path.rglob("comparison.json"))
    assert results, "no results written"
    if "compare" not in script.name:
        metrics = json.loads(results[0].read_text())["metrics"]
        assert set(metrics) == {"pruned", "recovered"}, metrics.keys()


# ------------------------------------------------------------------------- 12: --threads and --help
def test_threads_option(monkeypatch, capsys):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    try:
        assert main(["--threads", "2", "inspect", "tiny", "--json"]) == 0
        assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()
    assert main(["--threads", "0", "inspect", "tiny"]) == 2
    assert "--threads" in capsys.readouterr().err


def test_help_is_complete():
    parser = build_parser()
    assert "InstructBLIP" in parser.description and "LLaVA" in parser.description
    subs = next(a for a in parser._actions if a.dest == "command").choices
    for name, sp in subs.items():
        for action in sp._actions:
            assert action.help, (name, action.dest)
    tasks = next(a for a in subs["eval"]._actions if a.dest == "tasks")
    assert "perplexity" in tasks.help


def test_inspect_help_imports_no_torch():
    code = ("import sys, contextlib, io; from ukmp.cli import main\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    main(['inspect', '--help'])\n"
            "assert 'tiny-llava' in out.getvalue(); assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_a_data_free_method_never_checks_the_calibration_data(tmp_path, capsys, sample_data):
    """random and magnitude read no calibration batch: a calibration YAML whose image folder is empty does not stop
    them (the torch-free first check cannot know the method is data-free, so it leaves calibration to the second)."""
    empty = _dataset_yaml(tmp_path, sample_data["cc595k"], images=str(tmp_path / "no_images"))
    over = [f"output_dir={tmp_path}", f"data.calibration={empty}", "eval.after_prune=[gqa]"]
    assert main(["prune", DEMO, *over, "prune.method=random", "prune.ratio=0.3"]) == 0
    capsys.readouterr()
    refused(capsys, ["prune", DEMO, *over, "prune.method=ukmp", "name=u"], "data.calibration")  # UKMP reads it
