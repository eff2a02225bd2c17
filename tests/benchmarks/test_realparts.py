"""The real-weights testbed (benchmarks/realparts): the conversion math on synthetic weights (always), the
conversion of the real DINOv2 / SmolLM2 files (when the optional extra is installed, else skipped naming it), and the
pure parts of the build and of the quality report."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "realparts"))
sys.path.insert(0, str(ROOT / "benchmarks"))

assets = importlib.import_module("assets")
convert = importlib.import_module("convert")
MISSING = assets.missing_extra()
needs_extra = pytest.mark.skipif(MISSING is not None, reason=f"needs the optional extra {assets.EXTRA}: {MISSING}")


# ------------------------------------------------------------------------------------------ conversion math
def synthetic_dinov2(dim: int = 128, layers: int = 2, grid: int = 3, mlp: int = 256, seed: int = 0):
    """Random weights under the names ``read_onnx_backbone`` returns, LayerScale and key bias far from 1 / 0."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=0.05: torch.randn(*s, generator=g) * scale  # noqa: E731
    w = {"embeddings.cls_token": r(1, 1, dim, scale=0.5), "pos_cls": r(1, 1, dim, scale=0.5),
         "pos_patch": r(1, grid * grid, dim, scale=0.5),
         "embeddings.patch_embeddings.projection.weight": r(dim, 3, 14, 14),
         "embeddings.patch_embeddings.projection.bias": r(dim, scale=0.2),
         "layernorm.weight": 1 + r(dim, scale=0.2), "layernorm.bias": r(dim, scale=0.2)}
    for i in range(layers):
        s = f"encoder.layer.{i}."
        for name, (o, n) in {"attention.attention.query": (dim, dim), "attention.attention.key": (dim, dim),
                             "attention.attention.value": (dim, dim), "attention.output.dense": (dim, dim),
                             "mlp.fc1": (mlp, dim), "mlp.fc2": (dim, mlp)}.items():
            w[s + name + ".weight"] = r(o, n, scale=n ** -0.5)
            w[s + name + ".bias"] = r(o, scale=0.3)
        w[s + "attention.attention.key.bias"] = r(dim, scale=2.0)  # large: dropping it must still change nothing
        for k in ("norm1", "norm2"):
            w[s + k + ".weight"], w[s + k + ".bias"] = 1 + r(dim, scale=0.2), r(dim, scale=0.2)
        w[s + "layer_scale1.lambda1"] = r(dim, scale=0.5)
        w[s + "layer_scale2.lambda1"] = r(dim, scale=0.5)
    return w


def reference_dinov2(w, pixels_imagenet: torch.Tensor, grid: int) -> torch.Tensor:
    """DINOv2's forward written out (LayerScale, key bias, ImageNet-normalised input): the conversion's truth."""
    F = torch.nn.functional
    dim = w["embeddings.cls_token"].shape[-1]
    heads = dim // 64
    x = F.conv2d(pixels_imagenet, w["embeddings.patch_embeddings.projection.weight"],
                 w["embeddings.patch_embeddings.projection.bias"], stride=14).flatten(2).transpose(1, 2)
    x = torch.cat([w["embeddings.cls_token"].expand(len(x), -1, -1), x], 1)
    x = x + torch.cat([w["pos_cls"], convert.interpolate_positions(w["pos_patch"], grid)], 1)
    layers = 1 + max(int(k.split(".")[2]) for k in w if k.startswith("encoder.layer."))
    for i in range(layers):
        s = f"encoder.layer.{i}."
        lin = lambda h, n: F.linear(h, w[s + n + ".weight"], w[s + n + ".bias"])  # noqa: E731
        h = F.layer_norm(x, (dim,), w[s + "norm1.weight"], w[s + "norm1.bias"], 1e-6)
        q, k, v = (lin(h, f"attention.attention.{n}").view(len(h), -1, heads, 64).transpose(1, 2)
                   for n in ("query", "key", "value"))
        a = torch.softmax(q @ k.transpose(-1, -2) / 8.0, -1) @ v
        x = x + w[s + "layer_scale1.lambda1"] * lin(a.transpose(1, 2).reshape(len(h), -1, dim), "attention.output.dense")
        h = F.layer_norm(x, (dim,), w[s + "norm2.weight"], w[s + "norm2.bias"], 1e-6)
        x = x + w[s + "layer_scale2.lambda1"] * lin(F.gelu(lin(h, "mlp.fc1")), "mlp.fc2")
    return F.layer_norm(x, (dim,), w["layernorm.weight"], w["layernorm.bias"], 1e-6)


