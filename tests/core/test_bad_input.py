"""Hostile inputs through the CLI entry point, in-process: each is exit code 2 (130 for Ctrl-C), exactly one line on
stderr naming the field or file, no traceback, and nothing half-written left on disk."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch

from ukmp.cli import main

DEMO = str(resources.files("ukmp") / "configs" / "demo.yaml")
FAST = ["prune.num_samples=2", "prune.batch_size=2"]
PROGRESS = re.compile(r"\d+%\|")  # a progress bar (tqdm) is not a message


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


def fails(capsys, argv, *needles, code: int = 2) -> str:
    """Run the CLI; assert the exit code, one stderr line holding every needle, no traceback; return the line."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    if os.environ.get("UKMP_SHOW_ERRORS"):
        sys.__stderr__.write(f"{rc} {err.strip()}\n")
    assert "Traceback" not in err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and not PROGRESS.search(ln)]
    assert rc == code, (rc, lines)
    assert len(lines) == 1, lines
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def leftovers(root: Path) -> list[str]:
    """Files (and temporary entries) under ``root`` other than the cached sample data."""
    if not root.exists():
        return []
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if rel.parts[0] == "_sample_data":
            continue
        if p.is_file() or p.name.endswith((".tmp", ".lock", ".old")):
            out.append(str(rel))
    return out


