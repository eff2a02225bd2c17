"""Evaluation metrics as pure functions: VQA accuracy, GQA exact match, retrieval recall@k, caption scores.

Conventions: accuracies and recalls are returned in percent; caption scores too (pycocoevalcap's fractions x 100,
so CIDEr 0.98 is reported as 98.0, as in papers). Nothing heavy is imported at module load: pycocoevalcap is
imported inside ``caption_scores``.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from ukmp.eval.normalize import (
    clean_whitespace,
    normalize_answer,
    process_digit_article,
    process_punctuation,
)

log = logging.getLogger(__name__)

__all__ = [
    "caption_scores",
    "gqa_accuracy",
    "normalize_answer",
    "process_digit_article",
    "process_punctuation",
    "recall_at_k",
    "spice_available",
    "VQA_SCORERS",
    "vqa_accuracy",
    "vqa_accuracy_official",
    "vqa_score",
]


# ------------------------------------------------------------------------------------------------------------ VQA
VQA_SCORERS = ("lavis", "official")


def _leave_one_out(res: str, gts: Sequence[str]) -> float:
    """For each of the n answers, leave it out and score min(1, matches among the other n-1 / 3); the mean."""
    matches = [a == res for a in gts]
    total = sum(matches)
    # leaving answer i out removes it from the matches when it matched
    return sum(min(1.0, (total - int(m)) / 3.0) for m in matches) / len(gts)


def vqa_accuracy(pred: str, gt_answers: Sequence[str], scorer: str = "lavis") -> float:
    """VQA accuracy of one prediction in [0, 1], by ``scorer`` (``"lavis"``, the default, or ``"official"``).

    ``"lavis"`` is the evaluator copy LAVIS vendors (what the UKMP paper's numbers come from): the prediction is
    always fully normalised (``normalize_answer``); the ground-truth answers pass through ``process_punctuation``
    only, and only when they are not all identical. ``"official"`` is ``vqa_accuracy_official``.

    Then, for each of the n answers in turn, that answer is left out and the score is min(1, matches among the other
    n-1 / 3); the result is the mean of these n scores. With 10 answers this is the familiar "min(1, #humans/3)"
    averaged over the ten 9-answer subsets.
    """
    if scorer == "official":
        return vqa_accuracy_official(pred, gt_answers)
    if scorer != "lavis":
        raise ValueError(f"scorer: must be one of {', '.join(VQA_SCORERS)}, got {scorer!r}")
    if len(gt_answers) < 1:
        raise ValueError("gt_answers: need at least one ground-truth answer")
    res = normalize_answer(pred)
    gts = list(gt_answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    return _leave_one_out(res, gts)


def vqa_accuracy_official(pred: str, gt_answers: Sequence[str]) -> float:
    """VQA accuracy in [0, 1] as the current GT-Vision-Lab evaluator computes it (its 2021 answer-processing fix).

    Newlines and tabs become spaces and the ends are stripped, on the prediction and on every answer. Only when the
    answers are then not all identical do the answers *and* the prediction pass through ``process_punctuation`` and
    ``process_digit_article`` (which lower-cases); otherwise the raw strings are compared, so "Yes" scores 0 against
    ten "yes" (LAVIS's copy lower-cases the prediction and scores 1). Same leave-one-out average as ``vqa_accuracy``.
    """
    if len(gt_answers) < 1:
        raise ValueError("gt_answers: need at least one ground-truth answer")
    res = clean_whitespace(pred)
    gts = [clean_whitespace(a) for a in gt_answers]
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        res = process_digit_article(process_punctuation(res))
    return _leave_one_out(res, gts)


def vqa_score(preds: Mapping[Hashable, str], gts: Mapping[Hashable, Sequence[str]],
              scorer: str = "lavis") -> dict[str, float]:
    """Mean VQA accuracy (percent) over the questions in ``preds``; every one must have ground truth in ``gts``.

    ``scorer``: ``"lavis"`` (default; the reference's numbers) or ``"official"`` (see ``vqa_accuracy``).
    """
    if scorer not in VQA_SCORERS:
        raise ValueError(f"scorer: must be one of {', '.join(VQA_SCORERS)}, got {scorer!r}")
    if not preds:
        raise ValueError("preds: no predictions to score")
    accs = []
    for qid, pred in preds.items():
        if qid not in gts:
            raise ValueError(f"gts: no ground-truth answers for question_id {qid!r}")
        accs.append(vqa_accuracy(pred, gts[qid], scorer))
    return {"accuracy": 100.0 * float(np.mean(accs)), "count": len(accs)}


def gqa_accuracy(
    preds: Mapping[Hashable, str], gts: Mapping[Hashable, str], normalize_gt: bool = False
) -> dict[str, float]:
    """Exact-match accuracy (percent) after normalising the prediction with ``normalize_answer``.

    As in LAVIS's GQA task the ground-truth answer is compared as stored (GQA answers are already lower-case
    single phrases). ``normalize_gt=True`` normalises it the same way as the prediction (a later LAVIS variant),
    which for example lets "t-shirt" match "t-shirt".
    """
    if not preds:
        raise ValueError("preds: no predictions to score")
    hits = []
    for qid, pred in preds.items():
        if qid not in gts:
            raise ValueError(f"gts: no ground-truth answer for question_id {qid!r}")
        gt = gts[qid]
        if not isinstance(gt, str):
            raise ValueError(f"gts: answer of question_id {qid!r} must be a string, got {type(gt).__name__}")
        gt = normalize_answer(gt) if normalize_gt else gt
        hits.append(normalize_answer(pred) == gt)
    return {"accuracy": 100.0 * float(np.mean(hits)), "count": len(hits)}


# ------------------------------------------------------------------------------------------------------ retrieval
def _positions(sim: np.ndarray) -> np.ndarray:
    """pos[q, c] = rank (0 = best) of candidate c for query q; ties go to the lower index (stable sort)."""
    order = np.argsort(-sim, axis=1, kind="stable")
    pos = np.empty_like(order)
    rows = np.arange(sim.shape[0])[:, None]
    pos[rows, order] = np.arange(sim.shape[1])[None, :]
    return pos


def recall_at_k(
    sim_i2t: np.ndarray,
    txt2img: Sequence[int],
    img2txt: Sequence[Sequence[int]],
    ks: Sequence[int] = (1, 5, 10),
    sim_t2i: np.ndarray | None = None,
) -> dict[str, float]:
    """Image-text retrieval recall in percent, with LAVIS's key names.

    * text retrieval (``txt_r{k}``): an image query is correct when any of its texts ``img2txt[i]`` is among the
      k highest-scoring texts;
    * image retrieval (``img_r{k}``): a text query is correct when its image ``txt2img[t]`` is among the k
      highest-scoring images, ranked by ``sim_t2i`` ([n_txt, n_img]; default ``sim_i2t.T``; LAVIS re-ranks each
      direction separately, so the two may differ);
    * ``txt_r_mean`` / ``img_r_mean`` average over ``ks``; ``r_mean`` averages the two means.
    Ties are broken towards the lower index.
    """
    sim = np.asarray(sim_i2t, dtype=np.float64)
    if sim.ndim != 2:
        raise ValueError(f"sim_i2t: expected a 2-D [n_img, n_txt] array, got shape {sim.shape}")
    n_img, n_txt = sim.shape
    if len(img2txt) != n_img:
        raise ValueError(f"img2txt: has {len(img2txt)} entries but sim_i2t has {n_img} image rows")
    if len(txt2img) != n_txt:
        raise ValueError(f"txt2img: has {len(txt2img)} entries but sim_i2t has {n_txt} text columns")
    t2i = sim.T if sim_t2i is None else np.asarray(sim_t2i, dtype=np.float64)
    if t2i.shape != (n_txt, n_img):
        raise ValueError(f"sim_t2i: expected shape {(n_txt, n_img)}, got {t2i.shape}")
    for i, texts in enumerate(img2txt):
        if len(texts) == 0 or min(texts) < 0 or max(texts) >= n_txt:
            raise ValueError(f"img2txt[{i}]: needs text indices in [0, {n_txt}), got {list(texts)}")
    t2i_gt = np.asarray(txt2img, dtype=np.int64)
    if t2i_gt.size and (t2i_gt.min() < 0 or t2i_gt.max() >= n_img):
        raise ValueError(f"txt2img: image indices must lie in [0, {n_img})")

    pos_i2t = _positions(sim)
    tr_rank = np.array([pos_i2t[i, list(texts)].min() for i, texts in enumerate(img2txt)])
    pos_t2i = _positions(t2i)
    ir_rank = pos_t2i[np.arange(n_txt), t2i_gt]

    out: dict[str, float] = {}
    for k in ks:
        out[f"txt_r{k}"] = 100.0 * float(np.mean(tr_rank < k))
    for k in ks:
        out[f"img_r{k}"] = 100.0 * float(np.mean(ir_rank < k))
    out["txt_r_mean"] = float(np.mean([out[f"txt_r{k}"] for k in ks]))
    out["img_r_mean"] = float(np.mean([out[f"img_r{k}"] for k in ks]))
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2.0
    return out


# ------------------------------------------------------------------------------------------------------- captions
def _coco_dir() -> Path:
    import pycocoevalcap  # noqa: PLC0415 (namespace package: no __file__)

    return Path(next(iter(pycocoevalcap.__path__)))


def _spice_lib() -> Path:
    return _coco_dir() / "spice" / "lib"


def spice_available() -> bool:
    """True when the Stanford CoreNLP jars SPICE needs are present (pycocoevalcap would otherwise download them)."""
    lib = _spice_lib()
    return all((lib / name).is_file() for name in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"))


def _need_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError(
            "caption_scores: 'java' was not found on PATH; pycocoevalcap's PTB tokenizer and METEOR need a Java runtime"
        )


def caption_scores(
    preds: Mapping[Hashable, str],
    refs: Mapping[Hashable, Sequence[str]],
    spice: bool | Literal["auto"] = "auto",
) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE) of ``preds`` against ``refs``, with pycocoevalcap.

    Both sides are tokenised with the PTB tokenizer first, as ``COCOEvalCap`` does; scores cover exactly the ids
    in ``preds`` (as LAVIS sets ``params['image_id']`` to the result's ids). Keys: ``bleu_1``..``bleu_4``,
    ``meteor``, ``rouge_l``, ``cider``, ``spice`` (percent) and ``count``.

    ``spice``: ``False`` never; ``"auto"`` only when its CoreNLP jars are installed (otherwise one log line and no
    ``spice`` key; also skipped with a log line if the SPICE jar fails to run); ``True`` requires the jars and
    raises when they are missing or SPICE fails.
    """
    if not preds:
        raise ValueError("preds: no captions to score")
    for key, pred in preds.items():
        if key not in refs:
            raise ValueError(f"refs: no reference captions for image id {key!r}")
        if len(refs[key]) == 0:
            raise ValueError(f"refs: image id {key!r} has an empty reference list")
        if not isinstance(pred, str):
            raise ValueError(f"preds: caption of image id {key!r} must be a string, got {type(pred).__name__}")
    _need_java()
    if spice is True and not spice_available():
        raise FileNotFoundError(f"caption_scores(spice=True): Stanford CoreNLP 3.6.0 jars not found in {_spice_lib()}")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # noqa: PLC0415

    # string keys keep the tokenizer's dict ordering stable and make the id types uniform for the scorers
    ids = list(preds)
    keyed = {f"{i}": k for i, k in enumerate(ids)}
    gts_in = {s: [{"caption": clean_whitespace(c)} for c in refs[k]] for s, k in keyed.items()}
    res_in = {s: [{"caption": clean_whitespace(preds[k])}] for s, k in keyed.items()}
    from tqdm.auto import tqdm  # noqa: PLC0415

    # METEOR, SPICE and the tokenizer start java: minutes on a large split, so say which scorer runs
    bar = tqdm(total=6 if spice is not False else 5, desc="caption metrics", unit="scorer", leave=False)
    bar.set_postfix_str("PTB tokenizer")
    try:
        tok = PTBTokenizer()
        gts, res = tok.tokenize(gts_in), tok.tokenize(res_in)
    except (FileNotFoundError, OSError) as exc:
        bar.close()
        raise RuntimeError(f"caption_scores: the PTB tokenizer could not run java ({exc})") from exc
    try:
        out = _caption_scorers(gts, res, spice, bar)
    finally:
        bar.close()
    out["count"] = len(ids)
    return out


def _caption_scorers(gts: dict, res: dict, spice: bool | Literal["auto"], bar) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu  # noqa: PLC0415
    from pycocoevalcap.cider.cider import Cider  # noqa: PLC0415
    from pycocoevalcap.meteor.meteor import Meteor  # noqa: PLC0415
    from pycocoevalcap.rouge.rouge import Rouge  # noqa: PLC0415

    def step(name: str) -> None:
        bar.update(1)
        bar.set_postfix_str(name)

    out: dict[str, float] = {}
    step("BLEU")
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, value in enumerate(bleu, start=1):
        out[f"bleu_{n}"] = 100.0 * float(value)
    step("METEOR")
    try:
        meteor = Meteor()
    except (FileNotFoundError, OSError) as exc:
        raise RuntimeError(f"caption_scores: METEOR could not start java ({exc})") from exc
    try:
        out["meteor"] = 100.0 * float(meteor.compute_score(gts, res)[0])
    finally:
        _stop_meteor(meteor)
    step("ROUGE-L")
    out["rouge_l"] = 100.0 * float(Rouge().compute_score(gts, res)[0])
    step("CIDEr")
    out["cider"] = 100.0 * float(Cider().compute_score(gts, res)[0])

    if spice is not False:
        step("SPICE")
        value = _spice(gts, res, required=spice is True)
        if value is not None:
            out["spice"] = value
    bar.update(1)
    return out


def _stop_meteor(meteor) -> None:
    """End METEOR's java process and free the lock its ``compute_score`` holds while it waits for java. Its
    ``__del__`` takes that lock first, so after a Ctrl-C (or java dying) mid-score, the interpreter hung in it once
    the error was handled, until a second Ctrl-C; closed here, the later ``__del__`` finds nothing left to wait for."""
    proc = meteor.meteor_p
    proc.kill()  # a no-op when java has already exited
    proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        with contextlib.suppress(OSError):  # unflushed input to a dead process: nothing to deliver
            pipe.close()
    if meteor.lock.locked():
        meteor.lock.release()


def _spice(gts: dict, res: dict, required: bool) -> float | None:
    if not spice_available():
        log.info("SPICE skipped: Stanford CoreNLP 3.6.0 jars not found in %s", _spice_lib())
        return None
    from pycocoevalcap.spice.spice import Spice  # noqa: PLC0415

    try:
        return 100.0 * float(Spice().compute_score(gts, res)[0])
    except (subprocess.CalledProcessError, OSError) as exc:
        if required:
            raise RuntimeError(f"caption_scores: SPICE failed to run ({exc})") from exc
        log.info("SPICE skipped: the SPICE jar failed to run (%s)", exc)
        return None
