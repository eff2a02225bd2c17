"""Tiny, deterministic sample data in the real datasets' file formats, for the demo pipeline and the tests.

``write_sample_data(root)`` draws ``n_images`` small PNGs (one coloured shape on a coloured background, named like
COCO files so that COCO-style image ids parse) and writes, next to them, annotation files in the formats of
``ukmp.data.loaders`` plus one YAML per dataset under ``root/configs``. The same ``(n_images, seed)`` always gives
byte-identical files.
"""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "purple": (140, 50, 170), "orange": (245, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class SampleImage:
    image_id: int
    file: str          # relative to the images root
    colour: str
    shape: str
    background: str


def _draw(spec: SampleImage, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), COLOURS[spec.background])
    draw = ImageDraw.Draw(img)
    size = rng.randint(IMAGE_SIZE // 3, IMAGE_SIZE // 2)
    x0, y0 = rng.randint(2, IMAGE_SIZE - size - 2), rng.randint(2, IMAGE_SIZE - size - 2)
    box = (x0, y0, x0 + size, y0 + size)
    fill = COLOURS[spec.colour]
    if spec.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif spec.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + size // 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=fill)
    return img


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _captions(s: SampleImage) -> list[str]:
    c, sh, bg = s.colour, s.shape, s.background
    return [
        f"a {c} {sh} on a {bg} background.",
        f"A {c} {sh} in front of a {bg} wall",
        f"a picture of one {c} {sh}",
        f"the {sh} is {c} and the background is {bg}",
        f"a simple {bg} image with a {c} {sh} in it",
    ]


def _vqa_answers(main: str, other: str) -> list[str]:
    """Ten annotator answers: mostly ``main``, a few disagreeing (exercises the leave-one-out average)."""
    return [main] * 7 + [other, main + ".", other]


def _yaml(path: Path, data: dict[str, Any]) -> None:
    from omegaconf import OmegaConf  # noqa: PLC0415

    from ukmp.io import atomic_write_text  # noqa: PLC0415

    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(data)))


