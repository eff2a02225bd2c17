"""Files written atomically and read with one-line errors: what every other module stores its artifacts with.

Writes go to a temporary sibling and are renamed into place (a killed process leaves the old file or none, never
half of one); new files get the usual permissions (0666 minus the umask). Imports nothing else of ukmp, so any
module may use it without an import circle.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

MARKER = "ukmp.json"  # the file whose presence marks a complete pruned-model directory


# ---------------------------------------------------------------------------------------------------- atomic writes
def _refuse_directory(path: Path) -> None:
    if path.is_dir():
        raise IsADirectoryError(21, "is a directory, a file was expected here", str(path))


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only set and return)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    _refuse_directory(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(Path(path), json.dumps(obj, indent=1, default=str) + "\n")


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    _refuse_directory(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~current_umask())  # safetensors writes 0600, like mkstemp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class AtomicDir:
    """Write a directory under a temporary sibling name, then swap it in; on error nothing is left behind."""

    def __init__(self, final: str | os.PathLike):
        self.final = Path(final)
        self.tmp = self.final.with_name(f".{self.final.name}.{uuid.uuid4().hex[:8]}.tmp")

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def read_json_file(path: Path, what: str, error: type[Exception] = ValueError) -> Any:
    """Parsed JSON; a missing file or bad JSON is a one-line ``error`` naming the file (missing: FileNotFoundError
    unless ``error`` is a more specific class)."""
    path = Path(path)
    if not path.is_file():
        raise (FileNotFoundError if error is ValueError else error)(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def is_pruned_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def gguf_files(path: str | os.PathLike) -> list[str]:
    """Names of the GGUF files in a directory that has no ``config.json`` (a GGUF carries its own config), else []."""
    p = Path(path)
    if not p.is_dir() or (p / "config.json").is_file():
        return []
    return sorted(f.name for f in p.glob("*.gguf") if f.is_file())


def check_dense_source(source: str, gguf_file: str = "") -> None:
    """One line, one step further than the loader's own error, for a ``model.source`` that names a directory of
    GGUF files without ``model.gguf_file``, or a pruned model (which a CLI user gives with ``--model`` / ``--pruned``)."""
    found = [] if gguf_file else gguf_files(source)
    if found:
        raise ValueError(f"model.source: {source} holds GGUF weights but no config.json; set "
                         f"model.gguf_file={found[0]}" + (f" (or one of {', '.join(found[1:])})" if found[1:] else ""))
    if Path(source).is_dir() and is_pruned_dir(source):
        raise ValueError(f"model.source: {source} is a pruned model, not a dense one; evaluate it with `ukmp eval "
                         f"CONFIG --model {source}`, recover it with `ukmp finetune CONFIG --pruned {source}`")