@pytest.mark.unit
def test_converted_vit_equals_the_dinov2_forward_on_synthetic_weights():
    """Tolerance 1e-4 absolute on outputs of max |x| ~ 3 (float32 rounding). Not vacuous: the conversion without
    the LayerScale fold, or without the normalisation fold, misses by more than 1e-2."""
    torch.manual_seed(0)
    w = synthetic_dinov2()
    size, grid = 28, 2  # the 3 x 3 table interpolated to 2 x 2
    pix01 = np.random.default_rng(0).random((2, size, size, 3), dtype=np.float32)
    truth = reference_dinov2(w, torch.from_numpy(convert.normalise(pix01, convert.IMAGENET_MEAN,
                                                                   convert.IMAGENET_STD)), grid)
    clip_in = torch.from_numpy(convert.normalise(pix01, convert.CLIP_MEAN, convert.CLIP_STD))
    with torch.no_grad():
        ours = convert.build_vision_model(w, size)(pixel_values=clip_in).last_hidden_state
        kept_bias = convert.build_vision_model(w, size, keep_key_bias=True)(pixel_values=clip_in).last_hidden_state
        unfolded = convert.build_vision_model(w, size, fold_normalisation=False)(pixel_values=clip_in).last_hidden_state
    assert (ours - truth).abs().max() <= 1e-4
    assert (ours - kept_bias).abs().max() <= 1e-4  # the key bias (|b_k| ~ 2) does not matter
    assert (unfolded - truth).abs().max() > 1e-2
    no_scale = {**w, **{k: torch.ones_like(v) for k, v in w.items() if "layer_scale" in k}}
    with torch.no_grad():
        wrong = convert.build_vision_model(no_scale, size)(pixel_values=clip_in).last_hidden_state
    assert (wrong - truth).abs().max() > 1e-2


@pytest.mark.unit
def test_position_interpolation_is_the_identity_at_the_same_grid_and_rejects_bad_sizes():
    pos = torch.randn(1, 16, 8)
    assert torch.allclose(convert.interpolate_positions(pos, 4), pos, atol=1e-6)
    with pytest.raises(ValueError, match="image_size"):
        convert.convert_state_dict(synthetic_dinov2(), 30)


# ------------------------------------------------------------------------------------------ text split
class CharTokenizer:
    """One token per character, with offsets (the split's contract with a real tokenizer)."""

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        out = {"input_ids": [ord(c) for c in text]}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return out


@pytest.mark.unit
def test_text_split_cuts_at_the_token_and_keeps_the_parts_disjoint(tmp_path):
    text = "abcdefghij" * 5
    held, cal = assets.split_text(CharTokenizer(), text, heldout_tokens=12)
    assert held == text[:12] and cal == text[12:]
    with pytest.raises(ValueError, match="need more than"):
        assets.split_text(CharTokenizer(), "abc", heldout_tokens=12)
    paths = assets.write_text_data(tmp_path, CharTokenizer(), calibration_window=16)
    from ukmp.data.loaders import load_dataset

    heldout = (tmp_path / "text" / "heldout.txt").read_text()
    calibration = (tmp_path / "text" / "calibration.txt").read_text()
    assert len(heldout) == assets.HELDOUT_TOKENS and calibration and heldout not in calibration
    ds = load_dataset(paths["text_heldout_eval"])
    assert len(ds.windows(CharTokenizer())) == assets.EVAL_WINDOWS


