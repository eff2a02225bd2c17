"""Golden cases for both VQA scorers: ``lavis`` (the evaluator copy LAVIS vendors) and ``official`` (the current
GT-Vision-Lab evaluator, after its 2021 answer-processing fix). Every expected value is worked out by hand from the
evaluators' published logic in the comment next to it.

Leave-one-out with 10 answers and m matches: every 9-answer subset keeps m or m-1 matches, so the accuracy is
1.0 for m >= 4, 0.9 for m = 3, 0.6 for m = 2, 0.3 for m = 1, 0 for m = 0.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ukmp.eval.metrics import VQA_SCORERS, vqa_accuracy, vqa_accuracy_official, vqa_score
from ukmp.eval.normalize import lemmatize_answers

TOL = 1e-9  # exact fractions of tenths and thirds in float

# (rule, prediction, answers, lavis, official)
GOLDEN = [
    # --- number words
    # lavis: "two" -> "2"; ten identical "2" stay raw -> 10 matches -> 1.0. official: identical -> raw "two" != "2"
    ("number word, answers identical", "two", ["2"] * 10, 1.0, 0.0),
    # lavis: pred "2"; answers only punctuated: "two" != "2" -> 0. official: answers processed -> 4 x "2" -> 1.0
    ("number word in the answers", "2", ["two"] * 4 + ["three"] * 6, 0.0, 1.0),
    # both: "none" -> "0"; 3 of 10 answers are "0" (lavis punctuates them, unchanged) -> 0.9
    ("number word, both processed", "none", ["0"] * 3 + ["no"] * 7, 0.9, 0.9),
    # --- articles
    # lavis: "an apple" -> "apple" == raw "apple" x10 -> 1.0. official: raw "an apple" != "apple" -> 0
    ("article in the prediction, answers identical", "an apple", ["apple"] * 10, 1.0, 0.0),
    # lavis: "the dog" kept in the answers (punctuation only) -> 0 matches. official: "the dog" -> "dog" x5 -> 1.0
    ("article in the answers", "dog", ["the dog"] * 5 + ["cat"] * 5, 0.0, 1.0),
    # both: "a dog" -> "dog"; answers disagree: lavis 7 raw "dog" match, official 10 -> 1.0 either way
    ("article, enough plain answers", "a dog", ["the dog"] * 3 + ["dog"] * 7, 1.0, 1.0),
    # --- contractions
    # lavis: "dont" -> "don't" == raw "don't" x10 -> 1.0. official: raw "dont" != "don't" -> 0
    ("contraction in the prediction, answers identical", "dont", ["don't"] * 10, 1.0, 0.0),
    # lavis: answers punctuated only, "dont" != "don't" -> 0. official: "dont" -> "don't" x6 -> 1.0
    ("contraction in the answers", "don't", ["dont"] * 6 + ["no"] * 4, 0.0, 1.0),
    # --- case
    # lavis lower-cases the prediction: "yes" x10 -> 1.0. official: identical answers -> raw "Yes" != "yes" -> 0
    ("raw Yes against ten yes", "Yes", ["yes"] * 10, 1.0, 0.0),
    # lavis: "red" != raw "Red" -> 0. official: raw "Red" == "Red" -> 1.0
    ("capitalised answers, identical", "Red", ["Red"] * 10, 0.0, 1.0),
    # lavis: "yes" matches the 7 lower-case answers -> 1.0. official: all lower-cased -> 10 -> 1.0
    ("case, answers disagree", "Yes", ["Yes"] * 3 + ["yes"] * 7, 1.0, 1.0),
    # both 0: lavis "yes" != raw "Yes"; official raw "yes" != raw "Yes"
    ("lower prediction, capitalised identical answers", "yes", ["Yes"] * 10, 0.0, 0.0),
    # --- punctuation
    # lavis: "yes." -> "yes" -> 1.0. official: identical answers -> raw "yes." != "yes" -> 0
    ("trailing period, answers identical", "yes.", ["yes"] * 10, 1.0, 0.0),
    # lavis: "t-shirt" -> "t shirt" != raw "t-shirt" -> 0. official: raw "t-shirt" == "t-shirt" -> 1.0
    ("hyphen, answers identical", "t-shirt", ["t-shirt"] * 10, 0.0, 1.0),
    # both: answers disagree -> 9 x "t shirt" on each side -> 1.0
    ("hyphen, answers disagree", "t-shirt", ["t-shirt"] * 9 + ["shirt"], 1.0, 1.0),
    # both: a digit comma deletes the punctuation -> "1000"; 5 x "1000" -> 1.0
    ("digit comma", "1,000", ["1000"] * 5 + ["one thousand"] * 5, 1.0, 1.0),
    # --- newlines and tabs
    # both strip the prediction: "yes" x10 -> 1.0
    ("newline in the prediction", "yes\n", ["yes"] * 10, 1.0, 1.0),
    # lavis leaves identical answers raw: "yes\t" != "yes" -> 0. official strips the answers -> 1.0
    ("tab in the answers", "yes", ["yes\t"] * 10, 0.0, 1.0),
    # --- plain counting, no processing differences
    ("two matches", "red", ["red"] * 2 + ["blue"] * 8, 0.6, 0.6),
    ("one match", "red", ["red"] + ["blue"] * 9, 0.3, 0.3),
]


@pytest.mark.parametrize(("rule", "pred", "gts", "lavis", "official"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_both_scorers(rule, pred, gts, lavis, official):
    assert abs(vqa_accuracy(pred, gts, scorer="lavis") - lavis) < TOL, rule
    assert abs(vqa_accuracy(pred, gts, scorer="official") - official) < TOL, rule
    assert abs(vqa_accuracy_official(pred, gts) - official) < TOL, rule


def test_default_scorer_is_lavis_and_unchanged():
    # the default keeps the reference's numbers: every golden case scores as 'lavis' without naming a scorer
    for rule, pred, gts, lavis, _official in GOLDEN:
        assert abs(vqa_accuracy(pred, gts) - lavis) < TOL, rule
    assert VQA_SCORERS == ("lavis", "official")


def test_scorers_disagree_on_the_golden_set():
    # 11 of the 20 cases above score differently (hand count: every row whose two columns differ)
    differ = [g[0] for g in GOLDEN if abs(g[3] - g[4]) > TOL]
    assert len(differ) == 11 and len(GOLDEN) == 20
    computed = sum(abs(vqa_accuracy(p, a, "lavis") - vqa_accuracy(p, a, "official")) > TOL for _, p, a, _l, _o in GOLDEN)
    assert computed == 11


def test_vqa_score_with_either_scorer():
    gts = {1: ["yes"] * 10, 2: ["red"] * 2 + ["blue"] * 8}
    preds = {1: "Yes", 2: "red"}
    # lavis: (1.0 + 0.6) / 2 = 80 %; official: (0.0 + 0.6) / 2 = 30 %
    assert abs(vqa_score(preds, gts)["accuracy"] - 80.0) < TOL
    assert abs(vqa_score(preds, gts, scorer="official")["accuracy"] - 30.0) < TOL
    with pytest.raises(ValueError, match="scorer"):
        vqa_score(preds, gts, scorer="vqav1")


def _fake_nlp(tags: dict[str, tuple[str, str]]):
    """A stand-in spaCy pipeline: word -> (lemma, part of speech); unknown words are their own lemma, tagged X."""
    def nlp(text: str):
        return [SimpleNamespace(text=w, lemma_=tags.get(w, (w, "X"))[0], pos_=tags.get(w, (w, "X"))[1])
                for w in text.split()]

    return nlp


def test_lemmatize_answers_only_nouns_and_verbs():
    nlp = _fake_nlp({"dogs": ("dog", "NOUN"), "running": ("run", "VERB"), "better": ("well", "ADJ")})
    # NOUN and VERB tokens become lemmas, the adjective stays as written
    assert lemmatize_answers(["dogs running", "better dogs", "cat"], nlp) == ["dog run", "better dog", "cat"]


def test_okvqa_metrics_apply_the_lemmatiser_when_installed(monkeypatch):
    from ukmp.eval import normalize
    from ukmp.eval.stage import vqa_metrics

    gts = SimpleNamespace(gts=lambda: {1: ["dog"] * 10})
    preds = [{"question_id": 1, "answer": "dogs"}]
    # without spaCy: "dogs" != "dog" -> 0 %, and the metrics say the lemmatiser did not run
    monkeypatch.setattr(normalize, "load_lemmatizer", lambda: (None, "not applied: spaCy is not installed"))
    out = vqa_metrics(gts, [dict(p) for p in preds], "lavis", lemmatize=True)
    assert out["accuracy"] == 0.0 and out["lemmatizer"].startswith("not applied") and out["scorer"] == "lavis"
    # with a (stand-in) spaCy pipeline: "dogs" -> "dog" -> 100 %, the generated answer is kept beside it
    monkeypatch.setattr(normalize, "load_lemmatizer", lambda: (_fake_nlp({"dogs": ("dog", "NOUN")}), None))
    lemmatized = [dict(p) for p in preds]
    out = vqa_metrics(gts, lemmatized, "official", lemmatize=True)
    assert abs(out["accuracy"] - 100.0) < TOL and out["lemmatizer"] == "spacy en_core_web_sm"
    assert lemmatized[0] == {"question_id": 1, "answer": "dog", "answer_generated": "dogs"}
    # VQAv2 (lemmatize=False) never lemmatises
    assert "lemmatizer" not in vqa_metrics(gts, [dict(p) for p in preds], "lavis", lemmatize=False)