# ------------------------------------------------------------------------------------------ config values
CONFIG_CASES = [
    ("prune.units_per_step=0", "prune.units_per_step"),
    ("prune.fine_units_per_step=-3", "prune.fine_units_per_step"),
    ("prune.max_group_prune_ratio=1.5", "prune.max_group_prune_ratio"),
    ("prune.ratio=1.5", "prune.ratio"),
    ("prune.ratio=-0.1", "prune.ratio"),
    ("prune.ratio=half", "prune.ratio"),  # wrong type
    ("prune.threshold=0", "prune.threshold"),
    ("prune.ratoi=0.3", "ratoi"),  # misspelt key
    ("prune.scope=everywhere", "prune.scope"),
    ("prunee.ratio=0.3", "prunee"),  # unknown section
    ("prune.options.bogus.k=1", "prune.options.bogus"),
    ("finetune.lr=-1", "finetune.lr"),
    ("finetune.lr=0", "finetune.lr"),
    ("finetune.checkpoint_every=0", "finetune.checkpoint_every"),
    ("finetune.grad_accum=0", "finetune.grad_accum"),
    ("finetune.dropout=1.0", "finetune.dropout"),
    ("finetune.r=0", "finetune.r"),
    ("finetune.enabled=maybe", "finetune.enabled"),
    ("model.device=gpu0", "model.device"),
    ("model.dtype=float8", "model.dtype"),
    ("data.image_size=-224", "data.image_size"),
    ("data.max_text_tokens=0", "data.max_text_tokens"),
    ("eval.num_beams=0", "eval.num_beams"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("eval.datasets.bogus=x.yaml", "eval.datasets"),
    ("eval.after_prune=[okvqa,nope]", "eval.after_prune"),
    ("name=../escape", "name"),
    ("name=/abs/run", "name"),
    ("name=", "name"),
    ("noequals", "noequals"),  # neither a file nor key=value
]


@pytest.mark.parametrize("override,needle", CONFIG_CASES)
def test_bad_config_value_is_one_line_before_any_work(tmp_path, capsys, override, needle):
    fails(capsys, ["prune", DEMO, f"output_dir={tmp_path / 'out'}", override], needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command,override,needle", [
    ("run", "prune.units_per_step=0", "prune.units_per_step"),
    ("run", "finetune.lr=-1", "finetune.lr"),
    ("finetune", "finetune.checkpoint_every=0", "finetune.checkpoint_every"),
    ("eval", "eval.num_beams=0", "eval.num_beams"),
    ("eval", "eval.datasets.vqa=x.yaml", "eval.datasets"),
])
def test_other_commands_validate_first(tmp_path, capsys, command, override, needle):
    fails(capsys, [command, DEMO, f"output_dir={tmp_path / 'out'}", override], needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(tmp_path, capsys):
    fails(capsys, ["prune", DEMO, f"output_dir={tmp_path}", "model.device=cuda"], "model.device", "CUDA")


def test_validation_happens_before_torch_is_imported(tmp_path):
    """The whole path from argv to the one-line error runs without importing torch (so without any model)."""
    code = ("import sys; from ukmp.cli import main; "
            f"rc = main(['prune', {DEMO!r}, 'output_dir={tmp_path}', 'prune.max_group_prune_ratio=1.5']); "
            "assert rc == 2, rc; assert 'torch' not in sys.modules, 'torch imported'")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().startswith("ukmp prune: error: prune.max_group_prune_ratio")


def test_missing_calibration_data_is_found_before_torch_for_a_built_in_method(tmp_path):
    """A built-in method's need for calibration data comes from the torch-free traits table: UKMP's missing
    calibration file is one line before torch loads (it waited for the model before); a data-free method's
    command does not ask for it."""
    missing = tmp_path / "nothing.yaml"
    code = ("import sys; from ukmp.cli import main; "
            f"rc = main(['prune', {DEMO!r}, 'output_dir={tmp_path / 'o'}', 'data.calibration={missing}']); "
            "print('TORCH', 'torch' in sys.modules, 'RC', rc)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert "TORCH False RC 2" in proc.stdout, (proc.stdout, proc.stderr)
    assert proc.stderr.strip().startswith("ukmp prune: error: data.calibration") and "nothing.yaml" in proc.stderr
    from ukmp.cli import _load_cfg, build_parser
    from ukmp.preflight import Reach

    args = build_parser().parse_args(["prune", DEMO, f"output_dir={tmp_path / 'o'}", "prune.method=magnitude_sp",
                                      f"data.calibration={missing}"])
    assert _load_cfg(args, lambda c: Reach(prune=True)).prune.method == "magnitude_sp"  # not asked for: no error


def test_config_lists_mirror_their_sources():
    """config.EVAL_TASKS and OPTION_NAMESPACES repeat names other modules own (so validation needs no torch)."""
    import ukmp.baselines
    from ukmp.config import EVAL_TASKS, OPTION_NAMESPACES
    from ukmp.eval.stage import TASKS

    assert set(EVAL_TASKS) == set(TASKS)
    src = "".join(p.read_text() for p in Path(ukmp.baselines.__file__).parent.glob("*.py"))
    used = set(re.findall(r"read_options\(pc\.options, \"(\w+)\"", src))
    assert used == set(OPTION_NAMESPACES)


# ------------------------------------------------------------------------------------------ config files
def test_config_file_cases(tmp_path, capsys):
    lst = tmp_path / "list.yaml"
    lst.write_text("- prune\n- ratio\n")
    fails(capsys, ["prune", lst], "list.yaml", "mapping")
    broken = tmp_path / "broken.yaml"
    broken.write_text("prune: {ratio: [0.3\n")
    fails(capsys, ["prune", broken], "broken.yaml", "YAML")
    fails(capsys, ["prune", tmp_path / "missing.yaml"], "missing.yaml")
    typo = tmp_path / "typo.yaml"
    typo.write_text("prune:\n  ratoi: 0.3\n")
    fails(capsys, ["prune", typo], "typo.yaml", "ratoi")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.yaml", "list.yaml", "typo.yaml"]


def test_ratio_flags(tmp_path, capsys):
    fails(capsys, ["compare", DEMO, f"output_dir={tmp_path / 'out'}", "--ratio", "2"], "--ratio")
    fails(capsys, ["plan", "--scores", tmp_path / "s.safetensors", "--ratio", "1.0"], "--ratio")
    fails(capsys, ["plan", "--scores", tmp_path / "s.safetensors", "--ratio", "0.3", "--units-per-step", "0"],
          "--units-per-step")
    fails(capsys, ["plan", "--scores", tmp_path / "s.safetensors", "--ratio", "0.3", "--width-multiple", "0"],
          "--width-multiple: must be >= 1")
    fails(capsys, ["compare", DEMO, f"output_dir={tmp_path / 'out'}", "--methods", "ukmp,nope"], "prune.method")
    assert not (tmp_path / "out").exists()


def test_unknown_method_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import ukmp.prune.stage

    monkeypatch.setattr(ukmp.prune.stage, "load_dense", lambda *a, **k: pytest.fail("model loaded"))
    fails(capsys, ["prune", DEMO, f"output_dir={tmp_path}", "prune.method=bogus"], "prune.method", "bogus")
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------ model sources
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from ukmp.models.build import build_tiny

    d = tmp_path_factory.mktemp("tiny_dense")
    model, processor = build_tiny(seed=0)
    model.save_pretrained(str(d))
    processor.save_pretrained(str(d))
    return d


def _copy_config(src: Path, dst: Path, **changes) -> Path:
    dst.mkdir(parents=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_model_source_cases(tmp_path, capsys, tiny_dir):
    out = tmp_path / "out"

    def prune(source, *needles):
        fails(capsys, ["prune", DEMO, f"output_dir={out}", f"model.source={source}", *FAST], *needles)

    prune(tmp_path / "no" / "such" / "dir", "no such model directory")
    prune("./nowhere", "nowhere")
    prune("not-a-cached-hub-model", "not-a-cached-hub-model", "cannot load")
    prune(_copy_config(tiny_dir, tmp_path / "no_weights"), "no_weights", "model.safetensors")
    bert = _copy_config(tiny_dir, tmp_path / "bert", model_type="bert")
    (bert / "model.safetensors").write_bytes(b"")
    prune(bert, "bert", "config.json", "model_type", "supported", "blip-2")
    lst = tmp_path / "list.json"
    lst.write_text("[1, 2]")
    prune(lst, "list.json", "JSON object")
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    for f in tiny_dir.iterdir():
        (trunc / f.name).write_bytes(f.read_bytes())
    w = trunc / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    prune(trunc, "trunc")
    assert leftovers(out) == []


# ------------------------------------------------------------------------------------------ pruned models and scores
@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A pruned tiny model directory and a scores file of the tiny model (no calibration)."""
    from ukmp.config import ModelConfig
    from ukmp.io import dense_model_identity, save_pruned
    from ukmp.models import adapter_for
    from ukmp.models.blip2 import count_parameters
    from ukmp.models.build import build_tiny
    from ukmp.prune.allocate import AllocationConfig
    from ukmp.prune.scoring import ScoreResult
    from ukmp.prune.reuse import save_scores
    from ukmp.testing import random_plan

    root = tmp_path_factory.mktemp("pruned")
    model, processor = build_tiny(seed=0)
    identity = dense_model_identity(ModelConfig(source="tiny", seed=0), model)
    adapter = adapter_for(model)
    groups = adapter.groups()
    total = count_parameters(model)
    g = torch.Generator().manual_seed(0)
    scores = {gr.id: torch.rand(gr.n_units, generator=g) for gr in groups}
    save_scores(root / "scores.safetensors", ScoreResult(scores), model.config, total, AllocationConfig(), "ukmp")
    plan = random_plan(groups, seed=1)
    other = random_plan(groups, seed=2)
    adapter.apply_(model, plan)
    save_pruned(model, plan, root / "model", processor=processor, extra={"dense_model": identity})
    return root, plan, other


def _clone(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_pruned_model_cases(tmp_path, capsys, pruned):
    from ukmp.io import MARKER

    root, _plan, other = pruned
    out = tmp_path / "out"

    def evaluate(model_dir, *needles):
        fails(capsys, ["eval", DEMO, f"output_dir={out}", "--model", model_dir, "--tasks", "okvqa",
                       "--out", out / "ev"], *needles)

    d = _clone(root / "model", tmp_path / "truncated")
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    evaluate(d, "model.safetensors", "truncated")
    d = _clone(root / "model", tmp_path / "foreign")
    (d / "model.safetensors").write_bytes(b"this is no safetensors file")
    evaluate(d, "model.safetensors")
    d = _clone(root / "model", tmp_path / "mismatch")  # another plan, consistent digest: shapes disagree
    other.save(d / "plan.json")
    marker = json.loads((d / MARKER).read_text())
    (d / MARKER).write_text(json.dumps({**marker, "plan_digest": other.digest()}))
    evaluate(d, "model.safetensors", "plan.json")
    d = _clone(root / "model", tmp_path / "nomarker")
    (d / MARKER).unlink()
    evaluate(d, MARKER)
    d = _clone(root / "model", tmp_path / "badplan")
    (d / "plan.json").write_text('{"version": 1, "keep": ')
    evaluate(d, "plan.json")
    evaluate(tmp_path / "no_such_model", "no_such_model")
    assert not (out / "ev").exists()


def test_scores_and_plan_cases(tmp_path, capsys, pruned):
    from safetensors.torch import load_file, save_file

    root = pruned[0]
    scores = root / "scores.safetensors"

    def plan(path, *extra_and_needles, ratio="0.3", out=None):
        extra = [a for a in extra_and_needles if str(a).startswith("--")]
        needles = [a for a in extra_and_needles if not str(a).startswith("--")]
        return fails(capsys, ["plan", "--scores", path, "--ratio", ratio, "--out", out or tmp_path / "p.json",
                              *extra], *needles)

    t = tmp_path / "truncated.safetensors"
    t.write_bytes(scores.read_bytes()[:200])
    plan(t, "truncated.safetensors")
    f = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(f))
    plan(f, "foreign.safetensors", "format")
    from safetensors import safe_open

    with safe_open(str(scores), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(scores))
    dropped = sorted(k for k in tensors if k.startswith("scores/"))[0]
    m = tmp_path / "missing_group.safetensors"
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(m), metadata=meta)
    plan(m, "missing_group.safetensors", dropped.split("/", 1)[1])
    plan(tmp_path / "none.safetensors", "none.safetensors")
    # every group at its floor before 0.95 of the whole model is removed
    line = plan(scores, "cannot be reached", "allow-shortfall", ratio="0.95")
    assert not (tmp_path / "p.json").exists()
    assert main(["plan", "--scores", str(scores), "--ratio", "0.95", "--out", str(tmp_path / "p.json"),
                 "--allow-shortfall"]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["meta"]["reached_target"] is False
    assert main(["plan", "--scores", str(scores), "--ratio", "0.3", "--out", str(tmp_path / "ok.json")]) == 0
    capsys.readouterr()
    (tmp_path / "adir").mkdir()
    plan(scores, "adir", "a file was expected", out=tmp_path / "adir")
    assert "--allow-shortfall" in line


def test_prune_shortfall_fails_unless_allowed(tmp_path, capsys):
    over = [f"output_dir={tmp_path}", "prune.method=random", "prune.ratio=0.95", "prune.max_group_prune_ratio=0.5"]
    fails(capsys, ["prune", DEMO, *over], "cannot be reached", "prune.allow_shortfall")
    assert leftovers(tmp_path) == []
    assert main(["prune", DEMO, *over, "prune.allow_shortfall=true"]) == 0
    summary = json.loads((tmp_path / "demo" / "prune" / "summary.json").read_text())
    assert summary["achieved_ratio"] < 0.95


# ------------------------------------------------------------------------------------------ outputs
def test_output_paths(tmp_path, capsys, monkeypatch, pruned):
    from ukmp.io import save_pruned
    from ukmp.models.build import build_tiny

    afile = tmp_path / "afile"
    afile.write_text("keep me")
    fails(capsys, ["prune", DEMO, f"output_dir={afile}", "prune.method=random"], "afile")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").write_text("keep me too")
    fails(capsys, ["prune", DEMO, f"output_dir={tmp_path / 'runs'}", "prune.method=random"], "demo")
    assert afile.read_text() == "keep me" and (tmp_path / "runs" / "demo").read_text() == "keep me too"
    # a read-only output directory (simulated: the tests may run as root, who ignores permissions)
    ro = tmp_path / "readonly"
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if str(self).startswith(str(ro)):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    fails(capsys, ["prune", DEMO, f"output_dir={ro}", "prune.method=random"], "readonly", "Permission denied")
    monkeypatch.undo()
    # save_pruned refuses a file or a foreign directory instead of deleting it
    _root, plan, _other = pruned
    model, _ = build_tiny(seed=0)
    from ukmp.models import adapter_for

    adapter_for(model).apply_(model, plan)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    for target in (foreign, afile):
        with pytest.raises(FileExistsError, match=target.name):
            save_pruned(model, plan, target)
    assert (foreign / "cat.jpg").read_bytes() == b"\xff\xd8" and afile.read_text() == "keep me"
    save_pruned(model, plan, tmp_path / "empty_ok")  # not vacuous: a new directory is fine, and so is replacing it
    save_pruned(model, plan, tmp_path / "empty_ok")
    assert (tmp_path / "empty_ok" / "ukmp.json").is_file()


# ------------------------------------------------------------------------------------------ data
def _dataset(tmp_path: Path, name: str, annotations: bytes | str, fmt: str = "cc595k", image: bytes | None = None):
    d = tmp_path / name
    (d / "images").mkdir(parents=True)
    ann = d / "ann.json"
    ann.write_bytes(annotations if isinstance(annotations, bytes) else annotations.encode())
    (d / "images" / "a.png").write_bytes(image if image is not None else _png())  # an empty folder fails first
    y = d / "data.yaml"
    y.write_text(f"format: {fmt}\nroot: {d}\nimages: images\nannotations: ann.json\n")
    return y


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buf, format="PNG")
    return buf.getvalue()


def test_calibration_data_cases(tmp_path, capsys, monkeypatch):
    import ukmp.prune.stage

    out = tmp_path / "out"
    rec = [{"id": "1", "image": "a.png", "caption": "a red square"}] * 2
    dense = ukmp.prune.stage.load_dense
    loads = []
    monkeypatch.setattr(ukmp.prune.stage, "load_dense", lambda *a, **k: loads.append(1) or dense(*a, **k))
    cases = [
        (tmp_path / "missing.yaml", ["missing.yaml"]),
        (_dataset(tmp_path, "latin1", json.dumps(rec).replace("red", "r\u00e9d").encode("latin-1")), ["ann.json",
                                                                                                    "UTF-8"]),
        (_dataset(tmp_path, "malformed", '[{"id": "1",'), ["ann.json", "JSON"]),
        (_dataset(tmp_path, "notlist", '{"id": "1"}'), ["ann.json", "list"]),
        (_dataset(tmp_path, "empty", "[]"), ["data.calibration"]),
        (_dataset(tmp_path, "schema", json.dumps([{"id": "1", "img": "a.png"}])), ["ann.json", "record 0"]),
        (_dataset(tmp_path, "badformat", json.dumps(rec), fmt="cc3m"), ["data.yaml", "format"]),
    ]
    toplist = tmp_path / "toplist.yaml"
    toplist.write_text("- format: cc595k\n")
    cases.append((toplist, ["toplist.yaml", "mapping"]))
    for spec, needles in cases:
        fails(capsys, ["prune", DEMO, f"output_dir={out}", f"data.calibration={spec}", *FAST], *needles)
    assert loads == []  # all of them before the model loads
    for name, image, needle in (("truncated", _png()[:40], "a.png"), ("notimage", b"GIF? no: plain text", "a.png")):
        y = _dataset(tmp_path, name, json.dumps(rec), image=image)
        fails(capsys, ["prune", DEMO, f"output_dir={out}", f"data.calibration={y}", *FAST], needle, "image")
    assert leftovers(out) == []


# ------------------------------------------------------------------------------------------ runs, stages, signals
def test_stale_tmp_removed_and_lock_refuses(tmp_path, capsys):
    from ukmp.stages import stage_lock

    over = [f"output_dir={tmp_path}", "prune.method=random"]
    stale = tmp_path / "demo" / ".prune.deadbeef.tmp"
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "model.safetensors").write_bytes(b"half")
    with stage_lock(tmp_path / "demo" / "prune"):
        fails(capsys, ["prune", DEMO, *over], "another run", "prune")
        assert stale.is_dir()  # the lock holder's business, not the refused run's
    assert main(["prune", DEMO, *over]) == 0
    assert not stale.exists() and not list((tmp_path / "demo").glob(".*"))
    assert (tmp_path / "demo" / "prune" / "stage.json").is_file()


def test_ctrl_c_is_one_line_and_130(tmp_path, capsys, monkeypatch):
    import ukmp.prune.stage

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ukmp.prune.stage, "load_dense", interrupted)
    fails(capsys, ["prune", DEMO, f"output_dir={tmp_path}", "prune.method=random"], "interrupted", code=130)
    assert leftovers(tmp_path) == []


def test_eval_failing_on_one_task_leaves_no_partial_metrics(tmp_path, capsys, pruned):
    root = pruned[0]
    out = tmp_path / "ev"
    bad = tmp_path / "gqa.yaml"
    bad.write_text("format: gqa\nimages: nowhere\nannotations: none.json\n")
    fails(capsys, ["eval", DEMO, f"output_dir={tmp_path}", f"eval.datasets.gqa={bad}", "eval.max_samples=2",
                   "--model", root / "model", "--tasks", "okvqa,gqa", "--out", out], "images")
    assert not (out / "metrics.json").exists() and not list(out.rglob("*.json")) and not list(out.glob(".*"))
    # not vacuous: the same evaluation without the bad task writes both levels
    assert main(["eval", DEMO, f"output_dir={tmp_path}", "eval.max_samples=2", "--model", str(root / "model"),
                 "--tasks", "okvqa", "--out", str(out)]) == 0
    assert (out / "metrics.json").is_file() and (out / "okvqa" / "metrics.json").is_file()


def test_retrieval_model_offline(tmp_path, capsys, pruned):
    fails(capsys, ["eval", DEMO, f"output_dir={tmp_path}", "eval.max_samples=2", "eval.retrieval_model=nobody/nothing",
                   "--model", pruned[0] / "model", "--tasks", "flickr30k", "--out", tmp_path / "ev"],
          "eval.retrieval_model", "nobody/nothing")
    assert not list((tmp_path / "ev").rglob("*.json"))


def test_finetune_refuses_a_teacher_that_is_not_the_origin(tmp_path, capsys, pruned, monkeypatch):
    import ukmp.recover.stage

    model_dir = pruned[0] / "model"
    monkeypatch.setattr(ukmp.recover.stage, "load_dense", lambda *a, **k: pytest.fail("model loaded"))
    fails(capsys, ["finetune", DEMO, f"output_dir={tmp_path}", "model.seed=1", "--pruned", model_dir],
          "ukmp.json", "seed 0", "seed 1")
    fails(capsys, ["finetune", DEMO, f"output_dir={tmp_path}", "model.source=mid", "--pruned", model_dir],
          "ukmp.json", "'mid'")
    assert leftovers(tmp_path) == []


def test_finetune_refuses_a_teacher_with_other_weights(tmp_path, capsys, pruned):
    """Same source and seed on paper, other weights (a re-trained checkpoint under the same path): the fingerprint."""
    from ukmp.io import MARKER

    d = _clone(pruned[0] / "model", tmp_path / "model")
    marker = json.loads((d / MARKER).read_text())
    marker["dense_model"]["fingerprint"] = "0123456789abcdef"
    (d / MARKER).write_text(json.dumps(marker))
    fails(capsys, ["finetune", DEMO, f"output_dir={tmp_path / 'out'}", "--pruned", d], "ukmp.json",
          "not the dense model")
    assert leftovers(tmp_path / "out") == []


def test_fingerprint_names_the_weights_not_the_dtype():
    from ukmp.io import cast_, fingerprint
    from ukmp.models.build import build_tiny

    a, _ = build_tiny(seed=0)
    b, _ = build_tiny(seed=1)
    assert fingerprint(a) != fingerprint(b)
    fa = fingerprint(a)
    cast_(a, torch.bfloat16)
    assert fingerprint(a) == fa


def test_sample_data_killed_half_way_is_regenerated(tmp_path):
    from ukmp.runtime import resolve_dataset, sample_root

    first = resolve_dataset("sample:cc595k", tmp_path)
    root = sample_root(tmp_path)
    (root / ".complete").unlink()  # as if killed before the generation finished
    stray = root / "configs" / ".vqav2.yaml.abc123.tmp"
    stray.write_text("half")
    (root / "configs" / "vqav2.yaml").unlink()
    assert resolve_dataset("sample:cc595k", tmp_path) == first
    assert not stray.exists() and (root / "configs" / "vqav2.yaml").is_file() and (root / ".complete").is_file()
