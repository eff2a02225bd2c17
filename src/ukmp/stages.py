"""Resumable stages: a stage directory is complete when its ``stage.json`` exists with the expected hash.

A stage's hash covers the config sections it reads and the ``run_id`` of every stage it consumes, so re-running an
upstream stage (new ``run_id``) invalidates exactly the stages that depend on it. Work happens in a temporary
sibling directory that is renamed into place at the end, so a crash never leaves a half-written stage that looks
complete.
"""

from __future__ import annotations

import json
import logging
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
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    log.info("stage %s: running -> %s", name, path)
    from ukmp.runtime import is_main_process

    if not is_main_process():  # other ranks of a distributed stage work alongside; rank 0 publishes
        try:
            info = body(tmp) or {}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return StageRecord(name, path, h, "", False, time.perf_counter() - t0, info)
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
