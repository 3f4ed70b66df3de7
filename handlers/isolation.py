"""Runs document extraction in a separate, killable process with a time and memory limit.

Parsers of hostile files can hang or balloon; running each document in its own process (forked
from a preloaded forkserver, so it starts in milliseconds) keeps the worker's event loop free and
lets a stuck or oversized extraction be killed without harming anything else.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import resource
import sys
from multiprocessing.connection import Connection
from typing import Any

from handlers.extraction import ExtractedDocument, ExtractionError, ExtractionLimits, extract

logger = logging.getLogger(__name__)

_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(["handlers.extraction"])


def _extract_in_child(
    pipe: Connection, content: bytes, media_type: str, limits: ExtractionLimits, memory: int
) -> None:
    if memory > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    result: tuple[Any, ...]
    try:
        result = ("ok", extract(content, media_type, limits))
    except ExtractionError as error:
        result = ("refused", error.reason, error.code)
    except MemoryError:
        result = (
            "refused",
            "The document needs more memory to read than this service allows.",
            "too_much_memory",
        )
    except Exception as error:  # reported to the parent, which retries
        result = ("error", f"{type(error).__name__}: {error}")
    pipe.send((result, _peak_rss_bytes()))
    pipe.close()


def _peak_rss_bytes() -> int:
    """This process's peak resident memory so far (what it inherited at fork included)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux counts kilobytes


class ExtractionPool:
    """At most `workers` extractions at once, each in its own process.

    `peak_rss_bytes` is the largest peak resident memory any of its extraction processes
    reported so far (0 before the first).
    """

    def __init__(
        self, *, workers: int = 2, timeout_s: float = 120.0, memory_bytes: int = 2 * 1024**3
    ) -> None:
        self._slots = asyncio.Semaphore(workers)
        self._timeout_s = timeout_s
        self._memory_bytes = memory_bytes
        self.peak_rss_bytes = 0

    async def extract(
        self, content: bytes, media_type: str, limits: ExtractionLimits
    ) -> ExtractedDocument:
        async with self._slots:
            return await asyncio.to_thread(self._run, content, media_type, limits)

    def _run(self, content: bytes, media_type: str, limits: ExtractionLimits) -> ExtractedDocument:
        receiver, sender = _context.Pipe(duplex=False)
        process = _context.Process(
            target=_extract_in_child,
            args=(sender, content, media_type, limits, self._memory_bytes),
            daemon=True,
        )
        process.start()
        sender.close()
        try:
            if not receiver.poll(self._timeout_s):
                raise ExtractionError(
                    f"Reading the document took longer than {self._timeout_s:.0f} seconds; "
                    "it may be damaged or far too complex.",
                    "extraction_timeout",
                )
            try:
                result, peak_rss = receiver.recv()
            except EOFError:
                raise RuntimeError(
                    f"the extraction process died (exit code {process.exitcode})"
                ) from None
        finally:
            # Join before killing: once the child has exited its pid may already be reused.
            process.join(1)
            if process.is_alive():
                process.kill()
                process.join(5)
            receiver.close()
        self.peak_rss_bytes = max(self.peak_rss_bytes, peak_rss)
        logger.debug("extraction process peak memory: %d MiB", peak_rss // (1024 * 1024))
        if result[0] == "ok":
            document: ExtractedDocument = result[1]
            return document
        if result[0] == "refused":
            raise ExtractionError(result[1], result[2])
        raise RuntimeError(result[1])
