"""Record types and small typed datasets (a list of records plus image opening) for the evaluation tasks.

Text is stored exactly as in the annotation files; the evaluators apply ``ukmp.data.textclean.blip_question`` /
``blip_caption`` themselves. Images are opened lazily by ``open_image`` and returned as RGB PIL images.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from PIL import Image, UnidentifiedImageError

ImageId = int | str
QuestionId = int | str


@dataclass(frozen=True)
class ImageTextRecord:
    """One image-caption pair (CC595K, LAVIS caption JSON)."""

    id: str
    image: str
    caption: str


@dataclass(frozen=True)
class VQARecord:
    """One question: VQAv2 / OK-VQA have 10 answers, GQA exactly 1."""

    question_id: QuestionId
    image: str
    question: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class CaptionEvalRecord:
    """One image to caption (NoCaps, COCO Karpathy); references live in ``CaptionEvalDataset.refs``."""

    image_id: ImageId
    image: str


@dataclass(frozen=True)
class RetrievalRecord:
    """One image with its ground-truth texts (Flickr30K: 5)."""

    image: str
    captions: tuple[str, ...]


@dataclass(frozen=True)
class Origin:
    """Where a record came from, for error messages."""

    file: Path
    index: int


R = TypeVar("R")


class RecordDataset(Generic[R]):
    """An indexable list of records of one type, with the image root they refer to. :func:`ukmp.data.loaders.
    load_dataset` also sets ``prompt_style`` (the YAML's; ``None``: the model family's default) and ``source``
    (the YAML file, for messages)."""

    prompt_style: str | None = None
    source: Path | None = None

    def __init__(self, name: str, split: str, records: Sequence[R], origins: Sequence[Origin], images: Path):
        if len(records) != len(origins):
            raise ValueError("records and origins must have the same length")
        self.name = name
        self.split = split
        self.records: list[R] = list(records)
        self.origins: list[Origin] = list(origins)
        self.images = Path(images)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> R:
        return self.records[index]

    def __iter__(self) -> Iterator[R]:
        return iter(self.records)

    def __repr__(self) -> str:
        kind = type(self).__name__
        return f"{kind}(name={self.name!r}, split={self.split!r}, n={len(self)}, images={str(self.images)!r})"

    def image_path(self, index: int) -> Path:
        return self.images / self.records[index].image  # type: ignore[attr-defined]

    def open_image(self, index: int) -> Image.Image:
        """The record's image as an RGB PIL image; a one-line error names the image and the record's origin."""
        path = self.image_path(index)
        origin = self.origins[index]
        where = f"{origin.file}: record {origin.index} key 'image'"
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image file not found: {path}")
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            detail = " ".join(str(exc).split())
            raise ValueError(f"{where}: cannot read image {path} ({detail})") from exc


class ImageTextDataset(RecordDataset[ImageTextRecord]):
    """Image-caption pairs for calibration / recovery (CC595K) or LAVIS caption JSON."""


class VQADataset(RecordDataset[VQARecord]):
    """Questions with their ground-truth answers (VQAv2, OK-VQA, GQA)."""

    def gts(self) -> dict[QuestionId, list[str]]:
        """question_id -> answers, the input of ``ukmp.eval.metrics.vqa_score``."""
        return {r.question_id: list(r.answers) for r in self.records}

    def single_gts(self) -> dict[QuestionId, str]:
        """question_id -> the one answer (GQA), the input of ``ukmp.eval.metrics.gqa_accuracy``."""
        out: dict[QuestionId, str] = {}
        for r, o in zip(self.records, self.origins):
            if len(r.answers) != 1:
                raise ValueError(f"{o.file}: record {o.index} key 'answer' has {len(r.answers)} answers, expected 1")
            out[r.question_id] = r.answers[0]
        return out


class CaptionEvalDataset(RecordDataset[CaptionEvalRecord]):
    """Images to caption plus the reference captions of each (``refs``: image_id -> captions)."""

    def __init__(self, name: str, split: str, records: Sequence[CaptionEvalRecord], origins: Sequence[Origin],
                 images: Path, refs: dict[ImageId, list[str]]):
        super().__init__(name, split, records, origins, images)
        self.refs = {r.image_id: list(refs[r.image_id]) for r in self.records}


class RetrievalDataset(RecordDataset[RetrievalRecord]):
    """Images with their texts, flattened as LAVIS does: ``texts``, ``txt2img`` and ``img2txt`` (indices)."""

    def __init__(self, name: str, split: str, records: Sequence[RetrievalRecord], origins: Sequence[Origin],
                 images: Path):
        super().__init__(name, split, records, origins, images)
        self.texts: list[str] = []
        self.txt2img: list[int] = []
        self.img2txt: list[list[int]] = []
        for i, rec in enumerate(self.records):
            self.img2txt.append(list(range(len(self.texts), len(self.texts) + len(rec.captions))))
            self.texts.extend(rec.captions)
            self.txt2img.extend([i] * len(rec.captions))


@dataclass(frozen=True)
class TextRecord:
    """One plain-text file (perplexity and language-model calibration)."""

    file: str
    text: str


class TextDataset(RecordDataset[TextRecord]):
    """Plain text cut into token windows once a tokenizer is known (:meth:`windows`).

    The files are joined with a blank line between them and tokenised as one text, without special tokens; window
    ``w`` holds tokens ``w*stride ... w*stride + window - 1`` (a shorter last window is kept when it has at least two
    tokens). ``max_samples`` keeps the first N windows."""

    def __init__(self, name: str, split: str, records: Sequence[TextRecord], origins: Sequence[Origin],
                 window: int = 512, stride: int | None = None, max_windows: int | None = None):
        super().__init__(name, split, records, origins, Path("."))
        self.window, self.stride, self.max_windows = int(window), int(stride or window), max_windows

    def token_ids(self, tokenizer) -> list[int]:
        text = "\n\n".join(r.text for r in self.records)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def windows(self, tokenizer) -> list[tuple[int, list[int]]]:
        """``[(start, ids), ...]``: every window's first token position and its token ids."""
        ids = self.token_ids(tokenizer)
        out = []
        for start in range(0, max(len(ids) - 1, 0), self.stride):
            part = ids[start:start + self.window]
            if len(part) < 2:
                break
            out.append((start, part))
            if start + self.window >= len(ids):
                break
        if self.max_windows is not None:
            out = out[: self.max_windows]
        if not out:
            raise ValueError(f"{self.name}: the text has fewer than 2 tokens")
        return out