# ------------------------------------------------------------------------------------------ build pieces
@pytest.mark.unit
def test_teacher_forced_exact_match_needs_every_target_token():
    build = importlib.import_module("build")
    labels = torch.tensor([[-100, 5, 2, -100], [-100, -100, 7, 2]])
    batch = {"labels": labels}
    sel_labels = labels[labels != -100]  # row 0: 5, 2; row 1: 7, 2
    logits = torch.full((4, 10), -5.0)
    logits[torch.arange(4), sel_labels] = 5.0
    assert build.correct_rows(logits, sel_labels, batch) == [True, True]
    logits[3, 2], logits[3, 9] = 0.0, 6.0  # row 1 says something after "7" instead of stopping
    assert build.correct_rows(logits, sel_labels, batch) == [True, False]
    assert build.question_type("yes") == "yes/no" and build.question_type("circle") == "shape"
    assert build.question_type("teal") == "colour"
    cfg = {"warmup": 10, "min_lr_ratio": 0.1}
    assert math.isclose(build.lr_at(9, 100, 1.0, cfg), 1.0) and math.isclose(build.lr_at(100, 100, 1.0, cfg), 0.1)


@pytest.mark.unit
def test_question_kind_splits_yes_no_by_what_the_image_holds():
    """easy-VQA's three negated phrasings and its plain ones: "present" exactly when the thing asked about is in the
    image, whichever way the question is worded."""
    build = importlib.import_module("build")
    cases = {("is there a red shape?", "yes"): "present", ("is there a red shape?", "no"): "absent",
             ("is there not a red shape?", "no"): "present", ("is there not a red shape?", "yes"): "absent",
             ("does the image not contain a circle?", "no"): "present", ("is no triangle present?", "no"): "present",
             ("is no triangle present?", "yes"): "absent", ("is a gray shape present?", "yes"): "present",
             ("Does the image contain a circle?", "no"): "absent"}
    for (q, a), want in cases.items():
        assert build.question_kind(q, a) == f"yes/no: {want}", (q, a)
    assert build.question_kind("what color is the shape?", "teal") == "colour"
    assert build.question_kind("what shape is in the image?", "circle") == "shape"
    t = build.accuracy_table({"colour": [1.0, 0.0], "shape": [1.0, 1.0], "yes/no: present": [0.0, 0.0],
                              "yes/no: absent": [1.0, 1.0, 1.0, 1.0]})
    assert t["questions"] == 10 and t["accuracy"] == 70.0
    assert t["by_type"] == {"colour": 50.0, "shape": 100.0, "open": 75.0, "yes/no": 66.67, "yes/no: present": 0.0,
                            "yes/no: absent": 100.0}


@pytest.mark.unit
def test_per_kind_breakdown_reads_each_rows_predictions(tmp_path):
    """A row that answers "no" to everything: 0 on the open and present questions, 100 on the absent plain ones, and
    its commonest answer "no" at 100 %; a row whose stage did not run gets no breakdown. The constant answers are
    scored by the evaluator's own VQA accuracy."""
    q = importlib.import_module("quality_vlm")
    truth = {1: ("what shape is it?", ["circle"] * 10), 2: ("is there a red shape?", ["no"] * 10),
             3: ("is there not a red shape?", ["no"] * 10), 4: ("what color is it?", ["red"] * 10)}
    res = fake_result()

    def write(rel: str, answers: dict[int, str]) -> None:
        f = tmp_path / rel / "okvqa" / "predictions.json"
        f.parent.mkdir(parents=True)
        f.write_text(json.dumps([{"question_id": k, "question": truth[k][0], "answer": a} for k, a in answers.items()]))

    write("dense/eval_dense", {1: "circle", 2: "no", 3: "yes", 4: "Red."})
    write("realparts_compare_0.5/ukmp/eval_pruned", {k: "no" for k in truth})
    write("realparts_compare_0.5/ukmp/eval_finetuned", {1: "circle", 2: "no", 3: "no", 4: "red"})
    q.add_breakdowns(res, tmp_path, truth, "lavis")
    d = res["dense"]["vqa_by_kind"]
    assert d["accuracy"] == 75.0 and d["by_type"]["open"] == 100.0 and d["by_type"]["yes/no: present"] == 0.0
    u = res["by_ratio"]["0.5"]["ukmp"]
    assert u["vqa_by_kind"]["by_type"] == {"open": 0.0, "shape": 0.0, "colour": 0.0, "yes/no": 100.0,
                                           "yes/no: present": 100.0, "yes/no: absent": 100.0}
    assert (u["vqa_by_kind"]["commonest_answer"], u["vqa_by_kind"]["commonest_share"]) == ("no", 100.0)
    assert u["vqa_by_kind_recovered"]["accuracy"] == 100.0
    assert res["by_ratio"]["0.5"]["flap"]["vqa_by_kind"] is None and "vqa_by_kind_recovered" not in res["by_ratio"]["0.5"]["flap"]
    assert res["constant_answers"] == {"yes": 0.0, "no": 50.0}
    md = q.markdown(res)
    assert "| – | dense | 75.0 | 100.0 | 100.0 | 100.0 | 0.0 | 100.0 |" in md
    assert "| 0.5 | ukmp (recovered) | 100.0 |" in md and '"no" 50.0 %' in md
    assert q.open_accuracy(u) == 0.0 and q.open_accuracy(u, "_recovered") == 100.0 and q.open_accuracy({}) is None
    q.plot(res, tmp_path / "q.png")  # three panels now: accuracy, open questions, perplexity
    assert (tmp_path / "q.png").stat().st_size > 10_000


