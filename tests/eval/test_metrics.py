"""Golden, hand-computed cases for the evaluation metrics (expected values worked out in the comments)."""

from __future__ import annotations

import numpy as np
import pytest

from ukmp.eval import metrics
from ukmp.eval.metrics import (
    caption_scores,
    gqa_accuracy,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    recall_at_k,
    vqa_accuracy,
    vqa_score,
)

TOL = 1e-9  # exact rational arithmetic in float: any error beyond this is a real difference


# --------------------------------------------------------------------------------------- punctuation / normalisation
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # a comma between digits anywhere => every listed punctuation mark is deleted (not spaced)
        ("1,000", "1000"),
        ("t-shirt 1,2", "tshirt 12"),
        # no digit comma, mark not next to a space => replaced by a space
        ("red,blue", "red blue"),
        ("t-shirt", "t shirt"),
        ("yes/no", "yes no"),
        # mark next to a space => deleted
        ("red, blue", "red blue"),
        ("t - shirt", "t  shirt"),
        # period: deleted unless a digit follows
        ("3.5", "3.5"),
        ("yes.", "yes"),
        ("a.m.", "am"),
        ("1.5.", "1.5"),
    ],
)
def test_process_punctuation(text, expected):
    assert process_punctuation(text) == expected


def test_period_removal_is_capped_at_32_like_the_reference():
    # 40 periods, none before a digit: the reference deletes at most 32 (count=re.UNICODE=32) => 8 remain
    assert process_punctuation("." * 40) == "." * 8
    assert process_punctuation("." * 32) == ""  # non-vacuous: at the cap nothing remains


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two", "2"),            # number word -> digit (after lower-casing)
        ("none", "0"),
        ("ten dogs", "10 dogs"),
        ("the red ball", "red ball"),  # articles dropped
        ("A Dog", "dog"),
        ("an apple", "apple"),
        ("dont", "don't"),       # contractions table
        ("isnt it", "isn't it"),
        ("somebody'd", "somebodyd"),  # the official table's reversed entry, kept for exactness
        ("  many   spaces  ", "many spaces"),
    ],
)
def test_process_digit_article(text, expected):
    assert process_digit_article(text) == expected


def test_normalize_answer_chains_all_rules():
    # "Two dogs, dont they?\n": newline -> space, strip; ", " deletes ","; "?" has no space neighbour -> " ";
    # then "two"->"2", "dont"->"don't"
    assert normalize_answer("Two dogs, dont they?\n") == "2 dogs don't they"
    assert normalize_answer("The T-Shirt.") == "t shirt"
    assert normalize_answer("\tone\t") == "1"


# ------------------------------------------------------------------------------------------------- VQA accuracy
def test_vqa_accuracy_leave_one_out_golden():
    # 3 x red, 7 x blue, pred red. Leaving out a "red": 2 matches left -> 2/3 (3 times);
    # leaving out a "blue": 3 matches -> 1 (7 times). Mean = (3*2/3 + 7) / 10 = 0.9
    gts = ["red"] * 3 + ["blue"] * 7
    assert abs(vqa_accuracy("red", gts) - 0.9) < TOL
    # 2 matches: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert abs(vqa_accuracy("red", ["red"] * 2 + ["blue"] * 8) - 0.6) < TOL
    # 1 match: (1 * 0 + 9 * 1/3) / 10 = 0.3
    assert abs(vqa_accuracy("red", ["red"] + ["blue"] * 9) - 0.3) < TOL
    # 4 matches: every subset keeps >= 3 -> 1.0 ; 0 matches -> 0.0
    assert abs(vqa_accuracy("red", ["red"] * 4 + ["blue"] * 6) - 1.0) < TOL
    assert vqa_accuracy("green", gts) == 0.0
    # non-vacuous: a plain "matches/3 capped" without leave-one-out would give 1.0 for 3 matches, not 0.9
    assert abs(vqa_accuracy("red", gts) - min(1.0, 3 / 3)) > 0.05


def test_vqa_accuracy_any_number_of_answers():
    # 4 answers [x, x, y, z], pred x: leaving an "x" out -> 1/3 (x2); leaving y or z out -> 2/3 (x2)
    # mean = (2/3 + 4/3) / 4 = 0.5
    assert abs(vqa_accuracy("x", ["x", "x", "y", "z"]) - 0.5) < TOL
    # ("a" itself is an article: the prediction "a" normalises to "" and matches nothing)
    assert vqa_accuracy("a", ["a", "a", "b", "c"]) == 0.0
    # a single answer: the only subset is empty, so the official formula gives 0 (use gqa_accuracy for GQA)
    assert vqa_accuracy("yes", ["yes"]) == 0.0
    with pytest.raises(ValueError, match="gt_answers"):
        vqa_accuracy("yes", [])


