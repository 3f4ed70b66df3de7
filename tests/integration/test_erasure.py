"""Personal data and retention on real servers (docs/adr/0021-crypto-shredding.md): users
registered, tickets opened, one user erased through the CLI; their e-mail address, and the
ticket options a pipeline marks personal, are then found nowhere (no table's rows, no read model
rebuilt from history, no message of a fresh NATS consumer, no audit bundle, no answer of the
query API), the other users are untouched, and the chain still verifies, as a bundle and in
place. Retention: a tenant that keeps documents 0 days loses its blobs, texts and chunks, with
purge events, and still verifies."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import tarfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psycopg
import pytest
from nats.js import JetStreamContext
from typer.testing import CliRunner

from commands.errors import IdempotencyConflict, InvalidOptions
from commands.messages import CreateTicket, RecordIngestion, RerunTicket, UploadedDocument
from commands.service import CommandService
from identity.accounts import AccountService, EraseUser, InvalidCredentials, RegisterUser
from identity.retention import RetentionService
from identity.users import User
from inference.embeddings import FakeEmbedder
from projections import rebuild
from projections.history import fold_into_temporary_tables
from read_api.app import QuerySettings
from read_api.audit import revealed_events, tenant_events
from read_api.audit_export import export_bundle, verify_live
from read_api.wiring import query_api
from streams import contract
from streams.contract.audit_bundle import verify_bundle
from streams.contract.personal import ERASED
from streams.jetstream import StreamSettings
from streams.relay import Relay, RelaySettings
from tests.conftest import Servers
from tests.integration.conftest import service_for, settings_for
from tests.integration.test_read_api import serving
from tests.support import random_tenant, sample
from ticketflow.bootstrap import (
    account_service,
    connect_nats,
    jwt_codec,
    open_authenticator,
    retention_service,
)
from ticketflow.cli import app as cli
from ticketflow.retention_job import RetentionJob

PDF = sample("research-paper.pdf").read_bytes()
PASSWORD = "correct horse battery staple"
STREAM = StreamSettings(storage="memory")


def cli_env(servers: Servers, database_url: str, tmp_path: Path) -> dict[str, str]:
    return {
        "TF_DATABASE_URL": database_url,
        "TF_NATS_URL": servers.nats_url,
        "TF_REDIS_URL": servers.redis_url,
        "TF_DATA_DIR": str(tmp_path / "data"),
    }


def needles(email: str) -> list[bytes]:
    """The address as text, and as the hex that a bytea column or header cast to text shows."""
    raw = email.encode()
    return [raw, raw.hex().encode()]


def rows_holding(database_url: str, email: str) -> list[str]:
    """Every table of the database (all schemas but the catalog's) whose rows, cast to text,
    hold the address."""
    found = []
    with psycopg.connect(database_url) as conn:
        tables = conn.execute(
            "SELECT quote_ident(table_schema) || '.' || quote_ident(table_name)"
            " FROM information_schema.tables WHERE table_type = 'BASE TABLE'"
            " AND table_schema NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
        for (table,) in tables:
            for (text,) in conn.execute(f"SELECT t::text FROM {table} AS t").fetchall():
                if any(needle in text.encode() for needle in needles(email)):
                    found.append(table)
                    break
    return found


def bundle_holds(bundle: Path, email: str) -> list[str]:
    found = []
    with tarfile.open(bundle) as archive:
        for member in archive.getmembers():
            handle = archive.extractfile(member)
            if handle is not None and email.encode() in handle.read():
                found.append(member.name)
    return found


def open_ticket(service: CommandService, tenant: str, owner: uuid.UUID) -> uuid.UUID:
    document = UploadedDocument("main", "paper.pdf", "application/pdf", PDF)
    ticket_id = service.create_ticket(
        CreateTicket(tenant, str(owner), (document,), "tiny")
    ).ticket_id
    ingested = contract.IngestedDocument(
        role="main", sha256=hashlib.sha256(PDF).hexdigest(), pages=3, characters=100, chunks=1
    )
    service.record_ingestion(RecordIngestion(ticket_id, (ingested,)))
    return ticket_id


@contextlib.asynccontextmanager
async def relay_to(database_url: str, nats_url: str, servers: Servers) -> AsyncIterator[None]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=3)
    nc = await connect_nats(nats_url, "tests-relay", servers.nats_credentials)
    stop = asyncio.Event()
    task = asyncio.create_task(
        Relay(pool, nc, STREAM, RelaySettings(poll_interval_s=0.2)).run(stop)
    )
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await nc.close()
        await pool.close()


async def all_messages(js: JetStreamContext, expected: int) -> list[Any]:
    """Every message, read by a new consumer from the start of the stream."""
    for _ in range(300):
        with contextlib.suppress(Exception):
            if (await js.stream_info(STREAM.name)).state.messages >= expected:
                break
        await asyncio.sleep(0.1)
    consumer = await js.pull_subscribe("tf.evt.>", durable=None, stream=STREAM.name)
    messages: list[Any] = []
    while len(messages) < expected:
        batch = await consumer.fetch(min(100, expected - len(messages)), timeout=5)
        messages.extend(batch)
    return messages


@pytest.mark.timeout(240)
async def test_an_erased_user_s_address_is_found_nowhere_and_the_chain_verifies(
    servers: Servers, fresh_database: str, fresh_nats: str, tmp_path: Path
) -> None:
    settings = settings_for(servers, fresh_database)
    accounts: AccountService = account_service(settings, fresh_database)
    service = service_for(settings, fresh_database)
    tenant = random_tenant()
    bob_email, carol_email = f"bob-{tenant}@example.org", f"carol-{tenant}@example.org"
    try:
        admin = accounts.register(RegisterUser(tenant, f"admin-{tenant}@example.org", PASSWORD))
        admin_id = str(admin.account.user_id)
        bob = accounts.register(RegisterUser(tenant, bob_email, PASSWORD, registered_by=admin_id))
        carol = accounts.register(
            RegisterUser(tenant, carol_email, PASSWORD, registered_by=admin_id)
        )
        bob_id, carol_id = bob.account.user_id, carol.account.user_id
        assert bob.account.email == bob_email
        for owner in (bob_id, carol_id):
            open_ticket(service, tenant, owner)
        # New registrations record the address encrypted: no table holds it, even now.
        assert rows_holding(fresh_database, bob_email) == []
        assert rows_holding(fresh_database, carol_email) == []
        # The scan does find a plain address: one recorded the way older history did (v1).
        legacy_email = f"dave-{tenant}@example.org"
        legacy = User.register(tenant, legacy_email, {"user"}, "not-a-hash", admin_id, None)
        accounts._app.save(legacy)
        holding = rows_holding(fresh_database, legacy_email)
        assert holding
        assert all(t.startswith("public.ticketflow_events") for t in holding)

        async with relay_to(fresh_database, fresh_nats, servers):
            runner = CliRunner()
            env = cli_env(servers, fresh_database, tmp_path)
            erased = await asyncio.to_thread(
                runner.invoke, cli, ["erase", "--tenant", tenant, "--user", str(bob_id)], env=env
            )
            assert erased.exit_code == 0, erased.output
            assert "erased at position" in erased.output
            again = await asyncio.to_thread(
                runner.invoke, cli, ["erase", "--tenant", tenant, "--user", str(bob_id)], env=env
            )
            assert "already erased" in again.output
            accounts.erase(EraseUser(tenant, legacy.id, admin_id))

            pool = await asyncpg.create_pool(fresh_database, min_size=1, max_size=2)
            try:
                # The API's answers: bob and dave read [erased], carol is untouched.
                assert accounts.account(tenant, bob_id).email == ERASED
                assert accounts.account(tenant, legacy.id).email == ERASED
                assert accounts.account(tenant, carol_id).email == carol_email
                with pytest.raises(InvalidCredentials):
                    accounts.login(tenant, bob_email, PASSWORD)
                assert accounts.login(tenant, carol_email, PASSWORD).email == carol_email
                page = await tenant_events(pool, tenant, after=0, limit=500)
                history = await revealed_events(pool, tenant, page.events)
                registered = {
                    e.aggregate_id: e.payload["email"] for e in history if e.type == "registered"
                }
                assert registered[bob_id] == ERASED
                assert registered[legacy.id] == ERASED
                assert registered[carol_id] == carol_email
                assert [e.topic for e in history if e.aggregate_id == bob_id][-1] == (
                    "ticketflow.user.erased.v1"
                )

                # No table, no message of a new consumer, no bundle holds bob's address.
                assert rows_holding(fresh_database, bob_email) == []
                count = await pool.fetchval("SELECT count(*) FROM ticketflow_events")
                nc = await connect_nats(fresh_nats, "tests-reader", servers.nats_credentials)
                try:
                    messages = await all_messages(nc.jetstream(), count)
                finally:
                    await nc.close()
                assert len(messages) == count
                for message in messages:
                    headers = json.dumps(message.headers or {}).encode()
                    for needle in needles(bob_email):
                        assert needle not in message.data
                        assert needle not in headers
                bodies = [json.loads(m.data) for m in messages]
                sealed = [
                    b["email"] for b in bodies if b.get("user_id") == str(bob_id) and "email" in b
                ]
                assert sealed
                assert sealed[0]["enc"] == "v1"
                assert "ct" in sealed[0]

                bundle = tmp_path / "bundle.tar.gz"
                manifest = await export_bundle(pool, tenant, bundle, with_blobs=True)
                assert manifest["counts"]["events"] == count
                assert bundle_holds(bundle, bob_email) == []
                # dave's plain address is stored, but bundles of an erased user leave it out.
                assert bundle_holds(bundle, legacy_email) == []
                report = await asyncio.to_thread(verify_bundle, bundle)
                assert report.ok, report.problems
                live = await verify_live(pool, tenant)
                assert live.ok, live.problems
                assert live.events == count
            finally:
                await pool.close()
    finally:
        service.close()
        accounts.close()


@pytest.mark.timeout(180)
async def test_retention_purges_documents_texts_and_chunks_and_the_chain_verifies(
    servers: Servers, fresh_database: str, tmp_path: Path
) -> None:
    settings = settings_for(servers, fresh_database)
    accounts = account_service(settings, fresh_database)
    service = service_for(settings, fresh_database)
    retention: RetentionService = retention_service(settings, fresh_database)
    tenant, other = random_tenant(), random_tenant()
    sha = hashlib.sha256(PDF).hexdigest()
    try:
        admin = accounts.register(RegisterUser(tenant, f"admin@{tenant}.example", PASSWORD))
        accounts.register(RegisterUser(other, f"admin@{other}.example", PASSWORD))
        for owner in (tenant, other):
            open_ticket(service, owner, admin.account.user_id)
        with psycopg.connect(fresh_database) as conn:
            for owner in (tenant, other):
                conn.execute(
                    "INSERT INTO document_texts (tenant, document_sha256, text)"
                    " VALUES (%s, %s, %s)",
                    (owner, sha, "the whole text"),
                )
                conn.execute(
                    "INSERT INTO document_chunks"
                    " (tenant, document_sha256, ordinal, text, embedding)"
                    " VALUES (%s, %s, 0, 'a chunk', %s::vector)",
                    (owner, sha, "[" + ",".join(["0.05"] * 384) + "]"),
                )
        runner = CliRunner()
        env = cli_env(servers, fresh_database, tmp_path)
        result = await asyncio.to_thread(
            runner.invoke, cli, ["retention", "set", "--tenant", tenant, "--days", "0"], env=env
        )
        assert result.exit_code == 0, result.output
        assert retention.retention_of(tenant) == 0
        assert retention.retention_of(other) is None

        pool = await asyncpg.create_pool(fresh_database, min_size=1, max_size=3)
        try:
            purged = await RetentionJob(retention, pool, 3600).run_once()
            assert purged == 1
            assert await RetentionJob(retention, pool, 3600).run_once() == 0
            for table, column in (
                ("blobs", "sha256"),
                ("document_texts", "document_sha256"),
                ("document_chunks", "document_sha256"),
            ):
                left = await pool.fetch(
                    f"SELECT tenant FROM {table} WHERE {column} = $1",
                    sha,
                )
                assert [row["tenant"] for row in left] == [other], table
            events = await pool.fetch(
                "SELECT state FROM ticketflow_events WHERE tenant = $1 AND topic = $2",
                tenant,
                "ticketflow.document.purged.v1",
            )
            assert len(events) == 1
            state = json.loads(bytes(events[0]["state"]))
            assert (state["sha256"], state["reason"], state["retention_days"]) == (
                sha,
                "retention",
                0,
            )
            bundle = tmp_path / "retention.tar.gz"
            await export_bundle(pool, tenant, bundle, with_blobs=True)
            with tarfile.open(bundle) as archive:
                handle = archive.extractfile("blobs.json")
                assert handle is not None
                blobs = {b["sha256"]: b for b in json.load(handle)["blobs"]}
            assert blobs[sha]["present"] is False
            assert blobs[sha]["purged"]["position"] > 0
            report = await asyncio.to_thread(verify_bundle, bundle)
            assert report.ok, report.problems
            assert report.blobs_purged == 1
            assert (await verify_live(pool, tenant)).ok
        finally:
            await pool.close()
    finally:
        retention.close()
        service.close()
        accounts.close()


def open_screening(
    service: CommandService,
    tenant: str,
    owner: uuid.UUID | str,
    candidate_name: str,
    idempotency_key: str | None = None,
) -> uuid.UUID:
    """A résumé-screening ticket whose `candidate_name` option the pipeline marks personal."""
    documents = tuple(
        UploadedDocument(role, f"{role}.pdf", "application/pdf", PDF)
        for role in ("resume", "vacancy")
    )
    command = CreateTicket(
        tenant,
        str(owner),
        documents,
        "resume-screening",
        {"candidate_name": candidate_name},
        idempotency_key=idempotency_key,
    )
    return service.create_ticket(command).ticket_id


async def ticket_history_options(
    client: httpx.AsyncClient, token: str, ticket_id: uuid.UUID
) -> dict[str, Any]:
    """The options of the ticket's `created` event, as `GET /tickets/{id}/events` answers."""
    response = await client.get(
        f"/tickets/{ticket_id}/events", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200, response.text
    (created,) = [e for e in response.json()["events"] if e["type"] == "created"]
    options: dict[str, Any] = created["payload"]["options"]
    return options


@pytest.mark.timeout(300)
async def test_an_erased_user_s_personal_options_are_found_nowhere_and_the_chain_verifies(
    servers: Servers, fresh_database: str, fresh_nats: str, tmp_path: Path
) -> None:
    settings = settings_for(servers, fresh_database)
    accounts: AccountService = account_service(settings, fresh_database)
    service = service_for(settings, fresh_database)
    query = query_api(
        fresh_database,
        open_authenticator(settings),
        FakeEmbedder,
        settings=QuerySettings(max_wait_s=3),
        history=fold_into_temporary_tables,
    )
    tenant = random_tenant()
    bob_name, carol_name = f"Bob Bobson {tenant}", f"Carol Carlsen {tenant}"
    try:
        admin = accounts.register(RegisterUser(tenant, f"admin-{tenant}@example.org", PASSWORD))
        admin_id = str(admin.account.user_id)
        bob = accounts.register(
            RegisterUser(tenant, f"bob-{tenant}@example.org", PASSWORD, registered_by=admin_id)
        )
        carol = accounts.register(
            RegisterUser(tenant, f"carol-{tenant}@example.org", PASSWORD, registered_by=admin_id)
        )
        bob_id, carol_id = bob.account.user_id, carol.account.user_id
        bob_ticket = open_screening(service, tenant, bob_id, bob_name, idempotency_key="cv-1")
        carol_ticket = open_screening(service, tenant, carol_id, carol_name)
        # The same request again is the same ticket; the key with another name is refused.
        assert open_screening(service, tenant, bob_id, bob_name, "cv-1") == bob_ticket
        with pytest.raises(IdempotencyConflict):
            open_screening(service, tenant, bob_id, "Someone Else", "cv-1")
        # Only a user has a key to encrypt with: a caller that is not one is refused.
        with pytest.raises(InvalidOptions, match="only a user can pass it"):
            open_screening(service, tenant, "evaluator", "Ann Other")
        # Recorded encrypted from the start: no table holds either name, even now.
        assert rows_holding(fresh_database, bob_name) == []
        assert rows_holding(fresh_database, carol_name) == []
        assert service.plain_options(service.get_ticket(bob_ticket)) == {"candidate_name": bob_name}
        # A re-run passes the value on, still encrypted for the user it belongs to.
        carol_rerun = service.rerun_ticket(RerunTicket(carol_ticket, tenant, admin_id)).ticket_id
        rerun = service.get_ticket(carol_rerun)
        assert rerun.options["candidate_name"]["subject"] == str(carol_id)
        assert service.plain_options(rerun) == {"candidate_name": carol_name}
        assert rows_holding(fresh_database, carol_name) == []

        token = jwt_codec(settings).mint(subject=admin_id, tenant=tenant, roles=("admin",))
        async with (
            serving(query) as base_url,
            httpx.AsyncClient(base_url=base_url, timeout=30) as client,
            relay_to(fresh_database, fresh_nats, servers),
        ):
            assert await ticket_history_options(client, token, bob_ticket) == {
                "candidate_name": bob_name
            }
            runner = CliRunner()
            env = cli_env(servers, fresh_database, tmp_path)
            erased = await asyncio.to_thread(
                runner.invoke, cli, ["erase", "--tenant", tenant, "--user", str(bob_id)], env=env
            )
            assert erased.exit_code == 0, erased.output

            # The query API: bob's ticket reads [erased], carol's tickets are untouched.
            assert await ticket_history_options(client, token, bob_ticket) == {
                "candidate_name": ERASED
            }
            for ticket_id in (carol_ticket, carol_rerun):
                assert await ticket_history_options(client, token, ticket_id) == {
                    "candidate_name": carol_name
                }
            # A re-run of bob's ticket cannot bring the value back: it runs without it.
            bob_rerun = service.rerun_ticket(RerunTicket(bob_ticket, tenant, admin_id)).ticket_id
            assert service.get_ticket(bob_rerun).options == {}

            pool = await asyncpg.create_pool(fresh_database, min_size=1, max_size=3)
            try:
                page = await tenant_events(pool, tenant, after=0, limit=500)
                history = await revealed_events(pool, tenant, page.events)
                names = {
                    e.aggregate_id: e.payload["options"].get("candidate_name")
                    for e in history
                    if e.aggregate == "ticket" and e.type == "created"
                }
                assert names[bob_ticket] == ERASED
                assert names[carol_ticket] == names[carol_rerun] == carol_name

                # Read models rebuilt from the whole history hold neither name in plain text.
                await rebuild(pool)
                assert rows_holding(fresh_database, bob_name) == []
                assert rows_holding(fresh_database, carol_name) == []

                # A new consumer from the start of the stream: ciphertext only.
                count = await pool.fetchval("SELECT count(*) FROM ticketflow_events")
                nc = await connect_nats(fresh_nats, "tests-reader", servers.nats_credentials)
                try:
                    messages = await all_messages(nc.jetstream(), count)
                finally:
                    await nc.close()
                assert len(messages) == count
                for message in messages:
                    for needle in needles(bob_name) + needles(carol_name):
                        assert needle not in message.data
                created = [
                    json.loads(m.data)
                    for m in messages
                    if m.headers and m.headers.get("ce-type") == "ticketflow.ticket.created.v1"
                ]
                sealed = {
                    body["ticket_id"]: body["options"]["candidate_name"]
                    for body in created
                    if "candidate_name" in body["options"]
                }
                assert sealed[str(bob_ticket)]["enc"] == "v1"
                assert sealed[str(bob_ticket)]["subject"] == str(bob_id)

                bundle = tmp_path / "bundle.tar.gz"
                manifest = await export_bundle(pool, tenant, bundle, with_blobs=True)
                assert manifest["counts"]["events"] == count
                assert bundle_holds(bundle, bob_name) == []
                assert bundle_holds(bundle, carol_name) == []
                report = await asyncio.to_thread(verify_bundle, bundle)
                assert report.ok, report.problems
                live = await verify_live(pool, tenant)
                assert live.ok, live.problems
                assert live.events == count
            finally:
                await pool.close()
    finally:
        service.close()
        accounts.close()
