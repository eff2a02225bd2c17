"""Images of several resolutions in one batch (Qwen-VL reads each image near its own aspect ratio).

* :func:`fit_size` -- the output size of an image: sides multiples of a unit, area in a range, aspect kept.
* :func:`padded_images` -- images of different sizes as one zero-padded tensor and their sizes.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def fit_size(height: int, width: int, unit: int, max_area: int, min_area: int = 0) -> tuple[int, int]:
    """(height, width) near ``height x width``'s aspect ratio with both sides multiples of ``unit`` and an area in
    [``min_area``, ``max_area``]: each side rounded to the nearest multiple, then both scaled down (floor) or up
    (ceil) together when the area falls outside -- the rule Qwen-VL's image processor resizes by."""
    h, w = max(unit, round(height / unit) * unit), max(unit, round(width / unit) * unit)
    if h * w > max_area:
        beta = math.sqrt(height * width / max_area)
        h = max(unit, math.floor(height / beta / unit) * unit)
        w = max(unit, math.floor(width / beta / unit) * unit)
    elif h * w < min_area:
        beta = math.sqrt(min_area / (height * width))
        h, w = math.ceil(height * beta / unit) * unit, math.ceil(width * beta / unit) * unit
    return h, w


def padded_images(images: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``pixel_values [B, C, H_max, W_max]`` (each image top-left, zeros after) and ``image_sizes [B, 2]``
    (height, width) of images ``[C, H, W]`` of different sizes."""
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    out = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for b, im in enumerate(images):
        out[b, :, : im.shape[1], : im.shape[2]] = im
    sizes = torch.tensor([[im.shape[1], im.shape[2]] for im in images], dtype=torch.long)
    return {"pixel_values": out, "image_sizes": sizes}

