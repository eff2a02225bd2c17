"""Images to model pixels: :class:`ImageTransform` and its sizing helpers.

* :class:`ImageTransform` — the reference's ``blip2_image_train`` (RandomResizedCrop scale (0.5, 1), bicubic,
  horizontal flip, CLIP mean/std) and ``blip_image_eval`` (bicubic square resize), written with PIL and numpy; the
  Idefics3 / SmolVLM resize (``resize="idefics3"``) and Qwen-VL's aspect-keeping sizes (``fit_unit``).
* :func:`longest_edge_size` — the Idefics3 processor's first resize (longest edge, aspect kept, even sides).

Both the calibration / recovery collators (:mod:`ukmp.data.batches`, which re-exports these names) and the
evaluators read images through here, so a model sees the same pixels in every stage.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ukmp.data.resolution import fit_size

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


RESIZES = ("bicubic", "idefics3")


@dataclass(frozen=True)
class ImageTransform:
    """An image to ``[3, size, size]`` float32 pixels: resized (``resize``), scaled to [0, 1] and normalised with
    ``mean`` / ``std``. ``resize="bicubic"`` is one bicubic square resize (BLIP-2, LLaVA); ``"idefics3"`` is what
    the Idefics3 / SmolVLM image processor does without tiling: the longest edge to ``size`` (aspect kept, the other
    edge rounded up to even), then a square ``size`` x ``size``, both Lanczos. Training adds the random resized crop
    and flip before the square resize (:meth:`crop_box`). With ``fit_unit`` (Qwen-VL, bicubic only) the output is
    not square: ``size`` is the side of the largest area, and the image (or the training crop) keeps its aspect
    ratio with sides multiples of ``fit_unit`` (:func:`fit_size`)."""

    size: int
    train: bool = False
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    resize: str = "bicubic"
    fit_unit: int = 0

    def __post_init__(self) -> None:
        if self.resize not in RESIZES:
            raise ValueError(f"image resize: {self.resize!r} is not one of {', '.join(RESIZES)}")
        if self.fit_unit and self.resize != "bicubic":
            raise ValueError(f"image resize: {self.resize!r} reads square images; fit_unit needs 'bicubic'")

    @classmethod
    def for_layout(cls, layout, size: int | None = None, train: bool = False,
                   native: bool = False) -> "ImageTransform":
        """The transform a model's :class:`~ukmp.models.BatchLayout` asks for, at ``size`` (default: the layout's).
        ``native``: a ``native_resolution`` layout's images keep their aspect ratio (the collators); else square
        (evaluation reads every image at ``size`` x ``size``)."""
        return cls(int(size or layout.image_size), train=train, mean=tuple(layout.image_mean or CLIP_MEAN),
                   std=tuple(layout.image_std or CLIP_STD), resize=layout.image_resize,
                   fit_unit=int(layout.patch_size) if native and layout.native_resolution else 0)

    def out_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the output for a source (or crop) of ``width x height``."""
        if not self.fit_unit:
            return self.size, self.size
        h, w = fit_size(height, width, self.fit_unit, self.size * self.size, self.fit_unit * self.fit_unit)
        return w, h

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """RandomResizedCrop's box: 10 tries of (area fraction, log-uniform aspect), else a centre crop."""
        area = width * height
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_r))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                return left, top, left + w, top + h
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        image = image.convert("RGB")
        resample = Image.LANCZOS if self.resize == "idefics3" else Image.BICUBIC
        if self.train:
            rng = rng or random.Random(0)
            box = self.crop_box(image.width, image.height, rng)
            image = image.resize(self.out_size(box[2] - box[0], box[3] - box[1]), resample, box=box)
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            if self.resize == "idefics3":
                image = image.resize(longest_edge_size(image.width, image.height, self.size), resample)
            image = image.resize(self.out_size(image.width, image.height), resample)
        arr = np.asarray(image, dtype=np.float32) / 255.0
        arr = (arr - np.array(self.mean, dtype=np.float32)) / np.array(self.std, dtype=np.float32)
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def longest_edge_size(width: int, height: int, longest: int) -> tuple[int, int]:
    """(width, height) with the longest edge ``longest`` and the aspect kept, the other edge truncated and then
    rounded up to even (the Idefics3 image processor's first resize)."""
    if width >= height:
        w, h = longest, int(longest / (width / height))
        h += h % 2
    else:
        h, w = longest, int(longest * (width / height))
        w += w % 2
    return max(w, 1), max(h, 1)
