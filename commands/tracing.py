"""W3C trace context: every command gets its own span id, inside the caller's trace if any."""

from __future__ import annotations

import re
import secrets

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def child_traceparent(parent: str | None) -> str:
    """A traceparent for a new span: the parent's trace when it is valid, else a new trace."""
    match = _TRACEPARENT.match(parent.strip().lower()) if parent else None
    if match and match.group(1) != "0" * 32 and match.group(2) != "0" * 16:
        trace_id, flags = match.group(1), match.group(3)
    else:
        trace_id, flags = secrets.token_hex(16), "01"
    return f"00-{trace_id}-{secrets.token_hex(8)}-{flags}"


def is_traceparent(value: str) -> bool:
    return bool(_TRACEPARENT.match(value))
