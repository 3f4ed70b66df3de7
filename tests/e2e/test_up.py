"""`ticketflow up` as a user runs it: start, accept, refuse a second stack, stop, restart."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import sample
from ticketflow.auth import JwtCodec
from ticketflow.bootstrap import connect_nats
from ticketflow.embedded import StackInfo
from ticketflow.settings import Settings

PDF = sample("research-paper.pdf").read_bytes()


def start_up(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "ticketflow", "up"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def wait_healthy(
    url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 90
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(log.read_text())


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(60)


def stream_count(env: dict[str, str]) -> int:
    """Events in the running stack's stream, read with the credentials its processes use."""
    info = StackInfo.read(Path(env["TF_DATA_DIR"]))
    assert info is not None
    assert info.nats_credentials

    async def count() -> int:
        nc = await connect_nats(info.nats_url, "tests", Path(info.nats_credentials))
        try:
            return int((await nc.jetstream().stream_info("TF_EVENTS")).state.messages)
        finally:
            await nc.close()

    return asyncio.run(count())


@pytest.fixture
def token() -> str:
    settings = Settings()
    codec = JwtCodec(
        settings.jwt_secret, issuer=settings.jwt_issuer, audience=settings.jwt_audience
    )
    return codec.mint(subject="alice", tenant="e2e", roles=["user"])


# Two starts (90 s each at most), a refused second `up` (60 s), two stops (60 s each).
@pytest.mark.timeout(480)
def test_up_runs_the_stack_refuses_a_second_one_and_keeps_data_across_restarts(
    stack_env: dict[str, str], tmp_path: Path, token: str
) -> None:
    url = f"http://127.0.0.1:{stack_env['TF_COMMANDS_PORT']}"
    log = tmp_path / "up.log"
    headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": "e2e-1"}
    files = {"file": ("paper.pdf", PDF, "application/pdf")}

    first = start_up(stack_env, log)
    try:
        wait_healthy(url, first, log)
        output = log.read_text()
        assert url in output
        assert f"nats://127.0.0.1:{stack_env['TF_EMBEDDED_NATS_PORT']}" in output

        created = httpx.post(f"{url}/tickets", files=files, headers=headers, timeout=30)
        assert created.status_code == 202, created.text
        deadline = time.monotonic() + 30
        while stream_count(stack_env) < 1:
            assert time.monotonic() < deadline, "the relay never published the event"
            time.sleep(0.2)

        second = subprocess.run(
            [sys.executable, "-m", "ticketflow", "up"],
            env=stack_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 1
        assert "already running" in second.stderr
    finally:
        assert stop(first) == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=2)

    again = start_up(stack_env, log)
    try:
        wait_healthy(url, again, log)
        repeated = httpx.post(f"{url}/tickets", files=files, headers=headers, timeout=30)
        assert repeated.status_code == 202
        # Replayed from Redis, which keeps its data across restarts like the rest.
        assert repeated.json() == {**created.json(), "created": False}
        assert repeated.headers["Idempotent-Replayed"] == "true"
        assert stream_count(stack_env) == 1
    finally:
        assert stop(again) == 0