# ------------------------------------------------------------------------------------------ report
def fake_result():
    rows = {m: {"vqa": v, "ppl": p, "achieved_ratio": 0.5, "prune_seconds": 3.0, "score_seconds": 2.0,
                "kept_width": {"vit_head": 0.5, "lm_mlp": 0.4}}
            for m, v, p in (("ukmp", 60.0, 30.0), ("flap", 70.0, 25.0), ("random", 70.0, 90.0), ("wanda_sp", 20.0, 40.0))}
    rows["ukmp"].update(vqa_recovered=80.0, ppl_recovered=20.0)
    text = {"ukmp": {"vqa": 65.0, "ppl": 28.0, "achieved_ratio": 0.5}}
    return {"text_calibration": {"methods": ["ukmp"], "by_ratio": {"0.5": text}, "samples": 64, "window": 128},
            "name": "realparts", "dense": {"vqa": 92.0, "ppl": 14.5}, "ratios": [0.5], "methods": list(rows),
            "by_ratio": {"0.5": rows}, "ablation_ratio": 0.5, "ppl_tokens": "8 x 512", "total_params": 161_000_000,
            "recovery_budget": "x", "machine": "2 CPUs", "date": "2026-11-29", "total_minutes": 1.0,
            "ablations": {"C: threshold T": [{"variant": "T = 0.4 (UKMP)", "pruned_vqa": 60.0, "pruned_ppl": 30.0,
                                              "tokens_selected": 10, "tokens_total": 40, "achieved_ratio": 0.5}]}}


@pytest.mark.unit
def test_until_counts_past_midnight(monkeypatch):
    """--until HH:MM is its next occurrence after the first ask (a string compare stopped a run begun at 23:00 with
    00:50 at once); '' never stops; a bad value is a one-line error naming the flag."""
    q = importlib.import_module("quality_vlm")
    start = 1_796_684_400.0  # 2026-12-07 23:00:00 UTC
    monkeypatch.setattr(q, "_DEADLINES", {})
    monkeypatch.setattr(q.time, "time", lambda: start)
    assert not q.late("") and not q.late("00:50")
    monkeypatch.setattr(q.time, "time", lambda: start + 110 * 60 - 1)
    assert not q.late("00:50")
    monkeypatch.setattr(q.time, "time", lambda: start + 110 * 60)
    assert q.late("00:50")
    with pytest.raises(SystemExit, match="--until: '7:5' is not HH:MM"):
        q.late("7:5")


