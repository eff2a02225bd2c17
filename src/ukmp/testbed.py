"""easy-VQA as a real-data testbed: conversion into the dataset formats that ``ukmp.data.loaders`` reads.

easy-VQA (PyPI ``easy-vqa``) ships 64x64 PNGs of one coloured shape on a near-white background, and questions as
JSON triples ``[question, answer, image_id]`` in ``data/{train,test}/questions.json``. This module never imports the
package (its wheel also installs a top-level ``test`` package); :func:`easy_vqa_root` locates the data files.

Written under ``root`` by :func:`write_testbed_data`::

    images/{train,test}/<image_id>.png   copies (hard links when possible) of the easy-VQA images
    cc595k/metadata.json                 one caption per TRAIN image (calibration / recovery data)
    vqa/{train,test}.json                LAVIS VQA eval JSON, each answer replicated ANSWER_COPIES times
    gqa/test.json                        the test questions again, one answer each (exact-match scoring)
    configs/{cc595k,vqa_train,okvqa,gqa}.yaml   dataset YAMLs (absolute ``root``)

Caption rule (:func:`caption_for`): every question about an image gives facts. A colour or shape answer states the
attribute (and the shape or colour the question names, as in "what color is the circle?" -> red circle). A yes/no
question names one attribute; it is present when the answer is "yes" and the question is not negated ("not",
"is no ..."), or the answer is "no" and it is. Absent attributes are excluded; if the stated facts leave no value,
exclusion that leaves exactly one candidate decides. The caption is "a {colour} {shape} on a white background",
with "a {shape} ..." or "a {colour} shape ..." when an attribute stays unknown. Conflicting facts are an error.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")
ANSWER_COPIES = 10  # with 10 identical answers the official VQA accuracy of a prediction is 1 or 0: exact match
SPLITS = ("train", "test")


@dataclass(frozen=True)
class EasyVQAQuestion:
    question: str
    answer: str
    image_id: int


def easy_vqa_root() -> Path:
    """The installed easy-VQA ``data`` directory (found without importing the package)."""
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("easy_vqa: package not installed (pip install 'ukmp[testbed]')")
    root = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not (root / "answers.txt").is_file():
        raise FileNotFoundError(f"{root / 'answers.txt'}: easy-VQA data files not found")
    return root


def default_cache_dir(env: str = "UKMP_TESTBED", name: str = "testbed") -> Path:
    """``$<env>`` (default ``$UKMP_TESTBED``), else ``${XDG_CACHE_HOME:-~/.cache}/ukmp/<name>``."""
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(base) / "ukmp" / name


def read_answers(path: Path) -> list[str]:
    answers = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not answers:
        raise ValueError(f"{path}: no answers")
    return answers


def colours_of(answers: Sequence[str]) -> tuple[str, ...]:
    """The colour vocabulary: every answer that is neither a shape nor yes/no."""
    return tuple(a for a in answers if a not in SHAPES and a not in YES_NO)


def read_questions(path: Path) -> list[EasyVQAQuestion]:
    """``questions.json``: a list of ``[question, answer, image_id]``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: questions file not found")
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of [question, answer, image_id]")
    out = []
    for i, row in enumerate(data):
        ok = (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and isinstance(row[1], str)
              and isinstance(row[2], int))
        if not ok:
            raise ValueError(f"{path}: record {i} is not [question, answer, image_id]")
        out.append(EasyVQAQuestion(row[0], row[1], row[2]))
    return out


def _named(words: list[str], vocab: Iterable[str]) -> str | None:
    hits = [w for w in words if w in vocab]
    return hits[0] if hits else None


def image_attributes(questions: Sequence[EasyVQAQuestion], colours: Sequence[str]) -> tuple[str | None, str | None]:
    """(colour, shape) of one image from its questions (the rule in the module docstring); None when unknown."""
    stated: dict[str, set[str]] = {"colour": set(), "shape": set()}
    excluded: dict[str, set[str]] = {"colour": set(), "shape": set()}
    for q in questions:
        words = re.findall(r"[a-z]+", q.question.lower())
        colour, shape, answer = _named(words, colours), _named(words, SHAPES), q.answer.strip().lower()
        if answer in colours:
            stated["colour"].add(answer)
            if shape:
                stated["shape"].add(shape)
        elif answer in SHAPES:
            stated["shape"].add(answer)
            if colour:
                stated["colour"].add(colour)
        elif answer in YES_NO:
            negated = "not" in words or (words[:2] == ["is", "no"])
            present = (answer == "yes") != negated
            for key, value in (("colour", colour), ("shape", shape)):
                if value:
                    (stated if present else excluded)[key].add(value)
    result = []
    for key, vocab in (("colour", colours), ("shape", SHAPES)):
        values = stated[key]
        if len(values) > 1 or values & excluded[key]:
            image = questions[0].image_id if questions else "?"
            raise ValueError(f"image {image}: conflicting {key} facts {sorted(values)} / not {sorted(excluded[key])}")
        left = [v for v in vocab if v not in excluded[key]]
        result.append(next(iter(values)) if values else (left[0] if len(left) == 1 else None))
    return result[0], result[1]


