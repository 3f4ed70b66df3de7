"""The model file's sha256: computed once, remembered by path, size and modification time."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from inference import model_hash
from inference.model_hash import CACHE_FILE, file_sha256


def test_the_digest_is_the_files_sha256_and_is_cached_in_the_data_dir(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    data_dir = tmp_path / "data"
    expected = hashlib.sha256(model.read_bytes()).hexdigest()
    assert file_sha256(model, data_dir) == expected
    entry = json.loads((data_dir / CACHE_FILE).read_text())[str(model.resolve())]
    assert entry == {
        "sha256": expected,
        "size": model.stat().st_size,
        "mtime_ns": model.stat().st_mtime_ns,
    }


def test_a_new_process_reads_the_cache_while_size_and_mtime_are_unchanged(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"weights v1")
    data_dir = tmp_path / "data"
    first = file_sha256(model, data_dir)
    model_hash._in_process.clear()  # as a new process would start
    cache = data_dir / CACHE_FILE
    entries = json.loads(cache.read_text())
    entries[str(model.resolve())]["sha256"] = "0" * 64
    cache.write_text(json.dumps(entries))
    # Unchanged file: the cache answers, the file is not read again.
    assert file_sha256(model, data_dir) == "0" * 64

    model_hash._in_process.clear()
    model.write_bytes(b"weights v2, longer")
    changed = file_sha256(model, data_dir)
    assert changed == hashlib.sha256(b"weights v2, longer").hexdigest() != first


def test_without_a_data_dir_it_hashes_once_per_process(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"abc")
    assert file_sha256(model, None) == hashlib.sha256(b"abc").hexdigest()
    assert not list(tmp_path.glob(f"**/{CACHE_FILE}"))


def test_an_unreadable_cache_is_rebuilt(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"abc")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / CACHE_FILE).write_text("{not json")
    assert file_sha256(model, data_dir) == hashlib.sha256(b"abc").hexdigest()
    assert json.loads((data_dir / CACHE_FILE).read_text())
