"""The easy-VQA testbed: conversion rules on hand-made records, the written datasets and YAMLs, the run config, and
the training forward of benchmarks/testbed/build.py. Real easy-VQA data is used only when the package is installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from ukmp.config import load_config
from ukmp.data.loaders import load_dataset
from ukmp.eval.metrics import vqa_score
from ukmp.testbed import (
    ANSWER_COPIES,
    EasyVQAQuestion,
    caption_for,
    captions,
    colours_of,
    image_attributes,
    vqa_records,
    write_testbed_data,
)

REPO = Path(__file__).resolve().parents[2]
ANSWERS = ["circle", "green", "red", "gray", "yes", "teal", "black", "rectangle", "yellow", "triangle", "brown",
           "blue", "no"]
COLOURS = colours_of(ANSWERS)


def q(text: str, answer: str, image: int = 0) -> EasyVQAQuestion:
    return EasyVQAQuestion(text, answer, image)


# ---------------------------------------------------------------------------------------------------- caption rule
def test_colour_and_shape_from_wh_answers():
    qs = [q("what color is the shape?", "blue"), q("what shape is in the image?", "rectangle")]
    assert image_attributes(qs, COLOURS) == ("blue", "rectangle")
    assert caption_for("blue", "rectangle") == "a blue rectangle on a white background"


def test_named_attribute_in_question_counts():
    assert image_attributes([q("what color is the triangle?", "red")], COLOURS) == ("red", "triangle")
    assert image_attributes([q("what is the teal shape?", "circle")], COLOURS) == ("teal", "circle")


def test_yes_no_with_negation():
    # "is there not a blue shape?" -> "no" means blue IS present; "is no circle present?" -> "yes": circle absent
    qs = [q("is there not a blue shape?", "no"), q("is no circle present?", "yes"),
          q("does the image contain a triangle?", "no")]
    assert image_attributes(qs, COLOURS) == ("blue", "rectangle")  # rectangle: the only shape not excluded
    # the same questions with flipped answers give different facts (the negation rule is not vacuous)
    flipped = [q("is there not a blue shape?", "yes"), q("is no circle present?", "no")]
    assert image_attributes(flipped, COLOURS) == (None, "circle")


def test_unknown_attributes_fall_back():
    assert caption_for(*image_attributes([q("is there a red shape?", "no")], COLOURS)) == \
        "a shape on a white background"
    assert caption_for("red", None) == "a red shape on a white background"
    assert caption_for(None, "circle") == "a circle on a white background"


def test_conflicting_facts_raise():
    with pytest.raises(ValueError, match="image 7: conflicting colour"):
        image_attributes([q("what color is the shape?", "red", 7), q("is there a blue shape?", "yes", 7)], COLOURS)


def test_captions_one_per_image_sorted():
    qs = [q("what color is the shape?", "red", 3), q("what shape is present?", "circle", 1),
          q("what is the color of the circle?", "green", 1)]
    recs = captions(qs, COLOURS)
    assert [r["image"] for r in recs] == ["train/1.png", "train/3.png"]
    assert [r["blip_caption"] for r in recs] == ["a green circle on a white background",
                                                 "a red shape on a white background"]


# ----------------------------------------------------------------------------------------------- answer replication
def test_replicated_answers_make_vqa_accuracy_exact_match():
    qs = [q(f"question {i}?", a) for i, a in enumerate(ANSWERS)]
    recs = vqa_records(qs, "test")
    gts = {r["question_id"]: r["answer"] for r in recs}
    assert all(len(r["answer"]) == ANSWER_COPIES for r in recs)
    right = vqa_score({r["question_id"]: r["answer"][0] for r in recs}, gts)
    assert right["accuracy"] == pytest.approx(100.0, abs=1e-9)
    wrong = vqa_score({r["question_id"]: ANSWERS[(i + 1) % len(ANSWERS)] for i, r in enumerate(recs)}, gts)
    assert wrong["accuracy"] == pytest.approx(0.0, abs=1e-9)
    # without replication a correct answer would score 0 (leave-one-out of a single answer): replication matters
    single = {r["question_id"]: r["answer"][:1] for r in recs}
    assert vqa_score({k: v[0] for k, v in single.items()}, single)["accuracy"] == pytest.approx(0.0, abs=1e-9)


def test_shuffled_order_keeps_question_ids():
    qs = [q(f"question {i}?", "yes", i) for i in range(20)]
    plain, shuffled = vqa_records(qs, "test"), vqa_records(qs, "test", shuffle_seed=0)
    assert [r["question_id"] for r in shuffled] != list(range(20))
    assert sorted(shuffled, key=lambda r: r["question_id"]) == plain


# ------------------------------------------------------------------------------------------ files, YAMLs, run config
def fake_easy_vqa(root: Path) -> Path:
    (root).mkdir(parents=True)
    (root / "answers.txt").write_text("\n".join(ANSWERS) + "\n")
    rows = {"train": [["what color is the shape?", "red", 0], ["what shape is present?", "circle", 0],
                      ["is there a blue shape?", "yes", 1]],
            "test": [["what is the green shape?", "triangle", 5], ["is no green shape present?", "no", 5]]}
    for split, data in rows.items():
        (root / split / "images").mkdir(parents=True)
        (root / split / "questions.json").write_text(json.dumps(data))
        for image_id in {r[2] for r in data}:
            Image.new("RGB", (64, 64), (250, 245, 240)).save(root / split / "images" / f"{image_id}.png")
    return root


def test_write_testbed_data_yamls_load(tmp_path):
    out = write_testbed_data(tmp_path / "cache", source=fake_easy_vqa(tmp_path / "easy_vqa_data"))
    assert out["counts"] == {"train_images": 2, "train_questions": 3, "test_images": 1, "test_questions": 2,
                             "captions": 2, "captions_complete": 1}
    cc = load_dataset(out["configs"]["cc595k"])
    assert [r.caption for r in cc.records] == ["a red circle on a white background",
                                               "a blue shape on a white background"]
    assert cc.open_image(0).size == (64, 64)
    train = load_dataset(out["configs"]["vqa_train"])
    assert len(train) == 3 and train[0].answers == ("red",) * ANSWER_COPIES
    test = load_dataset(out["configs"]["okvqa"])
    gqa = load_dataset(out["configs"]["gqa"])
    assert {r.question_id for r in test.records} == {0, 1} and all(r.image == "test/5.png" for r in test.records)
    assert [r.answers for r in gqa.records] == [(r.answers[0],) for r in test.records]
    assert test.open_image(0).size == (64, 64)


def test_testbed_yaml_points_at_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("UKMP_TESTBED", str(tmp_path / "tb"))
    cfg = load_config(REPO / "benchmarks" / "testbed" / "testbed.yaml")
    assert cfg.model.source == f"{tmp_path}/tb/model"
    assert cfg.data.calibration == cfg.data.finetune == f"{tmp_path}/tb/configs/cc595k.yaml"
    assert cfg.eval.datasets == {"okvqa": f"{tmp_path}/tb/configs/okvqa.yaml", "gqa": f"{tmp_path}/tb/configs/gqa.yaml"}
    monkeypatch.delenv("UKMP_TESTBED")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert load_config(REPO / "benchmarks" / "testbed" / "testbed.yaml").model.source == \
        f"{tmp_path}/xdg/ukmp/testbed/model"


# ---------------------------------------------------------------------------------------- build.py training forward
def _build_module():
    spec = importlib.util.spec_from_file_location("testbed_build", REPO / "benchmarks" / "testbed" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_model_is_flant5_style_and_shared_image_loss_is_exact(tmp_path):
    build = _build_module()
    torch.manual_seed(0)
    out = write_testbed_data(tmp_path / "cache", source=fake_easy_vqa(tmp_path / "easy_vqa_data"))
    vqa, caps = load_dataset(out["configs"]["vqa_train"]), load_dataset(out["configs"]["cc595k"])
    corpus = ["Question: what color is the shape? Short answer:", "red", "circle", "a red circle on a white background"]
    model, processor = build.build_untrained(0, corpus)
    lm = model.language_model
    assert lm.lm_head.weight is not lm.shared.weight and lm.config.feed_forward_proj == "gated-gelu"
    queries = model.query_tokens.detach()[0]
    assert float((queries[0] - queries[1]).abs().max()) > 1e-3  # distinct queries (transformers zero-inits them)
    batches = build.Batches(vqa, caps, processor, seed=0, caption_rows=True, max_text_tokens=64)
    batch = batches([0, 1], epoch=0)
    assert batch["owner"].tolist() == [0, 0, 0, 1, 1]  # 2 + 1 questions, one caption row per image
    shared = build.shared_image_loss(model, batch)
    plain = model(pixel_values=batch["pixel_values"][batch["owner"]],
                  **{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "decoder_attention_mask")}).loss
    assert torch.allclose(shared, plain, atol=1e-5), (shared, plain)  # tolerance 1e-5
    batch["owner"] = 1 - batch["owner"]  # rows paired with the wrong image: the same check fails
    batch["pixel_values"][1] = -batch["pixel_values"][1]
    assert not torch.allclose(build.shared_image_loss(model, batch), plain, atol=1e-5)


# --------------------------------------------------------------------------------------------- real easy-VQA data
@pytest.mark.skipif(importlib.util.find_spec("easy_vqa") is None, reason="easy-vqa not installed")
def test_real_easy_vqa_captions_are_consistent():
    from ukmp.testbed import easy_vqa_root, read_answers, read_questions

    root = easy_vqa_root()
    colours = colours_of(read_answers(root / "answers.txt"))
    assert set(colours) == {"green", "red", "gray", "teal", "black", "yellow", "brown", "blue"}
    qs = read_questions(root / "train" / "questions.json")
    recs = captions(qs, colours)  # raises on any conflicting facts
    assert len(recs) == 4000
    complete = sum(bool(r["colour"] and r["shape"]) for r in recs)
    assert complete >= 0.85 * len(recs), complete


def test_canonical_tokenizer_ignores_piece_order_and_score_noise():
    from transformers import T5Tokenizer

    build = _build_module()
    base = build.build_tokenizer(["what color is the shape? red", "what shape is present? circle"] * 3, vocab_size=64)
    vocab = json.loads(base.backend_tokenizer.to_str())["model"]["vocab"]
    noisy = vocab[:3] + [(p, s + 1e-12) for p, s in reversed(vocab[3:])]
    other = T5Tokenizer(vocab=[(p, float(s)) for p, s in noisy], extra_ids=0)
    assert other.get_vocab() != base.get_vocab()  # the raw orders differ: ids would differ
    a, b = build.canonical_tokenizer(base), build.canonical_tokenizer(other)
    assert a.get_vocab() == b.get_vocab()
    assert a.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]


def test_training_labels_dihedral_views_and_attribute_loss(tmp_path):
    build = _build_module()
    out = write_testbed_data(tmp_path / "cache", source=fake_easy_vqa(tmp_path / "easy_vqa_data"))
    vqa, caps = load_dataset(out["configs"]["vqa_train"]), load_dataset(out["configs"]["cc595k"])
    model, processor = build.build_untrained(0, ["what color is the shape?", "red", "circle"])
    batches = build.Batches(vqa, caps, processor, seed=0, caption_rows=True, max_text_tokens=64, dihedral=True)
    # image 0: "what color" -> red, "what shape" -> circle; image 1: "is there a blue shape?" yes -> blue only
    assert batches.shape.tolist() == [build.SHAPES.index("circle"), -1]
    assert batches.colour.tolist() == [build.COLOURS.index("red"), build.COLOURS.index("blue")]
    batches.pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # asymmetric content
    views = {e: batches.images_for([0, 1], e) for e in range(6)}
    symmetries = [torch.rot90(x, k, dims=(1, 2)) for x in [batches.pixels[0], batches.pixels[0].flip(2)]
                  for k in range(4)]
    for v in views.values():  # every view is one of the 8 symmetries of its image
        assert any(torch.equal(v[0], s_) for s_ in symmetries)
    assert torch.equal(batches.images_for([0, 1], 3), views[3])  # the same draw for the same (image, epoch)
    assert len({tuple(v[0].flatten()[:4].tolist()) for v in views.values()}) > 1  # epochs draw different ones
    batches.dihedral = False
    assert torch.equal(batches.images_for([0, 1], 3), batches.pixels)
    head = build.new_shape_head(model, 0)
    tokens = torch.randn(2, 5, model.config.vision_config.hidden_size)
    loss = build.attribute_loss(head, tokens, batches.shape, batches.colour)
    logits = head(tokens.mean(dim=1))
    ce = torch.nn.functional.cross_entropy
    hand = ce(logits[:1, :3], batches.shape[:1]) + ce(logits[:, 3:], batches.colour)
    assert torch.allclose(loss, hand, atol=1e-6)  # the unlabelled shape of image 1 is ignored
    none = build.attribute_loss(head, tokens, torch.tensor([-1, -1]), torch.tensor([-1, -1]))
    assert float(none.detach()) == 0.0 and none.requires_grad


def test_canonical_vocab_sorts_the_trainers_fallback_band():
    """Two processes gave the tail 'm c ck k' and 'c k ck m' on the same scores (1e-4 apart): one order results."""
    from ukmp.models.build import canonical_unigram_vocab

    head = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.9), ("circle", -9.667473)]
    a = head + [("m", -11.818433), ("c", -11.818533), ("ck", -11.818633), ("k", -11.818633)]
    b = head + [("c", -11.818433), ("k", -11.818533), ("ck", -11.818633), ("m", -11.818633)]
    ca, cb = canonical_unigram_vocab(a), canonical_unigram_vocab(b)
    assert ca == cb
    assert [p for p, _ in ca[5:]] == ["c", "ck", "k", "m"] and [s for _, s in ca[5:]] == [-11.818433, -11.818533,
                                                                                         -11.818633, -11.818633]
    assert [p for p, _ in ca[:5]] == [p for p, _ in head]  # pieces far apart keep their score order