@pytest.mark.unit
def test_variants_parse_and_rescore(tmp_path, monkeypatch):
    """--variants: 'LABEL:key=value ...' items; a bad item or a label whose directory repeats is a one-line error.
    A threshold-only UKMP variant re-allocates the first ratio's scores at the others (UKMP is ratio-free), an
    iterative one (prune.iterations > 1) scores afresh at every ratio: checked on the calls ``prune_rows`` makes."""
    q = importlib.import_module("quality_vlm")
    assert q.parse_variants(" ukmp k=4:prune.iterations=4 ; T=0.6:prune.threshold=0.6 prune.iterations=1;") == [
        ("ukmp k=4", ["prune.iterations=4"]), ("T=0.6", ["prune.threshold=0.6", "prune.iterations=1"])]
    assert q.variant_dir("ukmp k=4 T=0.6") == "ukmp_k_4_t_0_6"
    for bad in ("no colon", ":prune.iterations=4", "x:prune.iterations", "x:", "a b:k=1; a-b:k=2"):
        with pytest.raises(SystemExit, match="--variants"):
            q.parse_variants(bad)
    assert q.rescores(["prune.iterations=4"]) and not q.rescores(["prune.iterations=1", "prune.threshold=0.6"])
    assert not q.rescores(["prune.iterations=4", "prune.iterations=1"])  # the last one wins, as in the config

    calls = []

    def fake_compare(configs, overrides, ratio, methods, recover, **where):
        calls.append((ratio, [o for o in overrides if o.startswith("prune.scores_from=")]))
        run = tmp_path / f"v_compare_{ratio}" / "ukmp" / "prune"
        run.mkdir(parents=True, exist_ok=True)
        (run / "summary.json").write_text(json.dumps({"parameters": {"by_group_kind": {}}, "seconds": {}}))
        src = calls[-1][1][0].split("=", 1)[1] if calls[-1][1] else None
        return {"dense": {}, "methods": {"ukmp": {"pruned": {}, "achieved_ratio": ratio, "prune_seconds": 1.0,
                                                  "scores_from": src}}}

    monkeypatch.setattr(q, "compare", fake_compare)
    for rescore, shared in ((False, 1), (True, 0)):
        calls.clear()
        _, rows = q.prune_rows([], [], tmp_path / "v", [0.1, 0.2], ("ukmp",), {}, rescore=rescore)
        assert [r for r, _ in calls] == [0.1, 0.2] and sum(bool(c) for _, c in calls) == shared
        assert bool(rows["0.2"]["ukmp"]["prune_overrides"]) == bool(shared)  # the recovery prunes the same way


@pytest.mark.unit
def test_best_baselines_by_open_questions():
    """``--recover-by open`` ranks by the open-question accuracy: a baseline that wins the total by answering "no"
    to everything is passed over for one that sees the image; ties on open go to the total, then perplexity."""
    q = importlib.import_module("quality_vlm")

    def row(vqa, open_, ppl=20.0):
        return {"vqa": vqa, "ppl": ppl, "vqa_by_kind": {"by_type": {"open": open_}}}

    rows = {"ukmp": row(70.0, 80.0), "wording": row(66.6, 25.0), "sees": row(56.8, 77.1), "tie_a": row(60.0, 50.0),
            "tie_b": row(61.0, 50.0), "dead": {"vqa": None, "ppl": None}}
    assert q.best_baselines(rows, 2) == ["wording", "tie_b"]
    assert q.best_baselines(rows, 3, "open") == ["sees", "tie_b", "tie_a"]
    assert q.open_accuracy(rows["sees"]) == 77.1 and q.open_accuracy({"vqa": 1.0}) is None
    with pytest.raises(ValueError, match="--recover-by"):
        q.best_baselines(rows, 1, "total")


