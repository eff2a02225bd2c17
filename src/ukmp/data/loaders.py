"""Loaders for the annotation files users already have (LAVIS exports and the official releases).

``load_dataset("configs/datasets/okvqa.yaml")`` reads the YAML, picks the loader named by its ``format`` key from
``LOADERS`` and returns a typed dataset (``ukmp.data.records``). Formats:

============== ===================================================================================================
cc595k         LLaVA CC3M-595K ``metadata.json`` (``blip_caption``, falling back to ``caption``) or ``chat.json``
               (the "gpt" turn of ``conversations``); records need ``image``.
caption        LAVIS caption JSON: a list of ``{image, caption}`` (caption a string or a list; optional image_id).
vqav2 / okvqa  LAVIS eval JSON: a list of ``{question_id, image, question, answer}`` (``answer`` or ``answers``,
               a string or a list); or the official pair [questions JSON, annotations JSON].
gqa            LAVIS JSON: a list of ``{question_id, image, question, answer}``; or the official
               ``testdev_balanced_questions.json`` (a mapping question_id -> ``{imageId, question, answer}``).
nocaps         LAVIS ``nocaps_val.json`` (``{image, img_id}``) with ``gt:`` a COCO-format caption file (the
               official ``nocaps_val_4500_captions.json``); or that COCO file alone as ``annotations``.
coco_karpathy  LAVIS ``coco_karpathy_test.json`` (``{image, caption: [...]}``; the image id is the number at the end
               of the file name, as LAVIS does) with optional ``gt:`` (``coco_karpathy_test_gt.json``); without
               ``gt`` the references are the records' captions.
flickr30k      LAVIS retrieval JSON: a list of ``{image, caption: [5 texts]}``.
text           plain UTF-8 text files (``annotations``), cut into token windows (``window``, ``stride``) for
               perplexity and language-model calibration; no ``images``.
============== ===================================================================================================

Every problem raises a one-line error naming the file and, for records, the index and key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ukmp.data.config import DatasetConfig, load_dataset_config
from ukmp.data.records import (
    CaptionEvalDataset,
    CaptionEvalRecord,
    ImageTextDataset,
    ImageTextRecord,
    Origin,
    RecordDataset,
    RetrievalDataset,
    RetrievalRecord,
    TextDataset,
    TextRecord,
    VQADataset,
    VQARecord,
)

Loader = Callable[[DatasetConfig], RecordDataset]


# ------------------------------------------------------------------------------------------------------- helpers
def read_json(path: Path, key: str = "annotations") -> Any:
    """Parse a JSON file; a missing file or bad JSON gives a one-line error naming the file and config key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"'{key}' file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason})") from exc


def _list_of_records(data: Any, path: Path) -> list[dict]:
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _get(rec: Any, key: str, path: Path, index: int, types: tuple[type, ...] = (str,)) -> Any:
    if not isinstance(rec, dict):
        raise ValueError(f"{path}: record {index} is not a JSON object")
    if key not in rec:
        raise ValueError(f"{path}: record {index} has no key '{key}'")
    value = rec[key]
    if not isinstance(value, types) or isinstance(value, bool):
        names = " or ".join(t.__name__ for t in types)
        raise ValueError(f"{path}: record {index} key '{key}' must be {names}, got {type(value).__name__}")
    return value


def _texts(value: Any, path: Path, index: int, key: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(t, str) for t in items):
        raise ValueError(f"{path}: record {index} key '{key}' must be a string or a non-empty list of strings")
    return tuple(items)


def _check_images_root(cfg: DatasetConfig) -> None:
    if not cfg.images.is_dir():
        origin = f" (from {cfg.source})" if cfg.source else ""
        raise FileNotFoundError(f"'images' directory not found: {cfg.images}{origin}")


def _limit(cfg: DatasetConfig, *lists: list) -> tuple[list, ...]:
    n = cfg.max_samples
    return tuple(lst[:n] if n is not None else lst for lst in lists)