def test_vqa_accuracy_prediction_normalised_gt_only_punctuated_when_disagreeing():
    # pred "Two" -> "2"; all ten answers identical "2" -> untouched; 10 matches -> 1.0
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0
    # identical gts are NOT normalised (reference quirk): pred "t-shirt" -> "t shirt" never equals "t-shirt" -> 0
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0
    # disagreeing gts get process_punctuation: 9 x "t-shirt" -> "t shirt" match; every subset has >= 8 -> 1.0
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 9 + ["shirt"]) == 1.0
    # pred "the dog" -> "dog"; disagreeing gts: "dog." loses its period -> 3 matches -> 0.9 (as above);
    # "dog!x" becomes "dog x" (no match) -> 2 matches -> 0.6
    assert abs(vqa_accuracy("the dog", ["dog", "dog", "dog."] + ["cat"] * 7) - 0.9) < TOL
    assert abs(vqa_accuracy("the dog", ["dog", "dog", "dog!x"] + ["cat"] * 7) - 0.6) < TOL  # non-vacuous


def test_vqa_score_averages_in_percent():
    # q1: 0.9 (see above), q2: "Two" vs ten "2" -> 1.0 ; mean 0.95 -> 95 %
    gts = {1: ["red"] * 3 + ["blue"] * 7, 2: ["2"] * 10, 3: ["x"] * 10}
    out = vqa_score({1: "red", 2: "Two"}, gts)
    assert abs(out["accuracy"] - 95.0) < TOL and out["count"] == 2
    with pytest.raises(ValueError, match="question_id 7"):
        vqa_score({7: "red"}, gts)


# ----------------------------------------------------------------------------------------------------------- GQA
def test_gqa_accuracy_exact_match_after_normalisation():
    # a: "The Dog." -> "dog" == "dog"; b: "t-shirt" -> "t shirt" != stored "t-shirt"; c: "two" -> "2" == "2"
    preds = {"a": "The Dog.", "b": "t-shirt", "c": "two"}
    gts = {"a": "dog", "b": "t-shirt", "c": "2"}
    out = gqa_accuracy(preds, gts)
    assert abs(out["accuracy"] - 200.0 / 3.0) < 1e-9 and out["count"] == 3
    # normalising the gt as well makes b match -> 100 %
    assert abs(gqa_accuracy(preds, gts, normalize_gt=True)["accuracy"] - 100.0) < 1e-9
    with pytest.raises(ValueError, match="question_id 'z'"):
        gqa_accuracy({"z": "dog"}, gts)


# ----------------------------------------------------------------------------------------------------- recall@k
SIM = np.array([
    # t0    t1    t2    t3    t4    t5
    [0.90, 0.10, 0.80, 0.20, 0.30, 0.00],  # img0, gt texts {0,1}: order t0 t2 t4 t3 t1 t5 -> best rank 0
    [0.70, 0.60, 0.50, 0.10, 0.40, 0.30],  # img1, gt {2,3}: order t0 t1 t2 t4 t5 t3 -> best rank 2
    [0.00, 0.20, 0.30, 0.90, 0.10, 0.05],  # img2, gt {4,5}: order t3 t2 t1 t4 t5 t0 -> best rank 3
])
IMG2TXT = [[0, 1], [2, 3], [4, 5]]
TXT2IMG = [0, 0, 1, 1, 2, 2]


def test_recall_at_k_golden():
    out = recall_at_k(SIM, TXT2IMG, IMG2TXT, ks=(1, 2, 3))
    # TR ranks [0, 2, 3]: R@1 = 1/3, R@2 = 1/3, R@3 = 2/3
    assert abs(out["txt_r1"] - 100 / 3) < 1e-9
    assert abs(out["txt_r2"] - 100 / 3) < 1e-9
    assert abs(out["txt_r3"] - 200 / 3) < 1e-9
    # IR (columns): t0 [.9 .7 0] gt0 -> 0; t1 [.1 .6 .2] gt0 -> 2; t2 [.8 .5 .3] gt1 -> 1; t3 [.2 .1 .9] gt1 -> 2;
    # t4 [.3 .4 .1] gt2 -> 2; t5 [0 .3 .05] gt2 -> 1  => ranks [0 2 1 2 2 1]: R@1 1/6, R@2 3/6, R@3 6/6
    assert abs(out["img_r1"] - 100 / 6) < 1e-9
    assert abs(out["img_r2"] - 50.0) < 1e-9
    assert abs(out["img_r3"] - 100.0) < 1e-9
    # means: TR (1/3+1/3+2/3)/3 = 4/9 ; IR (1/6+1/2+1)/3 = 5/9 ; r_mean = 1/2
    assert abs(out["txt_r_mean"] - 400 / 9) < 1e-9
    assert abs(out["img_r_mean"] - 500 / 9) < 1e-9
    assert abs(out["r_mean"] - 50.0) < 1e-9