@pytest.mark.unit
def test_report_tables_and_plot(tmp_path):
    q = importlib.import_module("quality_vlm")
    res = fake_result()
    assert q.best_baselines(res["by_ratio"]["0.5"], 2) == ["flap", "random"]  # tie on VQA: lower perplexity first
    md = q.markdown(res)
    assert "| ukmp | – | 60.00 | 30.000 | 2.0 |" in md
    assert "| 0.5 | ukmp | – → – | 60.00 → 80.00 | 30.000 → 20.000 | – |" in md
    assert md.index("## After recovery") < md.index("## After pruning")  # the recovered table first
    res["variants"] = {"ukmp k=4": {"overrides": ["prune.iterations=4"], "by_ratio": {"0.5": {
        "vqa": 62.0, "ppl": 29.0, "vqa_recovered": 81.0, "ppl_recovered": 19.5,
        "vqa_by_kind": {"by_type": {"open": 70.0}}, "vqa_by_kind_recovered": {"by_type": {"open": 90.0}},
        "recovery_minutes": 9.5}}}}
    md = q.markdown(res)
    assert "| ukmp k=4 (`prune.iterations=4`) | 70.00 | 62.00 | 29.000 | – |" in md
    assert "| 0.5 | ukmp k=4 | 70.00 → 90.00 | 62.00 → 81.00 | 29.000 → 19.500 | 9.5 |" in md
    assert "| T = 0.4 (UKMP) | 60.00 | 30.000 | 10 / 40 | 0.5000 |" in md
    assert "| ukmp + text | 65.00 (60.00) | 28.000 (30.000) |" in md  # the variant next to captions alone
    for i, sec in enumerate((90.0, 30.0)):  # the cost of every stage behind the tables, summed
        (tmp_path / "runs" / f"s{i}").mkdir(parents=True)
        (tmp_path / "runs" / f"s{i}" / "stage.json").write_text(json.dumps({"seconds": sec}))
    assert q.stage_minutes(tmp_path / "runs") == 2.0
    q.plot(res, tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 10_000
    g = {"ratio": 0.5, "columns": ["dense", "ukmp"],
         "items": [{"image": "", "question": "what shape?", "truth": "circle",
                    "answers": {"dense": "circle", "ukmp": "triangle"}}]}
    gm = q.gallery_markdown(g)
    assert "| dense | circle ✓ |" in gm and "| ukmp | triangle |" in gm


@pytest.mark.unit
def test_quality_testbed_flag_is_taken_out_and_checked():
    quality = importlib.import_module("quality")
    assert quality.pop_testbed(["--testbed", "realparts", "--ratios", "0.5"]) == ("realparts", ["--ratios", "0.5"])
    assert quality.pop_testbed(["--testbed=smollm2", "a=b"]) == ("smollm2", ["a=b"])
    assert quality.pop_testbed(["x=1"]) == ("easyvqa", ["x=1"])
    with pytest.raises(SystemExit, match="--testbed"):
        quality.pop_testbed(["--testbed", "nope"])


# ------------------------------------------------------------------------------------------ the real files
@pytest.fixture(scope="module")
def easy_images():
    from PIL import Image

    from ukmp.testbed import easy_vqa_root

    root = easy_vqa_root() / "test" / "images"
    return np.stack([np.asarray(Image.open(root / f"{i}.png").convert("RGB").resize((224, 224), Image.BICUBIC),
                                dtype=np.float32) / 255 for i in range(2)])


@needs_extra
@pytest.mark.integration
def test_real_dinov2_conversion_matches_the_onnx_graph(easy_images):
    """Tolerance: 1e-4 absolute on the backbone's output (max |x| ~ 10; measured 7e-5 on four images), 1e-6 on the
    position table. Not vacuous: dropping the key bias shifts layer-0 logits by tens, which must not show."""
    torch.set_num_threads(2)
    res = convert.check_conversion(assets.onnx_path(), easy_images)
    assert res["max_abs_diff_last_hidden_state"] <= 1e-4 < res["max_abs_last_hidden_state"]
    assert res["max_abs_diff_position_table"] <= 1e-6
    assert res["key_bias_effect"]["max_abs_logit_shift_layer0"] > 1.0
    assert res["key_bias_effect"]["max_abs_diff_outputs"] <= 1e-4


@needs_extra
@pytest.mark.integration
def test_real_smollm2_inside_blip2_has_the_standalone_perplexity(tmp_path):
    """The GGUF loads from its package directory (no config.json there); inside BLIP-2 (one zero embedding row
    added for <image>) the LM gives the standalone perplexity on the first two held-out windows: relative
    tolerance 1e-4 (the extra token adds exp(0) to each softmax denominator). Not vacuous: a BLIP-2 whose LM kept
    its random init is far off."""
    build = importlib.import_module("build")
    torch.set_num_threads(2)
    lm, tok = build.load_llm()
    text = assets.write_text_data(tmp_path, tok)
    w = synthetic_dinov2(dim=384, layers=1, grid=37, mlp=64)
    model, processor = build.assemble(convert.convert_state_dict(w, build.IMAGE_SIZE),
                                      convert.vision_config(w, build.IMAGE_SIZE), lm, tok, seed=0)
    alone = build.perplexity(lm, tok, text["text_heldout"], max_windows=2)
    inside = build.perplexity(model, processor.tokenizer, text["text_heldout"], max_windows=2)
    assert abs(inside["perplexity"] / alone["perplexity"] - 1) <= 1e-4
    assert 5 < alone["perplexity"] < 40  # a trained LM on English prose (≈14.5 over all 32 windows)
    assert model.language_model.lm_head.weight is model.language_model.model.embed_tokens.weight
    with torch.no_grad():
        for p in model.language_model.model.layers[0].parameters():
            p.normal_()
    broken = build.perplexity(model, processor.tokenizer, text["text_heldout"], max_windows=2)
    assert broken["perplexity"] > 2 * alone["perplexity"]


# ------------------------------------------------------------------------------------------ the whole command
@pytest.mark.integration
def test_quality_command_end_to_end_on_a_tiny_model(tmp_path, sample_data, monkeypatch):
    """``quality.py --testbed realparts`` on a tiny BLIP-2 with a Llama LM saved where build.py would put it:
    every method x ratio filled, recovery at the second ratio, the per-kind breakdown and the gallery written.
    Then the same command again runs no stage: every ``stage.json`` is byte-identical and untouched. Not vacuous:
    a recovery call without its pruned row's ``prune.scores_from`` (the bug of 4b7698d) re-scores UKMP's prune
    stage at the second ratio under another config hash, and so would the pruned row's on the next invocation."""
    from ukmp.models.build import build_tiny

    q = importlib.import_module("quality_vlm")
    rp = tmp_path / "rp"
    model, processor = build_tiny(seed=0, name="tiny-blip2-llama")
    model.save_pretrained(rp / "model")
    processor.save_pretrained(rp / "model")
    monkeypatch.setenv("UKMP_REALPARTS", str(rp))
    out = tmp_path / "out"
    args = ["--ratios", "0.3,0.2", "--methods", "ukmp,llm_pruner_global,llm_pruner_local,random",
            "--recover-ratios", "0.2", "--recover-top", "1", "--no-ablations", "--gallery", "2", "--text-methods", "",
            "--results", str(tmp_path / "results"),
            f"data.calibration={sample_data['cc595k']}", f"data.finetune={sample_data['cc595k']}",
            f"eval.datasets.okvqa={sample_data['okvqa']}", f"eval.datasets.perplexity={sample_data['text']}",
            "data.max_text_tokens=16", "prune.num_samples=8", "prune.batch_size=4", "prune.units_per_step=1",
            "prune.fine_units_per_step=1", "finetune.sample_scale=0.0001", "finetune.final_stage_samples=4",
            "finetune.batch_size=4", "eval.batch_size=8", "eval.max_samples=8", f"output_dir={out}"]
    assert q.main(args) == 0
    root = out / "realparts_quality"
    res = json.loads((tmp_path / "results" / "realparts_vlm_quality.json").read_text())
    assert set(res["by_ratio"]) == {"0.3", "0.2"}
    for r in ("0.3", "0.2"):
        assert set(res["by_ratio"][r]) == {"ukmp", "llm_pruner_global", "llm_pruner_local", "random"}
        for row in res["by_ratio"][r].values():
            assert row["vqa"] is not None and row["ppl"] > 0 and row["vqa_by_kind"]["questions"] > 0
    recovered = [m for m, row in res["by_ratio"]["0.2"].items() if row.get("ppl_recovered") is not None]
    assert "ukmp" in recovered and len(recovered) == 2
    assert not any(row.get("ppl_recovered") for row in res["by_ratio"]["0.3"].values())
    ukmp_02 = res["by_ratio"]["0.2"]["ukmp"]
    assert ukmp_02["prune_overrides"][0].startswith("prune.scores_from=") and "_compare_0.3" in ukmp_02["prune_overrides"][0]
    assert "vqa_by_kind_recovered" in ukmp_02 and res["dense"]["vqa_by_kind"] is not None
    assert (tmp_path / "results" / "realparts_vlm_gallery.md").is_file()
    stages = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("stage.json")}
    assert len(stages) >= 8 + 4  # a prune and an eval stage per row, the recoveries' finetune and eval stages
    assert q.main(args) == 0
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("stage.json")} == stages