def _image_id_from_name(image: str) -> int | str:
    """COCO convention used by LAVIS: ``val2014/COCO_val2014_000000391895.jpg`` -> 391895."""
    tail = Path(image).stem.split("_")[-1]
    return int(tail) if tail.isdigit() else tail


# ------------------------------------------------------------------------------------------------ image + text
def load_cc595k(cfg: DatasetConfig) -> ImageTextDataset:
    records, origins = [], []
    for path in cfg.annotations:
        for i, rec in enumerate(_list_of_records(read_json(path), path)):
            image = _get(rec, "image", path, i)
            caption = None
            for key in ("blip_caption", "caption"):
                if isinstance(rec.get(key), str) and rec[key].strip():
                    caption = rec[key]
                    break
            if caption is None and "conversations" in rec:
                turns = _get(rec, "conversations", path, i, (list,))
                caption = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"), None)
            if not isinstance(caption, str):
                raise ValueError(
                    f"{path}: record {i} has no key 'blip_caption', 'caption' or a 'gpt' turn in 'conversations'"
                )
            rid = rec.get("id", Path(image).stem)
            records.append(ImageTextRecord(id=str(rid), image=image, caption=caption))
            origins.append(Origin(path, i))
    records, origins = _limit(cfg, records, origins)
    return ImageTextDataset(cfg.label, cfg.split, records, origins, cfg.images)


def load_caption(cfg: DatasetConfig) -> ImageTextDataset:
    records, origins = [], []
    for path in cfg.annotations:
        for i, rec in enumerate(_list_of_records(read_json(path), path)):
            image = _get(rec, "image", path, i)
            captions = _texts(_get(rec, "caption", path, i, (str, list)), path, i, "caption")
            rid = str(rec.get("image_id", Path(image).stem))
            for c in captions:
                records.append(ImageTextRecord(id=rid, image=image, caption=c))
                origins.append(Origin(path, i))
    records, origins = _limit(cfg, records, origins)
    return ImageTextDataset(cfg.label, cfg.split, records, origins, cfg.images)


# ---------------------------------------------------------------------------------------------------------- VQA
def _vqa_official(questions: dict, q_path: Path, anns: Any, a_path: Path) -> tuple[list[VQARecord], list[Origin]]:
    """The official VQA pair: ``{"questions": [...], "data_subtype": "val2014"}`` + ``{"annotations": [...]}``."""
    if not isinstance(anns, dict) or not isinstance(anns.get("annotations"), list):
        raise ValueError(f"{a_path}: has no key 'annotations' (official VQA annotations file expected)")
    subtype = questions.get("data_subtype")
    if not isinstance(subtype, str):
        raise ValueError(f"{q_path}: has no key 'data_subtype' (needed to name the COCO images)")
    answers: dict[Any, tuple[str, ...]] = {}
    for i, ann in enumerate(anns["annotations"]):
        qid = _get(ann, "question_id", a_path, i, (int, str))
        items = _get(ann, "answers", a_path, i, (list,))
        answers[qid] = tuple(_get(a, "answer", a_path, i) for a in items)
    records, origins = [], []
    for i, q in enumerate(questions["questions"]):
        qid = _get(q, "question_id", q_path, i, (int, str))
        image_id = _get(q, "image_id", q_path, i, (int,))
        if qid not in answers:
            raise ValueError(f"{a_path}: no entry with 'question_id' {qid!r} (asked in {q_path})")
        image = f"{subtype}/COCO_{subtype}_{image_id:012d}.jpg"
        records.append(VQARecord(qid, image, _get(q, "question", q_path, i), answers[qid]))
        origins.append(Origin(q_path, i))
    return records, origins


