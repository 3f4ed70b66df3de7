"""NATS under authorization: the service's credentials, integrators' credentials and their limits.

Every test server trusts the session's `nats_authority`; integrators connect the way
docs/integrators.md tells them to, with nats-py and a `.creds` file.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.client import RawCredentials

from commands.messages import CreateTicket, UploadedDocument
from streams.jetstream import StreamSettings, ensure_stream
from streams.relay import Relay, RelaySettings
from tests.conftest import Servers
from tests.integration.conftest import service_for, settings_for
from tests.support import random_tenant, sample
from ticketflow.bootstrap import connect_nats
from ticketflow.nats_auth import (
    IntegratorSigner,
    NatsAccessRefused,
    NatsAuthority,
    format_credentials,
    new_seed,
    parse_credentials,
    public_key,
)

STREAM = StreamSettings(storage="memory")
HOUR = timedelta(hours=1)


class Integrator:
    """An integrator's connection, with the asynchronous errors the server sent it."""

    def __init__(self, nc: NATS, errors: asyncio.Queue[Exception], closed: asyncio.Event) -> None:
        self.nc = nc
        self.errors = errors
        self.closed = closed

    async def next_error(self, timeout: float = 5.0) -> str:
        return str(await asyncio.wait_for(self.errors.get(), timeout)).lower()


async def connect_integrator(url: str, credentials: str) -> Integrator:
    errors: asyncio.Queue[Exception] = asyncio.Queue()
    closed = asyncio.Event()

    async def on_error(error: Exception) -> None:
        errors.put_nowait(error)

    async def on_closed() -> None:
        closed.set()

    nc = await nats.connect(
        url,
        user_credentials=RawCredentials(credentials),
        error_cb=on_error,
        closed_cb=on_closed,
        allow_reconnect=False,
        connect_timeout=5,
    )
    return Integrator(nc, errors, closed)


@contextlib.asynccontextmanager
async def integrator(url: str, credentials: str) -> AsyncIterator[Integrator]:
    connected = await connect_integrator(url, credentials)
    try:
        yield connected
    finally:
        await connected.nc.close()


@contextlib.asynccontextmanager
async def service_connection(url: str, credentials: Path) -> AsyncIterator[NATS]:
    nc = await connect_nats(url, "tests", credentials)
    try:
        yield nc
    finally:
        await nc.close()


async def refused(url: str, credentials: str | None) -> str:
    """The server's answer to a connection it refuses."""
    try:
        nc = await nats.connect(
            url,
            user_credentials=RawCredentials(credentials) if credentials else None,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=5,
        )
    except nats.errors.Error as refusal:
        return str(refusal).lower()
    await nc.close()
    pytest.fail("the server accepted the connection")


def acme_subject(event: str = "created") -> str:
    return f"tf.evt.acme.ticket.{uuid.uuid4()}.{event}"


async def test_a_connection_without_credentials_is_refused(servers: Servers) -> None:
    assert "authorization violation" in await refused(servers.nats_url, None)


async def test_connect_nats_without_credentials_fails_at_once_rather_than_retrying(
    servers: Servers,
) -> None:
    with pytest.raises(NatsAccessRefused, match="TF_NATS_CREDENTIALS"):
        await asyncio.wait_for(connect_nats(servers.nats_url, "tests"), 10)


async def test_the_service_credentials_can_use_jetstream(
    fresh_nats: str, nats_credentials: Path
) -> None:
    async with service_connection(fresh_nats, nats_credentials) as nc:
        js = nc.jetstream()
        await ensure_stream(js, STREAM)
        subject = acme_subject()
        ack = await js.publish(subject, b"{}", headers={"Nats-Msg-Id": "a:1"})
        stored = await js.get_msg(STREAM.name, ack.seq)

        assert stored.subject == subject
        assert (await js.account_info()).streams == 1


async def test_an_integrator_receives_its_tenants_events_from_the_relay_and_no_others(
    servers: Servers,
    fresh_database: str,
    fresh_nats: str,
    nats_authority: NatsAuthority,
) -> None:
    tenant, other = random_tenant(), random_tenant()
    credentials = nats_authority.signer().credentials(tenant, "crm-sync", HOUR)
    service = service_for(settings_for(servers, fresh_database), fresh_database)
    document = UploadedDocument(
        "main", "paper.pdf", "application/pdf", sample("research-paper.pdf").read_bytes()
    )
    pool = await asyncpg.create_pool(fresh_database, min_size=2, max_size=4)
    stop = asyncio.Event()
    try:
        async with (
            integrator(fresh_nats, credentials) as reader,
            service_connection(fresh_nats, servers.nats_credentials) as relay_nc,
        ):
            subscription = await reader.nc.subscribe(f"tf.evt.{tenant}.>")
            await reader.nc.flush()
            service.create_ticket(CreateTicket(other, "eve", (document,), "tiny"))
            ticket_id = service.create_ticket(
                CreateTicket(tenant, "alice", (document,), "tiny")
            ).ticket_id
            relay = Relay(pool, relay_nc, STREAM, RelaySettings(poll_interval_s=0.2))
            task = asyncio.create_task(relay.run(stop))

            message = await subscription.next_msg(timeout=30)
            assert message.subject == f"tf.evt.{tenant}.ticket.{ticket_id}.created"
            assert message.headers is not None
            assert message.headers["ce-type"] == "ticketflow.ticket.created.v1"
            assert json.loads(message.data)["ticket_id"] == str(ticket_id)
            with pytest.raises(nats.errors.TimeoutError):
                await subscription.next_msg(timeout=1)
            assert reader.errors.empty()
            stop.set()
            await asyncio.wait_for(task, 10)
    finally:
        stop.set()
        await pool.close()
        service.close()


