"""W3C trace context: every command gets its own span id, inside the caller's trace if any.

With OpenTelemetry configured (`ticketflow/telemetry.py`), each command of the command service
runs in a span of its own (`traced_command`), and the events it appends store that span's
traceparent; otherwise each command gets a fresh span id in the caller's trace, as before.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from opentelemetry.trace import SpanKind

from streams.contract.tracing import current_traceparent, span_from

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

_P = ParamSpec("_P")
_R = TypeVar("_R")
_S = TypeVar("_S")


def child_traceparent(parent: str | None) -> str:
    """The traceparent for the events of a command: the span recording the command when there
    is one, else a new span id in the parent's trace when it is valid, else a new trace."""
    current = current_traceparent()
    if current is not None:
        return current
    match = _TRACEPARENT.match(parent.strip().lower()) if parent else None
    if match and match.group(1) != "0" * 32 and match.group(2) != "0" * 16:
        trace_id, flags = match.group(1), match.group(3)
    else:
        trace_id, flags = _random_hex(128), "01"
    return f"00-{trace_id}-{_random_hex(64)}-{flags}"


def _random_hex(bits: int) -> str:
    """A random non-zero id of `bits` bits in lower-case hex. Trace and span ids need to be
    unique, not unguessable, so this draws from `random` as OpenTelemetry's id generator does,
    without the system call `secrets` makes for each id."""
    value = 0
    while value == 0:
        value = random.getrandbits(bits)
    return f"{value:0{bits // 4}x}"


def is_traceparent(value: str) -> bool:
    return bool(_TRACEPARENT.match(value))


def traced_command(
    method: Callable[Concatenate[_S, Any, _P], _R],
) -> Callable[Concatenate[_S, Any, _P], _R]:
    """Runs a command service method in a span `append <Command>`: a child of the span current
    in the caller (a request, a handler), else of the command's own `traceparent`."""

    @functools.wraps(method)
    def traced(self: _S, command: Any, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        name = type(command).__name__
        with span_from(
            "ticketflow.commands",
            f"append {name}",
            getattr(command, "traceparent", None),
            kind=SpanKind.INTERNAL,
            attributes={"ticketflow.command": name},
            prefer_current=True,
        ) as span:
            ticket_id = getattr(command, "ticket_id", None)
            if ticket_id is not None:
                span.set_attribute("ticketflow.ticket_id", str(ticket_id))
            return method(self, command, *args, **kwargs)

    return traced
