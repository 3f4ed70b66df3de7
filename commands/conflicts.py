"""Optimistic concurrency: a write that lost the race is decided again on fresh state.

Both writers of events (the command service and the account service) append with the version
their aggregate was loaded at; another writer that appended first makes the append fail with
`IntegrityError`. `retry_on_conflict` runs the whole attempt again (load, decide, append), a
little later each time, and gives up with `ConcurrencyConflict` after `retries` conflicts.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from eventsourcing.persistence import IntegrityError

from commands.errors import ConcurrencyConflict

logger = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF_STEP_S = 0.005
"""The n-th retry waits a random time of up to n times this (full jitter)."""


def retry_on_conflict(attempt: Callable[[int], T], *, retries: int, subject: str) -> T:
    """`attempt(n)` for n = 1, 2, … until it does not conflict; `subject` names what conflicts
    in the log and in the error (`ticket 6f1c…`)."""
    for number in range(1, retries + 1):
        try:
            return attempt(number)
        except IntegrityError:
            logger.debug("concurrency conflict on %s (attempt %d)", subject, number)
            time.sleep(random.uniform(0, BACKOFF_STEP_S * number))  # noqa: S311
    raise ConcurrencyConflict(f"{subject}: gave up after {retries} conflicting writes")
