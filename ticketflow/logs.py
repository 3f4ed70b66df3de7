"""Process-wide logging: one line per record, with any structured `extra` fields appended."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

from opentelemetry import trace

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class _ExtraFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        # The span being recorded when the line was logged, to find the line from a trace.
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            extra.setdefault("trace_id", f"{span.trace_id:032x}")
            extra.setdefault("span_id", f"{span.span_id:016x}")
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in sorted(extra.items()))
        return line


class _CurrentStderr(logging.StreamHandler[TextIO]):
    """Writes to whatever `sys.stderr` is now, not to the stream it was when configured.

    A handler bound to the stream of the moment keeps writing to it after it is replaced and
    closed (a test runner capturing output, a CLI runner invoking a command in process).
    """

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


def configure(level: str = "INFO") -> None:
    handler = _CurrentStderr()
    handler.setFormatter(_ExtraFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "nats", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