def write_sample_data(root: Path, n_images: int = 8, seed: int = 0) -> dict[str, Path]:
    """Write the sample datasets under ``root``; return ``{dataset name: YAML path}`` (names as in ``LOADERS``)."""
    from ukmp.io import atomic_write_json  # noqa: PLC0415

    if n_images < 2:
        raise ValueError(f"n_images: need at least 2 images, got {n_images}")
    root = Path(root).resolve()
    rng = random.Random(seed)
    names = list(COLOURS)
    specs = []
    for i in range(n_images):
        colour = names[(i + rng.randrange(len(names))) % len(names)]
        background = rng.choice([n for n in names if n != colour])
        image_id = i + 1
        specs.append(SampleImage(image_id, f"val2014/COCO_val2014_{image_id:012d}.png", colour,
                                 SHAPES[i % len(SHAPES)], background))
    for s in specs:
        buf = io.BytesIO()
        _draw(s, rng).save(buf, format="PNG")
        _write_bytes(root / "images" / s.file, buf.getvalue())

    # CC595K (LLaVA metadata.json): every third record lacks blip_caption, so the raw caption is used
    meta = []
    for s in specs:
        rec = {"id": f"GCC_train_{s.image_id:09d}", "image": s.file, "caption": f"{s.colour} {s.shape} , stock photo",
               "url": f"http://example.invalid/{s.image_id}.jpg"}
        if s.image_id % 3:
            rec["blip_caption"] = f"a {s.colour} {s.shape} on a {s.background} background"
        meta.append(rec)
    files: dict[str, Any] = {"cc595k/metadata.json": meta}
    files["caption/coco_karpathy_train.json"] = [
        {"image": s.file, "caption": _captions(s)[0], "image_id": f"coco_{s.image_id}"} for s in specs
    ]
    files["vqav2/vqa_val_eval.json"] = [
        {"question_id": s.image_id * 1000 + k, "image": s.file, "question": q, "answer": a}
        for s in specs
        for k, (q, a) in enumerate([
            ("What color is the shape?", _vqa_answers(s.colour, s.background)),
            ("How many shapes are there?", ["1"] * 8 + ["one", "2"]),
        ])
    ]
    files["okvqa/okvqa_val_eval.json"] = [
        {"question_id": s.image_id * 10 + 7, "image": s.file, "question": "Which shape is drawn in this picture?",
         "answer": _vqa_answers(s.shape, "the " + s.shape)} for s in specs
    ]
    files["gqa/testdev_balanced_questions.json"] = [
        {"question_id": f"{s.image_id:06d}{k}", "image": s.file, "question": q, "answer": a}
        for s in specs
        for k, (q, a) in enumerate([
            (f"Is the shape {s.colour}?", "yes"),
            ("What color is the background?", s.background),
        ])
    ]
    # NoCaps: LAVIS list {image, img_id} + the official COCO-format GT; COCO Karpathy: captions in the records + GT
    files["nocaps/nocaps_val.json"] = [{"image": s.file, "img_id": s.image_id - 1} for s in specs]
    files["nocaps/nocaps_val_4500_captions.json"] = _coco_gt(specs, id_offset=-1)
    files["coco_karpathy/coco_karpathy_test.json"] = [{"image": s.file, "caption": _captions(s)} for s in specs]
    files["coco_karpathy/coco_karpathy_test_gt.json"] = _coco_gt(specs, id_offset=0)
    files["flickr30k/flickr30k_test.json"] = [{"image": s.file, "caption": _captions(s)} for s in specs]
    for rel, data in files.items():
        atomic_write_json(root / rel, data)

    configs = {
        "cc595k": {"annotations": "cc595k/metadata.json", "split": "train"},
        "caption": {"annotations": "caption/coco_karpathy_train.json", "split": "train"},
        "vqav2": {"annotations": "vqav2/vqa_val_eval.json", "split": "val"},
        "okvqa": {"annotations": "okvqa/okvqa_val_eval.json", "split": "test"},
        "gqa": {"annotations": "gqa/testdev_balanced_questions.json", "split": "testdev"},
        "nocaps": {"annotations": "nocaps/nocaps_val.json", "gt": "nocaps/nocaps_val_4500_captions.json",
                   "split": "val"},
        "coco_karpathy": {"annotations": "coco_karpathy/coco_karpathy_test.json",
                          "gt": "coco_karpathy/coco_karpathy_test_gt.json", "split": "test"},
        "flickr30k": {"annotations": "flickr30k/flickr30k_test.json", "split": "test"},
    }
    out: dict[str, Path] = {}
    for name, cfg in configs.items():
        path = root / "configs" / f"{name}.yaml"
        _yaml(path, {"format": name, "root": str(root), "images": "images", **cfg, "max_samples": None})
        out[name] = path
    return out


def write_sample_text(root: Path, window: int = 64) -> Path:
    """The sample ``text`` dataset (format ``text``: perplexity, language-model calibration); its YAML path."""
    from ukmp.io import atomic_write_text  # noqa: PLC0415

    root = Path(root).resolve()
    atomic_write_text(root / "text" / "sample.txt", sample_text())
    path = root / "configs" / "text.yaml"
    _yaml(path, {"format": "text", "root": str(root), "annotations": "text/sample.txt", "split": "test",
                 "window": window, "max_samples": None})
    return path


def sample_text(n_chars: int = 6000) -> str:
    """Real English prose that ships with Python (the standard library's ``pydoc_data.topics``, keys in sorted
    order), its first ``n_chars`` characters: the sample ``text`` dataset."""
    from pydoc_data.topics import topics  # noqa: PLC0415

    return "\n\n".join(topics[k] for k in sorted(topics))[:n_chars]


def _coco_gt(specs: list[SampleImage], id_offset: int) -> dict[str, Any]:
    images = [{"id": s.image_id + id_offset, "file_name": s.file, "height": IMAGE_SIZE, "width": IMAGE_SIZE}
              for s in specs]
    anns, ann_id = [], 0
    for s in specs:
        for c in _captions(s):
            anns.append({"image_id": s.image_id + id_offset, "id": ann_id, "caption": c})
            ann_id += 1
    return {"info": {"description": "ukmp sample data"}, "licenses": [], "type": "captions",
            "images": images, "annotations": anns}

