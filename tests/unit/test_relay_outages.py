"""What the relay waits out instead of exiting: servers away, and a stream without a leader."""

from __future__ import annotations

import asyncpg
import nats.errors
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

from streams.relay import dependency_unavailable


def test_a_publish_while_the_stream_elects_a_leader_is_waited_out() -> None:
    # A node of the cluster died: until the others elect a leader, a publish's ack is a 503.
    assert dependency_unavailable(NoStreamResponseError())
    assert dependency_unavailable(ServiceUnavailableError())
    assert dependency_unavailable(nats.errors.NoRespondersError())
    assert dependency_unavailable(nats.errors.TimeoutError())
    assert dependency_unavailable(asyncpg.CannotConnectNowError("starting up"))


def test_a_bug_is_not_waited_out() -> None:
    assert not dependency_unavailable(ValueError("bad event"))
    assert not dependency_unavailable(KeyError("position"))
