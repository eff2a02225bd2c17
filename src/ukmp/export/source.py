"""The pruned model an export starts from, the output path it may write, and the saving an exported shape keeps.

Every export derives from a ukmp pruned-model directory (``plan.json`` + ``model.safetensors``); an output is written
under a temporary sibling name and renamed into place only when complete, and never over an existing path.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from torch import nn

from ukmp.export.tables import DecoderWidthKeys, check_format

OWN_FILES = ("ukmp.json", "plan.json", "config.json", "model.safetensors")  # the rest are processor files


@dataclass
class Source:
    """A loaded pruned model with what every export asks of it."""

    path: Path
    model: nn.Module
    adapter: object  # ukmp.models.base.ModelAdapter
    keys: DecoderWidthKeys
    counts: dict[str, int]  # group id -> kept units

    def processor_files(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if p.is_file() and p.name not in OWN_FILES)


EXTRA_HINT = "pip install 'ukmp[export]'"  # what every format's missing package is refused with


def require_gguf():
    """The ``gguf`` package (the GGUF writer of the LM and of LLaVA's mmproj), or one line naming the extra."""
    try:
        import gguf
    except ImportError:
        raise ImportError(f"--format gguf needs the gguf package: {EXTRA_HINT}") from None
    return gguf


def check_source(path: str | os.PathLike, fmt: str) -> tuple[Path, str]:
    """The directory and its model type, refused in one line before anything heavy is read: no ukmp pruned model
    there, or a family ``fmt`` cannot hold."""
    from ukmp.files import read_json_file
    from ukmp.io import read_marker

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such pruned-model directory")
    read_marker(p)
    cfg = read_json_file(p / "config.json", "model config")
    model_type = str(cfg.get("model_type"))
    check_format(model_type, fmt, str(p))
    return p, model_type


def load_source(path: str | os.PathLike, fmt: str, dtype: str | None = None,
                checked: tuple[Path, str] | None = None) -> Source:
    """The pruned model at ``path`` in ``dtype`` (default: as stored); ``checked``: what :func:`check_source`
    already returned for it (not read again)."""
    from ukmp.io import load_pruned
    from ukmp.models import adapter_for

    p, model_type = checked or check_source(path, fmt)
    keys = check_format(model_type, fmt, str(p))
    model = load_pruned(p, dtype=dtype)
    adapter = adapter_for(model.config)
    return Source(p, model, adapter, keys, adapter.unit_counts(model))


def check_output(out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise FileExistsError(f"{out}: already exists; export never overwrites (choose a new --out)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: output directory does not exist")
    return out


@contextmanager
def staged_output(out: Path, is_dir: bool) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write into; renamed to ``out`` on success (refused if ``out`` appeared in
    the meantime), removed on any error."""
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        if is_dir:
            if out.exists():
                raise FileExistsError(f"{out}: appeared while exporting; left alone")
            os.rename(tmp, out)
        else:
            os.link(tmp, out)  # fails if out exists: never clobbers
            tmp.unlink()
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------------- accounting
def linear_flops(model: nn.Module) -> int:
    """FLOPs of one token through every Linear (2 per weight: a multiply and an add; the vocabulary head included,
    the embeddings and the attention over the context not)."""
    return sum(2 * m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def count(model: nn.Module) -> dict[str, int]:
    from ukmp.models import count_parameters

    return {"params": count_parameters(model), "flops_per_token": linear_flops(model)}


def dense_counts(path: Path) -> dict[str, int]:
    """Parameters and per-token Linear FLOPs of the dense model the pruned one came from (built on meta)."""
    from ukmp.models.build import build_model, load_config

    return count(build_model(load_config(path), device="meta", seed=None))


def build_report(src: Source, fmt: str, out, pruned: dict[str, int] | None = None,
                 exported: dict[str, int] | None = None, **extra) -> dict:
    """What every export returns: parameters and per-token Linear FLOPs of the dense, pruned (default: counted on
    ``src.model``) and exported (default: the pruned) models, the share of the saving kept, and ``extra``."""
    dense = dense_counts(src.path)
    pruned = pruned or count(src.model)
    exported = exported or pruned
    return {
        "format": fmt, "out": str(out), **extra,
        **{k: {"dense": dense[k], "pruned": pruned[k], "exported": exported[k]} for k in ("params", "flops_per_token")},
        "saving_kept": saving_kept(dense, pruned, exported),
    }


def saving_kept(dense: dict[str, int], pruned: dict[str, int], exported: dict[str, int]) -> dict[str, float]:
    """Fraction of the pruned model's saving (parameters, FLOPs) that the exported shape keeps (1.0: all of it)."""
    out = {}
    for k in ("params", "flops_per_token"):
        saved = dense[k] - pruned[k]
        out[k] = 1.0 if saved <= 0 else (dense[k] - exported[k]) / saved
    return out
