"""The sha256 of a model file, computed once and remembered by path, size and modification time.

A GGUF file is hundreds of megabytes: hashing it on every start would slow every worker. The
digest is kept in a small JSON file in the data directory, keyed by the file's absolute path and
valid only while its size and modification time (in nanoseconds) are unchanged; within a process
it is computed at most once per file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_FILE = "model-hashes.json"
_CHUNK = 4 * 1024 * 1024
_lock = threading.Lock()
_in_process: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None) -> str:
    """The file's sha256 (hex): from this process's memory, the cache file, or by reading it."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    with _lock:
        if key in _in_process:
            return _in_process[key]
        cache_path = Path(cache_dir) / CACHE_FILE if cache_dir is not None else None
        entries = _read(cache_path) if cache_path is not None else {}
        entry = entries.get(key[0])
        if (
            isinstance(entry, dict)
            and entry.get("size") == stat.st_size
            and entry.get("mtime_ns") == stat.st_mtime_ns
            and isinstance(entry.get("sha256"), str)
        ):
            digest = str(entry["sha256"])
        else:
            digest = _hash(resolved)
            if cache_path is not None:
                entries[key[0]] = {
                    "size": stat.st_size,
                    "mtime_ns": stat.st_mtime_ns,
                    "sha256": digest,
                }
                _write(cache_path, entries)
        _in_process[key] = digest
        return digest


def _hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    logger.info("hashed model file %s", path)
    return digest.hexdigest()


def _read(cache_path: Path) -> dict[str, object]:
    try:
        loaded = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _write(cache_path: Path, entries: dict[str, object]) -> None:
    """Atomically (a temporary file renamed), so a reader never sees half a file."""
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=cache_path.parent, prefix=".model-hashes-")
        with os.fdopen(fd, "w") as file:
            json.dump(entries, file, indent=2, sort_keys=True)
        os.replace(temporary, cache_path)
    except OSError as error:
        logger.warning("cannot write the model hash cache %s: %s", cache_path, error)
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(temporary)
