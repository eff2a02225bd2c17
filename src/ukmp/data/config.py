"""Dataset configuration read from ``configs/datasets/<name>.yaml`` with omegaconf.

Keys (unknown keys are rejected)::

    format: okvqa            # which loader reads the files (see ukmp.data.loaders.LOADERS)
    root: ${oc.env:UKMP_DATA_ROOT,data}   # optional; relative paths below are resolved against it
    annotations: okvqa/annotations/okvqa_val_eval.json      # one path or a list of paths
    images: coco/images      # image root; each record's "image" is relative to it
    gt: null                 # captioning only: COCO-format ground truth (optional for some formats)
    split: val               # a label carried into the dataset (files are chosen by the paths above)
    max_samples: null        # keep only the first N records (N images for retrieval, N windows for text)
    window: 512              # text only: tokens per window (perplexity, language-model calibration)
    stride: null             # text only: tokens between window starts (default: the window, no overlap)
    prompt_style: null       # template | plain | null: how prompts are written for a decoder-only model

``prompt_style`` (VQA, captioning, and the image-caption data of calibration and fine-tuning; :mod:`ukmp.data.prompts`):
``template`` wraps each prompt with its image in the processor's chat template (one user turn, generation prompt
added; in fine-tuning the answer after it is the target), ``plain`` writes the image tokens and the prompt alone;
``null`` (or left out) takes the model family's default: ``template`` for the instruction-tuned families (LLaVA-1.5,
InstructBLIP Vicuna, SmolVLM, ...) when the processor has a chat template, ``plain`` otherwise. Text and retrieval
data have no prompts and refuse the key.

The ``text`` format (plain text files for perplexity and language-model calibration) needs no ``images``.

A relative ``root`` is resolved against the current working directory; with no ``root`` the other relative paths
are too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# what each loader's format holds (``ukmp.data.loaders.LOADERS``; a test ties the two), so a dataset given for the
# wrong purpose is refused when the config loads: a VQA file as calibration data, captions for a VQA task, ...
FORMAT_KINDS = {"cc595k": "image_text", "caption": "image_text", "okvqa": "vqa", "vqav2": "vqa", "gqa": "vqa",
                "nocaps": "caption_eval", "coco_karpathy": "caption_eval", "flickr30k": "retrieval", "text": "text"}
KIND_LABELS = {"image_text": "image-caption pairs", "vqa": "VQA questions", "caption_eval": "captioning references",
               "retrieval": "image-text retrieval pairs", "text": "plain text"}

_KEYS = ("format", "root", "annotations", "images", "gt", "split", "max_samples", "name", "window", "stride",
         "prompt_style")
PROMPTLESS = ("text", "flickr30k")  # formats whose task writes no prompt


@dataclass(frozen=True)
class DatasetConfig:
    """Where one evaluation or training set lives, resolved to absolute-or-cwd-relative paths."""

    format: str
    annotations: tuple[Path, ...]
    images: Path
    split: str = ""
    max_samples: int | None = None
    gt: Path | None = None
    name: str = ""
    window: int = 512
    stride: int | None = None
    source: Path | None = field(default=None, compare=False)  # the YAML file it came from, for messages
    prompt_style: str | None = None  # template | plain | None (the model family's default)

    def __post_init__(self) -> None:
        where = f"{self.source}: " if self.source else ""
        if not self.annotations:
            raise ValueError(f"{where}'annotations' must name at least one file")
        if self.max_samples is not None and (not isinstance(self.max_samples, int) or self.max_samples < 1):
            raise ValueError(f"{where}'max_samples' must be a positive integer or null, got {self.max_samples!r}")
        for key in ("window", "stride"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 2):
                raise ValueError(f"{where}'{key}' must be an integer >= 2{' or null' if key == 'stride' else ''}, "
                                 f"got {v!r}")
        if self.prompt_style is not None:
            from ukmp.data.prompts import check_style

            check_style(self.prompt_style, where.removesuffix(": ") or "dataset config")
            if self.format in PROMPTLESS:
                raise ValueError(f"{where}'prompt_style': a {self.format!r} dataset has no prompts; leave it out")
        if self.stride is not None and self.stride > self.window:
            raise ValueError(f"{where}'stride' ({self.stride}) must not exceed 'window' ({self.window})")

    @property
    def label(self) -> str:
        return self.name or self.format


def _path(value: Any, root: Path | None, key: str, where: str) -> Path:
    if not isinstance(value, (str, os.PathLike)) or str(value) == "":
        raise ValueError(f"{where}: key '{key}' must be a non-empty path, got {value!r}")
    p = Path(os.path.expanduser(str(value)))
    return p if p.is_absolute() or root is None else root / p


def config_from_dict(data: dict[str, Any], source: Path | None = None, **overrides: Any) -> DatasetConfig:
    """Build a ``DatasetConfig`` from plain data (a parsed YAML mapping); ``overrides`` replace keys first."""
    where = str(source) if source else "dataset config"
    data = {**data, **overrides}
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key '{unknown[0]}' (allowed: {', '.join(_KEYS)})")
    for key in ("format", "annotations") + (() if data.get("format") == "text" else ("images",)):
        if data.get(key) in (None, ""):
            raise ValueError(f"{where}: missing key '{key}'")
    root = _path(data["root"], None, "root", where) if data.get("root") not in (None, "") else None
    anns = data["annotations"]
    anns = [anns] if isinstance(anns, (str, os.PathLike)) else list(anns)
    max_samples = data.get("max_samples")
    if isinstance(max_samples, bool) or (max_samples is not None and not isinstance(max_samples, int)):
        raise ValueError(f"{where}: key 'max_samples' must be an integer or null, got {max_samples!r}")
    return DatasetConfig(
        format=str(data["format"]),
        annotations=tuple(_path(a, root, "annotations", where) for a in anns),
        images=_path(data["images"], root, "images", where) if data.get("images") not in (None, "") else Path("."),
        split=str(data.get("split") or ""),
        max_samples=max_samples,
        gt=_path(data["gt"], root, "gt", where) if data.get("gt") not in (None, "") else None,
        name=str(data.get("name") or ""),
        window=data.get("window", 512) if data.get("window") is not None else 512,
        stride=data.get("stride"),
        source=source,
        prompt_style=data.get("prompt_style"),
    )


def load_dataset_config(path: str | os.PathLike, **overrides: Any) -> DatasetConfig:
    """Read a dataset YAML (omegaconf: ``${oc.env:VAR,default}`` interpolation works) into a ``DatasetConfig``."""
    from omegaconf import OmegaConf  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset config not found: {path}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as exc:  # noqa: BLE001 (yaml and omegaconf errors share no public base)
        raise ValueError(f"{path}: cannot parse YAML ({' '.join(str(exc).split())})") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of keys at the top level")
    cfg = config_from_dict(raw, source=path, **overrides)
    return cfg if cfg.name else replace(cfg, name=path.stem)