def caption_for(colour: str | None, shape: str | None) -> str:
    if shape is None:
        return f"a {colour} shape on a white background" if colour else "a shape on a white background"
    return f"a {colour} {shape} on a white background" if colour else f"a {shape} on a white background"


def image_name(split: str, image_id: int) -> str:
    return f"{split}/{image_id}.png"


def captions(questions: Sequence[EasyVQAQuestion], colours: Sequence[str], split: str = "train") -> list[dict[str, Any]]:
    """CC595K-style metadata records ``{id, image, caption, blip_caption, colour, shape}``, one per image, by image
    id (``colour``/``shape`` are null when unknown; the loader ignores them)."""
    by_image: dict[int, list[EasyVQAQuestion]] = {}
    for q in questions:
        by_image.setdefault(q.image_id, []).append(q)
    out = []
    for image_id in sorted(by_image):
        colour, shape = image_attributes(by_image[image_id], colours)
        text = caption_for(colour, shape)
        out.append({"id": f"easyvqa_{split}_{image_id}", "image": image_name(split, image_id),
                    "caption": text, "blip_caption": text, "colour": colour, "shape": shape})
    return out


def vqa_records(questions: Sequence[EasyVQAQuestion], split: str, copies: int = ANSWER_COPIES,
                shuffle_seed: int | None = None) -> list[dict[str, Any]]:
    """LAVIS VQA eval records; ``question_id`` is the index in ``questions.json``. ``shuffle_seed`` fixes a random
    record order, so that ``max_samples: N`` takes a random subset of N questions."""
    if copies < 1:
        raise ValueError(f"copies: must be >= 1, got {copies}")
    recs = [{"question_id": i, "image": image_name(split, q.image_id), "question": q.question,
             "answer": [q.answer] * copies} for i, q in enumerate(questions)]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(recs)
    return recs


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.is_file() and dst.stat().st_size == src.stat().st_size:
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def dataset_yaml(path: Path, root: Path, fmt: str, annotations: str, split: str) -> Path:
    from omegaconf import OmegaConf  # noqa: PLC0415

    from ukmp.io import atomic_write_text  # noqa: PLC0415

    data = {"format": fmt, "root": str(Path(root).resolve()), "annotations": annotations, "images": "images",
            "split": split, "max_samples": None}
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(data)))
    return path


def write_testbed_data(root: Path, source: Path | None = None, copy_images: bool = True) -> dict[str, Any]:
    """Convert easy-VQA (``source``: its ``data`` directory; default the installed package) under ``root``.

    Returns ``{"configs": {name: yaml path}, "counts": {...}, "colours": [...]}``.
    """
    from ukmp.io import atomic_write_json  # noqa: PLC0415

    source = Path(source) if source is not None else easy_vqa_root()
    root = Path(root).resolve()
    colours = colours_of(read_answers(source / "answers.txt"))
    qs = {split: read_questions(source / split / "questions.json") for split in SPLITS}
    counts: dict[str, int] = {}
    for split in SPLITS:
        ids = sorted({q.image_id for q in qs[split]})
        for image_id in ids if copy_images else []:
            src = source / split / "images" / f"{image_id}.png"
            if not src.is_file():
                raise FileNotFoundError(f"{src}: image of a {split} question not found")
            _link_or_copy(src, root / "images" / image_name(split, image_id))
        counts[f"{split}_images"] = len(ids)
        counts[f"{split}_questions"] = len(qs[split])
    meta = captions(qs["train"], colours, "train")
    counts["captions"] = len(meta)
    counts["captions_complete"] = sum(bool(m["colour"] and m["shape"]) for m in meta)
    atomic_write_json(root / "cc595k" / "metadata.json", meta)
    atomic_write_json(root / "vqa" / "train.json", vqa_records(qs["train"], "train"))
    atomic_write_json(root / "vqa" / "test.json", vqa_records(qs["test"], "test", shuffle_seed=0))
    gqa = [{**r, "answer": r["answer"][0]} for r in vqa_records(qs["test"], "test", copies=1, shuffle_seed=0)]
    atomic_write_json(root / "gqa" / "test.json", gqa)
    cfg_dir = root / "configs"
    configs = {
        "cc595k": dataset_yaml(cfg_dir / "cc595k.yaml", root, "cc595k", "cc595k/metadata.json", "train"),
        "vqa_train": dataset_yaml(cfg_dir / "vqa_train.yaml", root, "okvqa", "vqa/train.json", "train"),
        "okvqa": dataset_yaml(cfg_dir / "okvqa.yaml", root, "okvqa", "vqa/test.json", "test"),
        "gqa": dataset_yaml(cfg_dir / "gqa.yaml", root, "gqa", "gqa/test.json", "test"),
    }
    return {"configs": {k: str(v) for k, v in configs.items()}, "counts": counts, "colours": list(colours)}
