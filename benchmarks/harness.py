"""What every benchmark run shares: its own embedded servers in a temporary directory."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from migrations import apply_migrations
from ticketflow.embedded import EmbeddedServers, free_port


def run_with_servers(
    prefix: str,
    body: Callable[[EmbeddedServers], Coroutine[Any, Any, None]],
    *,
    keep_data: bool = False,
) -> None:
    """Start migrated servers, run `body` on them, stop them and remove their data."""
    data_dir = Path(tempfile.mkdtemp(prefix=prefix))
    servers = EmbeddedServers(data_dir, nats_port=free_port(), redis_port=free_port())
    started = time.perf_counter()
    try:
        servers.start()
        # Every Settings the run builds, here or in a child process, connects as ticketflow does.
        os.environ["TF_NATS_CREDENTIALS"] = str(servers.nats_credentials)
        apply_migrations(servers.database_url)
        print(f"servers up and migrated in {time.perf_counter() - started:.1f}s", flush=True)
        asyncio.run(body(servers))
    finally:
        servers.stop()
        if keep_data:
            print(f"data kept in {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    print(f"whole run: {time.perf_counter() - started:.1f}s")