def test_recall_at_k_default_keys_and_perturbation():
    out = recall_at_k(SIM, TXT2IMG, IMG2TXT)
    assert set(out) == {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "txt_r_mean", "img_r_mean",
                        "r_mean"}
    assert out["txt_r10"] == 100.0 and out["img_r10"] == 100.0  # k beyond the candidates: always found
    # non-vacuous: make img1's text t2 its top text -> TR@1 goes from 1/3 to 2/3
    sim = SIM.copy()
    sim[1, 2] = 0.95
    assert abs(recall_at_k(sim, TXT2IMG, IMG2TXT, ks=(1,))["txt_r1"] - 200 / 3) < 1e-9


def test_recall_at_k_separate_t2i_scores_and_ties():
    # a separate text->image matrix that ranks every text's own image first gives IR@1 = 100
    t2i = np.zeros((6, 3))
    t2i[np.arange(6), TXT2IMG] = 1.0
    out = recall_at_k(SIM, TXT2IMG, IMG2TXT, ks=(1,), sim_t2i=t2i)
    assert out["img_r1"] == 100.0 and abs(out["txt_r1"] - 100 / 3) < 1e-9
    # all-equal scores: ties go to the lower index, so only img0 (texts 0,1) and texts of img0 are at rank 0
    flat = recall_at_k(np.zeros((3, 6)), TXT2IMG, IMG2TXT, ks=(1,))
    assert abs(flat["txt_r1"] - 100 / 3) < 1e-9 and abs(flat["img_r1"] - 100 / 3) < 1e-9


def test_recall_at_k_rejects_bad_shapes():
    with pytest.raises(ValueError, match="img2txt"):
        recall_at_k(SIM, TXT2IMG, IMG2TXT[:2])
    with pytest.raises(ValueError, match="txt2img"):
        recall_at_k(SIM, TXT2IMG[:5], IMG2TXT)
    with pytest.raises(ValueError, match="sim_t2i"):
        recall_at_k(SIM, TXT2IMG, IMG2TXT, sim_t2i=SIM)


# ------------------------------------------------------------------------------------------------------ captions
REFS = {
    1: ["a red circle on a blue background", "a red ball on blue", "a round red shape"],
    2: ["a green square on a white background", "a green box", "a square that is green"],
    3: ["a yellow triangle on a black background", "a yellow triangle", "a triangle drawn in yellow"],
}


def test_caption_scores_names_java_when_missing(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="java") as err:
        caption_scores({1: "a red circle"}, REFS)
    assert "\n" not in str(err.value)


def test_caption_scores_rejects_unknown_ids():
    with pytest.raises(ValueError, match="image id 9"):
        caption_scores({9: "a red circle"}, REFS)


@pytest.mark.integration
def test_cider_identical_beats_unrelated():
    identical = {k: v[0] for k, v in REFS.items()}
    unrelated = {1: "two men playing football", 2: "an airplane at the gate", 3: "people eating pizza"}
    good = caption_scores(identical, REFS, spice=False)
    bad = caption_scores(unrelated, REFS, spice=False)
    assert {"bleu_4", "meteor", "rouge_l", "cider", "count"} <= set(good) and "spice" not in good
    # identical captions: CIDEr well above 100 (margin 50); unrelated: near 0 (tolerance 5)
    assert good["cider"] > 150.0 and bad["cider"] < 5.0
    assert good["bleu_4"] > 99.0 and good["rouge_l"] > 99.0 and bad["rouge_l"] < 30.0


@pytest.mark.integration
def test_spice_required_but_missing_raises(monkeypatch, tmp_path):
    monkeypatch.setattr(metrics, "_spice_lib", lambda: tmp_path)  # a jar directory without the jars
    assert not metrics.spice_available()
    with pytest.raises(FileNotFoundError, match="CoreNLP"):
        caption_scores({1: "a red circle"}, REFS, spice=True)