def load_vqa(cfg: DatasetConfig) -> VQADataset:
    first = read_json(cfg.annotations[0])
    if isinstance(first, dict) and "questions" in first:
        if len(cfg.annotations) < 2:
            raise ValueError(
                f"{cfg.annotations[0]}: an official questions file needs the annotations file as the second "
                "'annotations' entry"
            )
        records, origins = _vqa_official(first, cfg.annotations[0], read_json(cfg.annotations[1]), cfg.annotations[1])
    else:
        records, origins = [], []
        for j, path in enumerate(cfg.annotations):
            data = first if j == 0 else read_json(path)
            for i, rec in enumerate(_list_of_records(data, path)):
                key = "answer" if isinstance(rec, dict) and "answer" in rec else "answers"
                answers = _texts(_get(rec, key, path, i, (str, list)), path, i, key)
                records.append(VQARecord(
                    question_id=_get(rec, "question_id", path, i, (int, str)),
                    image=_get(rec, "image", path, i),
                    question=_get(rec, "question", path, i),
                    answers=answers,
                ))
                origins.append(Origin(path, i))
    records, origins = _limit(cfg, records, origins)
    return VQADataset(cfg.label, cfg.split, records, origins, cfg.images)


def load_gqa(cfg: DatasetConfig) -> VQADataset:
    records, origins = [], []
    for path in cfg.annotations:
        data = read_json(path)
        if isinstance(data, dict):  # official release: question_id -> {imageId, question, answer, ...}
            for i, (qid, rec) in enumerate(data.items()):
                image = f"{_get(rec, 'imageId', path, i)}.jpg"
                records.append(VQARecord(qid, image, _get(rec, "question", path, i), (_get(rec, "answer", path, i),)))
                origins.append(Origin(path, i))
            continue
        for i, rec in enumerate(_list_of_records(data, path)):
            records.append(VQARecord(
                question_id=_get(rec, "question_id", path, i, (int, str)),
                image=_get(rec, "image", path, i),
                question=_get(rec, "question", path, i),
                answers=(_get(rec, "answer", path, i),),
            ))
            origins.append(Origin(path, i))
    records, origins = _limit(cfg, records, origins)
    return VQADataset(cfg.label, cfg.split, records, origins, cfg.images)


# ------------------------------------------------------------------------------------------------------ captions
def read_coco_captions(path: Path, key: str = "gt") -> tuple[dict[Any, str], dict[Any, list[str]]]:
    """A COCO-format caption file -> (image_id -> file_name, image_id -> reference captions)."""
    data = read_json(path, key)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: has no key 'annotations' (COCO-format caption file expected)")
    files: dict[Any, str] = {}
    for i, img in enumerate(data.get("images", [])):
        image_id = _get(img, "id", path, i, (int, str))
        if isinstance(img, dict) and isinstance(img.get("file_name"), str):
            files[image_id] = img["file_name"]
    refs: dict[Any, list[str]] = {}
    for i, ann in enumerate(data["annotations"]):
        image_id = _get(ann, "image_id", path, i, (int, str))
        refs.setdefault(image_id, []).append(_get(ann, "caption", path, i))
    return files, refs


def _caption_eval(cfg: DatasetConfig, id_key: str | None) -> CaptionEvalDataset:
    """``id_key``: the record key holding the image id, or None to take it from the file name (COCO)."""
    first = read_json(cfg.annotations[0])
    records, origins = [], []
    refs: dict[Any, list[str]] = {}
    if isinstance(first, dict):  # a COCO-format file on its own: records and references from it
        files, refs = read_coco_captions(cfg.annotations[0], "annotations")
        for i, (image_id, name) in enumerate(files.items()):
            records.append(CaptionEvalRecord(image_id, name))
            origins.append(Origin(cfg.annotations[0], i))
        refs_source = cfg.annotations[0]
    else:
        for j, path in enumerate(cfg.annotations):
            for i, rec in enumerate(_list_of_records(first if j == 0 else read_json(path), path)):
                image = _get(rec, "image", path, i)
                image_id = _get(rec, id_key, path, i, (int, str)) if id_key else _image_id_from_name(image)
                records.append(CaptionEvalRecord(image_id, image))
                origins.append(Origin(path, i))
                if cfg.gt is None:  # references must come from the records themselves
                    if "caption" not in rec:
                        raise ValueError(f"{path}: record {i} has no key 'caption' and no 'gt' file is configured")
                    refs[image_id] = list(_texts(rec["caption"], path, i, "caption"))
        refs_source = cfg.gt or cfg.annotations[0]
        if cfg.gt is not None:
            refs = read_coco_captions(cfg.gt)[1]
    records, origins = _limit(cfg, records, origins)
    for rec in records:
        if rec.image_id not in refs:
            raise ValueError(f"{refs_source}: no reference caption with 'image_id' {rec.image_id!r}")
    return CaptionEvalDataset(cfg.label, cfg.split, records, origins, cfg.images, refs)


