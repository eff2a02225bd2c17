"""Atomic, pickle-free training checkpoints for :func:`ukmp.recover.train.train_lpd`.

A checkpoint directory ``checkpoints/step-XXXXXXXX/`` holds::

    adapter.safetensors      LoRA factors only
    optimizer.safetensors    AdamW moment tensors (``state.{param index}.{name}``)
    state.json               data position, scheduler state, optimizer param groups and scalars, the loss log
    rng-{rank}.safetensors   torch (and CUDA) generator states of each process
    rng-{rank}.json          Python ``random`` and NumPy generator states of each process

Every process writes its own RNG files into a temporary sibling directory; the main process writes the rest, renames
the directory into place and finally rewrites ``checkpoints/latest.json``. A kill at any moment leaves either the
previous complete checkpoint or the new one as ``latest``. A checkpoint that cannot be read (a truncated file, a
damaged pointer) is reported with its file and :func:`resume_point` falls back to the previous one.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ukmp.io import atomic_save_tensors, atomic_write_json, read_safetensors

log = logging.getLogger(__name__)

LATEST = "latest.json"
CKPT_FORMAT = "ukmp.lpd_checkpoint"
CKPT_VERSION = 1


# -------------------------------------------------------------------------------------------- optimizer state
def optimizer_to_flat(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# -------------------------------------------------------------------------------------------- RNG state
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    py = random.getstate()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["cuda"]))
    v, internal, gauss = meta["python"]
    random.setstate((v, tuple(internal), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


# -------------------------------------------------------------------------------------------- directories
def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def tmp_dir(out_dir: Path, name: str) -> Path:
    return checkpoint_root(out_dir) / f".{name}.tmp"


def prepare_tmp(out_dir: Path, name: str) -> Path:
    """Main process: a fresh, empty temporary directory (a leftover from a killed run is removed)."""
    t = tmp_dir(out_dir, name)
    if t.exists():
        shutil.rmtree(t)
    t.mkdir(parents=True)
    return t


def write_rank_files(tmp: Path, rank: int) -> None:
    tensors, meta = rng_state()
    atomic_save_tensors(tmp / f"rng-{rank}.safetensors", tensors)
    atomic_write_json(tmp / f"rng-{rank}.json", meta)


def write_main_files(tmp: Path, adapter: dict[str, torch.Tensor], optimizer_sd: dict[str, Any] | None,
                     state: dict[str, Any]) -> None:
    atomic_save_tensors(tmp / "adapter.safetensors", adapter)
    state = dict(state, format=CKPT_FORMAT, version=CKPT_VERSION)
    if optimizer_sd is not None:
        tensors, meta = optimizer_to_flat(optimizer_sd)
        atomic_save_tensors(tmp / "optimizer.safetensors", tensors)
        state["optimizer"] = meta
    atomic_write_json(tmp / "state.json", state)


def publish(out_dir: Path, name: str, keep: int) -> Path:
    """Main process: move the finished temporary directory into place, point ``latest`` at it, prune old ones."""
    root = checkpoint_root(out_dir)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    tmp_dir(out_dir, name).rename(final)
    atomic_write_json(root / LATEST, {"name": name})
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in done[:-keep] if keep > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    p = checkpoint_root(out_dir) / LATEST
    if not p.is_file():
        return None
    try:
        name = json.loads(p.read_text())["name"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{p}: not a valid checkpoint pointer (expected {{'name': ...}})") from None
    d = checkpoint_root(out_dir) / name
    if not (d / "state.json").is_file():
        raise FileNotFoundError(f"{d / 'state.json'}: checkpoint named by {p} is missing")
    return d


def read_state(ckpt: Path) -> dict[str, Any]:
    d = json.loads((ckpt / "state.json").read_text())
    if d.get("format") != CKPT_FORMAT or d.get("version") != CKPT_VERSION:
        raise ValueError(f"{ckpt / 'state.json'}: not a {CKPT_FORMAT} v{CKPT_VERSION} checkpoint")
    return d


def read_optimizer(ckpt: Path, state: dict[str, Any], device: torch.device) -> dict[str, Any]:
    f = ckpt / "optimizer.safetensors"
    if not f.is_file() or "optimizer" not in state:
        raise FileNotFoundError(f"{f}: optimizer state missing from the checkpoint")
    tensors = read_safetensors(f, "checkpoint optimizer state")
    tensors = {k: (v if k.endswith(".step") else v.to(device)) for k, v in tensors.items()}
    return optimizer_from_flat(tensors, state["optimizer"])


def restore_rng(ckpt: Path, rank: int) -> None:
    f = ckpt / f"rng-{rank}.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: RNG state of process {rank} missing (resume needs the same process count)")
    set_rng_state(load_file(str(f)), json.loads((ckpt / f"rng-{rank}.json").read_text()))


# -------------------------------------------------------------------------------------------- resuming
@dataclass
class Resumable:
    """Everything read from one checkpoint, so nothing is applied before the whole checkpoint proved readable."""

    path: Path
    state: dict[str, Any]
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    rng: tuple[dict[str, torch.Tensor], dict[str, Any]]


def read_checkpoint(ckpt: Path, rank: int, device: torch.device) -> Resumable:
    """Read a whole checkpoint; any damage is a one-line ``ValueError``/``FileNotFoundError`` naming the file."""
    f = ckpt / "state.json"
    try:
        state = read_state(ckpt)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise ValueError(f"{f}: unreadable ({type(e).__name__})") from None
    adapter = read_safetensors(ckpt / "adapter.safetensors", "checkpoint adapter")
    optimizer = read_optimizer(ckpt, state, device) if state.get("scheduler") is not None else None
    rf = ckpt / f"rng-{rank}.safetensors"
    if not rf.is_file():
        raise FileNotFoundError(f"{rf}: RNG state of process {rank} missing (resume needs the same process count)")
    try:
        rng_meta = json.loads((ckpt / f"rng-{rank}.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise ValueError(f"{ckpt / f'rng-{rank}.json'}: unreadable ({type(e).__name__})") from None
    return Resumable(ckpt, state, adapter, optimizer, (read_safetensors(rf, "checkpoint RNG state"), rng_meta))


def resume_point(out_dir: Path, rank: int, device: torch.device) -> Resumable | None:
    """The newest readable checkpoint: the one ``latest.json`` names, else the other ``step-*`` ones newest first.
    Each damaged one is logged as a one-line warning naming its file; ``None`` when none is left (start afresh).
    Temporary directories of interrupted saves are removed (call before any process writes a checkpoint)."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return None
    if rank == 0:
        for t in root.glob(".step-*.tmp"):
            shutil.rmtree(t, ignore_errors=True)
    order: list[Path] = []
    try:
        first = latest_checkpoint(out_dir)
        if first is not None:
            order.append(first)
    except (ValueError, FileNotFoundError, OSError) as e:
        log.warning("checkpoint: %s; trying older checkpoints", str(e).splitlines()[0])
    order += [p for p in sorted(root.glob("step-*"), reverse=True) if p.is_dir() and p not in order]
    for p in order:
        try:
            return read_checkpoint(p, rank, device)
        except (ValueError, FileNotFoundError, KeyError, TypeError) as e:
            msg = str(e.args[0]) if isinstance(e, KeyError) else str(e)
            log.warning("checkpoint: %s is damaged (%s); falling back to the previous one", p,
                        msg.splitlines()[0] if msg else type(e).__name__)
    if order:
        log.warning("checkpoint: no readable checkpoint in %s; training starts afresh", root)
    return None
