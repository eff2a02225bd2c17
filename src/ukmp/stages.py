"""Resumable stages: a stage directory is complete when its ``stage.json`` exists with the expected hash.

A stage's hash covers the config sections it reads and the ``run_id`` of every stage it consumes, so re-running an
upstream stage (new ``run_id``) invalidates exactly the stages that depend on it. Work happens in a temporary
sibling directory that is renamed into place at the end, so a crash never leaves a half-written stage that looks
complete. A lock file next to the stage refuses a second run writing the same stage at once; the run holding it
removes the temporary directories that killed runs of that stage left behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ukmp.config import section_hash
from ukmp.io import atomic_write_json

log = logging.getLogger(__name__)
STAGE_FILE = "stage.json"


@dataclass
class StageRecord:
    name: str
    path: Path
    hash: str
    run_id: str
    skipped: bool
    seconds: float
    info: dict[str, Any]


def read_stage(path: Path) -> dict[str, Any] | None:
    f = Path(path) / STAGE_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return None


class StageBusyError(OSError):
    """Another process is writing the same stage directory."""


@contextlib.contextmanager
def stage_lock(path: Path):
    """An exclusive, non-blocking lock on ``path`` (via ``.<name>.lock`` beside it; released if the process dies).

    The lock file is unlinked while still held, and a lock taken on a file that is no longer at its path is retried,
    so two runs never both believe they hold it.
    """
    import fcntl

    lock = path.with_name(f".{path.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StageBusyError(f"{path}: another run is writing this stage now (lock {lock}); wait for it to "
                                 f"finish or use another name") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder unlinked it meanwhile: take the new file
    else:
        raise StageBusyError(f"{path}: could not take the stage lock {lock}")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def remove_stale_tmp(path: Path, rank: str | None = None) -> list[Path]:
    """Delete the temporary directories that earlier, killed runs of the stage at ``path`` left (the main process
    under the stage's lock; another rank only its own, named ``.<stage>.<id>.rank<N>.tmp``)."""
    pattern = f".{path.name}.*.rank{rank}.tmp" if rank else f".{path.name}.*.tmp"
    stale = sorted(p for p in (path.parent.glob(pattern) if path.parent.is_dir() else [])
                   if rank or ".rank" not in p.name)
    for d in stale:
        log.warning("stage %s: removing %s left by an interrupted run", path.name, d)
        shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
    return stale


def run_stage(
    name: str,
    path: Path,
    config_parts: list[Any],
    upstream: list[StageRecord],
    body: Callable[[Path], dict[str, Any] | None],
    force: bool = False,
) -> StageRecord:
    """Run ``body(tmp_dir)`` unless ``path`` already holds a complete stage with the same hash."""
    path = Path(path)
    h = section_hash(name, *config_parts, [u.run_id for u in upstream])
    existing = read_stage(path)
    if existing and existing.get("hash") == h and not force:
        log.info("stage %s: up to date (%s), skipped", name, path)
        return StageRecord(name, path, h, existing["run_id"], True, 0.0, existing.get("info", {}))
    from ukmp.runtime import is_main_process

    if not is_main_process():  # other ranks of a distributed stage work alongside; rank 0 publishes
        rank = os.environ.get("RANK")
        remove_stale_tmp(path, rank)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.rank{rank}.tmp")
        tmp.mkdir(parents=True)
        t0 = time.perf_counter()
        try:
            info = body(tmp) or {}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return StageRecord(name, path, h, "", False, time.perf_counter() - t0, info)
    with stage_lock(path):
        remove_stale_tmp(path)
        return _run_locked(name, path, h, upstream, body)


def _run_locked(name: str, path: Path, h: str, upstream: list[StageRecord],
                body: Callable[[Path], dict[str, Any] | None]) -> StageRecord:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    log.info("stage %s: running -> %s", name, path)
    try:
        info = body(tmp) or {}
        seconds = time.perf_counter() - t0
        run_id = uuid.uuid4().hex[:12]
        atomic_write_json(tmp / STAGE_FILE, {"name": name, "hash": h, "run_id": run_id, "seconds": seconds,
                                             "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "info": info,
                                             "upstream": {u.name: u.run_id for u in upstream}})
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("stage %s: done in %.1f s", name, seconds)
    return StageRecord(name, path, h, run_id, False, seconds, info)