@pytest.mark.parametrize("subject", ["tf.evt.other.>", "tf.evt.>", ">", "tf.evt.*.ticket.>"])
async def test_an_integrator_cannot_subscribe_beyond_its_tenant(
    fresh_nats: str, nats_credentials: Path, nats_authority: NatsAuthority, subject: str
) -> None:
    credentials = nats_authority.signer().credentials("acme", "crm-sync", HOUR)
    async with (
        integrator(fresh_nats, credentials) as reader,
        service_connection(fresh_nats, nats_credentials) as service,
    ):
        subscription = await reader.nc.subscribe(subject)
        await reader.nc.flush()

        error = await reader.next_error()
        assert "permissions violation for subscription" in error
        assert subject.lower() in error
        await service.publish("tf.evt.other.ticket.1.created", b"{}")
        await service.flush()
        with pytest.raises(nats.errors.TimeoutError):
            await subscription.next_msg(timeout=0.5)


async def test_an_integrator_cannot_publish_even_to_its_own_tenant(
    fresh_nats: str, nats_credentials: Path, nats_authority: NatsAuthority
) -> None:
    credentials = nats_authority.signer().credentials("acme", "crm-sync", HOUR)
    async with (
        integrator(fresh_nats, credentials) as writer,
        service_connection(fresh_nats, nats_credentials) as service,
    ):
        watching = await service.subscribe("tf.evt.>")
        await service.flush()
        subject = acme_subject()
        await writer.nc.publish(subject, b'{"forged": true}')
        await writer.nc.flush()

        assert "permissions violation for publish" in await writer.next_error()
        with pytest.raises(nats.errors.TimeoutError):
            await watching.next_msg(timeout=0.5)


async def test_an_integrator_cannot_use_the_jetstream_api(
    fresh_nats: str, nats_credentials: Path, nats_authority: NatsAuthority
) -> None:
    credentials = nats_authority.signer().credentials("acme", "crm-sync", HOUR)
    async with service_connection(fresh_nats, nats_credentials) as service:
        await ensure_stream(service.jetstream(), STREAM)
    async with integrator(fresh_nats, credentials) as reader:
        with pytest.raises(nats.errors.Error):
            await reader.nc.jetstream(timeout=1).stream_info(STREAM.name)

        # The request's reply inbox is refused before the request itself.
        assert 'permissions violation for subscription to "_inbox.' in await reader.next_error()


async def test_expired_credentials_are_refused(
    servers: Servers, nats_authority: NatsAuthority
) -> None:
    expired = nats_authority.signer().credentials(
        "acme", "crm-sync", timedelta(minutes=1), now=time.time() - 120
    )

    assert "authorization violation" in await refused(servers.nats_url, expired)


async def test_credentials_that_expire_while_connected_are_disconnected(
    servers: Servers, nats_authority: NatsAuthority
) -> None:
    brief = nats_authority.signer().credentials("acme", "crm-sync", timedelta(seconds=2))
    reader = await connect_integrator(servers.nats_url, brief)
    try:
        await asyncio.wait_for(reader.closed.wait(), 10)

        assert "user authentication expired" in str(reader.nc.last_error).lower()
    finally:
        await reader.nc.close()


async def test_credentials_signed_by_a_key_the_server_does_not_trust_are_refused(
    servers: Servers, nats_authority: NatsAuthority
) -> None:
    stranger = new_seed("account")
    own_account = IntegratorSigner(stranger, public_key(stranger))
    # A key that claims to sign for the integrator account without being one of its keys.
    impostor = IntegratorSigner(new_seed("account"), nats_authority.integrator_account)

    for signer in (own_account, impostor):
        credentials = signer.credentials("acme", "crm-sync", HOUR)
        assert "authorization violation" in await refused(servers.nats_url, credentials)


async def test_credentials_whose_permissions_were_edited_are_refused(
    servers: Servers, nats_authority: NatsAuthority
) -> None:
    token, seed = parse_credentials(nats_authority.signer().credentials("acme", "crm-sync", HOUR))
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["nats"]["sub"] = {"allow": [">"]}
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()

    edited = format_credentials(f"{header}.{forged}.{signature}", seed)

    assert "authorization violation" in await refused(servers.nats_url, edited)