def load_nocaps(cfg: DatasetConfig) -> CaptionEvalDataset:
    return _caption_eval(cfg, id_key="img_id")


def load_coco_karpathy(cfg: DatasetConfig) -> CaptionEvalDataset:
    return _caption_eval(cfg, id_key=None)


# ----------------------------------------------------------------------------------------------------- retrieval
def load_retrieval(cfg: DatasetConfig) -> RetrievalDataset:
    records, origins = [], []
    for path in cfg.annotations:
        for i, rec in enumerate(_list_of_records(read_json(path), path)):
            image = _get(rec, "image", path, i)
            captions = _texts(_get(rec, "caption", path, i, (str, list)), path, i, "caption")
            records.append(RetrievalRecord(image, captions))
            origins.append(Origin(path, i))
    records, origins = _limit(cfg, records, origins)
    return RetrievalDataset(cfg.label, cfg.split, records, origins, cfg.images)


def load_text(cfg: DatasetConfig) -> TextDataset:
    records, origins = [], []
    for path in cfg.annotations:
        if not Path(path).is_file():
            raise FileNotFoundError(f"'annotations' file not found: {path}")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        records.append(TextRecord(str(path), text))
        origins.append(Origin(Path(path), 0))
    return TextDataset(cfg.label, cfg.split, records, origins, cfg.window, cfg.stride, cfg.max_samples)


# ------------------------------------------------------------------------------------------------------ registry
LOADERS: dict[str, Loader] = {
    "cc595k": load_cc595k,
    "caption": load_caption,
    "vqav2": load_vqa,
    "okvqa": load_vqa,
    "gqa": load_gqa,
    "nocaps": load_nocaps,
    "coco_karpathy": load_coco_karpathy,
    "flickr30k": load_retrieval,
}
TEXT_LOADERS: dict[str, Loader] = {"text": load_text}  # formats without images


def register_loader(name: str, loader: Loader) -> None:
    """Add a format; names are unique and the loader must be callable."""
    if not name or name in LOADERS or name in TEXT_LOADERS:
        raise ValueError(f"format: {name!r} is empty or already registered")
    if not callable(loader):
        raise ValueError(f"format {name!r}: loader must be callable")
    LOADERS[name] = loader


def load_dataset(config: DatasetConfig | str | os.PathLike, **overrides: Any) -> RecordDataset:
    """Load a dataset from a ``DatasetConfig`` or a YAML path (``overrides`` replace YAML keys, e.g. max_samples)."""
    if isinstance(config, DatasetConfig):
        cfg = replace(config, **overrides) if overrides else config
    else:
        cfg = load_dataset_config(config, **overrides)
    if cfg.format in TEXT_LOADERS:
        return _with_config(TEXT_LOADERS[cfg.format](cfg), cfg)
    if cfg.format not in LOADERS:
        where = f"{cfg.source}: " if cfg.source else ""
        known = ", ".join(sorted({*LOADERS, *TEXT_LOADERS}))
        raise ValueError(f"{where}key 'format' is {cfg.format!r}; known formats: {known}")
    _check_images_root(cfg)
    return _with_config(LOADERS[cfg.format](cfg), cfg)


def _with_config(ds: RecordDataset, cfg: DatasetConfig) -> RecordDataset:
    """``ds`` carrying what its tasks read from the YAML besides records: ``prompt_style`` and the file itself."""
    ds.prompt_style, ds.source = cfg.prompt_style, cfg.source
    return ds
