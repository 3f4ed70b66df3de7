"""An API's lifespan: its resources as the app's state while it serves, and the start-up heap out
of the cyclic collector's reach until shutdown."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace

from fastapi import FastAPI

from security.http import api_lifespan


async def test_an_api_freezes_its_start_up_heap_while_it_serves_and_hands_it_back() -> None:
    events: list[str] = []

    async def authenticate(token: str) -> None:  # pragma: no cover - never called
        raise AssertionError(token)

    @asynccontextmanager
    async def resources() -> AsyncIterator[SimpleNamespace]:
        events.append("opened")
        yield SimpleNamespace(authenticate=authenticate)
        events.append("closed")

    app = FastAPI(lifespan=api_lifespan(resources))
    before = gc.get_freeze_count()
    built_at_start = ["a list, which the collector tracks"]
    async with app.router.lifespan_context(app):
        assert events == ["opened"]
        assert app.state.authenticate is authenticate
        frozen = gc.get_freeze_count()
        assert frozen > before
        # What was built before start-up is frozen: no collection walks it.
        gc.collect()
        assert gc.get_freeze_count() == frozen
        assert not any(item is built_at_start for item in gc.get_objects())
    assert events == ["opened", "closed"]
    assert gc.get_freeze_count() == 0
    assert any(item is built_at_start for item in gc.get_objects())
