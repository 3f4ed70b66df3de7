"""The tamper-evident history on a real event store: histories written by the command service
(also concurrently), chained in the append; checkpoints signed; bundles exported, tampered with
in every way and verified; the stored chain verified in place; the migration chaining the events
recorded before it; the relay's chain headers; the CLI (docs/adr/0020-audit-chain.md)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import psycopg
import pytest
from typer.testing import CliRunner

from commands.messages import CompleteSubtask, CreateTicket, RecordIngestion, UploadedDocument
from commands.service import CommandService
from migrations import discover
from read_api.audit_export import Bound, export_bundle, verify_live
from streams import contract
from streams.checkpoints import Checkpointer, CheckpointSettings
from streams.contract.audit import GENESIS, SigningKey
from streams.contract.audit_bundle import CHECKPOINTS, EVENTS, verify_bundle
from streams.contract.eventlog import EventLogReader
from streams.relay import message_headers
from tests.conftest import Servers, new_database
from tests.integration.conftest import service_for, settings_for
from tests.support import random_tenant, sample
from ticketflow.cli import app as cli

PDF = sample("research-paper.pdf").read_bytes()
KEY = SigningKey.generate()
OTHER_KEY = SigningKey.generate()


def completed_ticket(service: CommandService, tenant: str) -> uuid.UUID:
    document = UploadedDocument("main", "paper.pdf", "application/pdf", PDF)
    ticket_id = service.create_ticket(CreateTicket(tenant, "alice", (document,), "tiny")).ticket_id
    ingested = contract.IngestedDocument(
        role="main", sha256=hashlib.sha256(PDF).hexdigest(), pages=3, characters=1200, chunks=4
    )
    service.record_ingestion(RecordIngestion(ticket_id, (ingested,)))
    usage = contract.TokenUsage(prompt_tokens=100, completion_tokens=20, cached_tokens=40)
    for subtask in ("a", "b", "c", "d"):
        service.complete_subtask(
            CompleteSubtask(ticket_id, subtask, 1, {"x": subtask}, "smollm2", usage, 12.5)
        )
    return ticket_id


@dataclasses.dataclass(frozen=True)
class History:
    database_url: str
    tenant: str
    other: str


@pytest.fixture(scope="module")
def history(servers: Servers) -> Iterator[History]:
    """Two tenants' tickets written at once by eight threads (so appends of one tenant race
    for its chain head), checkpoints signed every five events of a tenant."""
    with new_database(servers) as database_url:
        service = service_for(settings_for(servers, database_url), database_url)
        tenant, other = random_tenant(), random_tenant()
        try:
            with ThreadPoolExecutor(8) as pool:
                list(
                    pool.map(lambda i: completed_ticket(service, (tenant, other)[i % 2]), range(8))
                )
        finally:
            service.close()
        yield History(database_url, tenant, other)


@pytest.fixture
async def pool(history: History) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(history.database_url, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def signed(pool: asyncpg.Pool) -> None:
    checkpointer = Checkpointer(pool, KEY, CheckpointSettings(every_events=5))
    await checkpointer.register_key()
    await checkpointer.sign_due()


async def chain_rows(pool: asyncpg.Pool, tenant: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT notification_id, recorded_at, prev_hash, hash FROM ticketflow_events"
        " WHERE tenant = $1 ORDER BY notification_id",
        tenant,
    )


@pytest.mark.timeout(120)
async def test_concurrent_appends_chain_each_tenant_in_position_order(
    pool: asyncpg.Pool, history: History
) -> None:
    for tenant in (history.tenant, history.other):
        rows = await chain_rows(pool, tenant)
        assert len(rows) == 4 * 11  # four tiny tickets of eleven events each
        assert bytes(rows[0]["prev_hash"]) == GENESIS
        for before, after in itertools.pairwise(rows):
            assert bytes(after["prev_hash"]) == bytes(before["hash"])  # no fork, no gap
            assert after["recorded_at"] >= before["recorded_at"]
        head = await pool.fetchrow(
            "SELECT position, events, hash FROM ticketflow_chain_heads WHERE tenant = $1", tenant
        )
        assert head is not None
        assert (head["position"], head["events"]) == (rows[-1]["notification_id"], len(rows))
        report = await verify_live(pool, tenant)
        assert report.ok, report.problems
        assert report.events == len(rows)


@pytest.mark.timeout(120)
async def test_checkpoints_sign_heads_every_n_events_and_at_the_end(
    pool: asyncpg.Pool, history: History, signed: None
) -> None:
    rows = await pool.fetch(
        "SELECT tenant, position, events, key_id FROM ticketflow_audit_checkpoints"
        " WHERE tenant = $1",
        history.tenant,
    )
    assert {row["key_id"] for row in rows} == {KEY.key_id}
    # Nothing was due twice: the heads were signed once each, then nothing moved.
    assert await Checkpointer(pool, KEY, CheckpointSettings(every_events=5)).sign_due() == []
    head = await pool.fetchval(
        "SELECT position FROM ticketflow_chain_heads WHERE tenant = $1", history.tenant
    )
    assert max(row["position"] for row in rows) == head
    report = await verify_live(pool, history.tenant, [KEY.public])
    assert report.ok, report.problems
    assert report.signatures_verified == report.checkpoints >= 1
    # A key that did not sign them fails every checkpoint.
    refused = await verify_live(pool, history.tenant, [OTHER_KEY.public])
    first = refused.first_problem
    assert first is not None
    assert first.kind == "checkpoint"


@pytest.fixture
async def bundle(pool: asyncpg.Pool, history: History, signed: None, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    manifest = await export_bundle(pool, history.tenant, out, with_blobs=True)
    assert manifest["counts"]["events"] == 44
    assert manifest["chain_start"] == "genesis"
    return out


def copy_of(bundle: Path, name: str) -> Path:
    target = bundle.with_name(name)
    shutil.copytree(bundle, target)
    return target


def event_lines(bundle: Path) -> list[str]:
    return (bundle / EVENTS).read_text(encoding="utf-8").splitlines()


def write_lines(bundle: Path, lines: list[str], name: str = EVENTS) -> None:
    (bundle / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def positions(bundle: Path) -> list[int]:
    return [json.loads(line)["position"] for line in event_lines(bundle)]


@pytest.mark.timeout(120)
async def test_an_untouched_export_verifies(bundle: Path, history: History) -> None:
    report = verify_bundle(bundle, [KEY.public])
    assert report.ok, report.problems
    assert report.events == 44
    assert report.signatures_verified == report.checkpoints >= 1
    # The document every ticket was created with is in the manifest, and its content verified.
    blobs = json.loads((bundle / "blobs.json").read_text())["blobs"]
    assert hashlib.sha256(PDF).hexdigest() in {blob["sha256"] for blob in blobs}
    assert report.blob_contents_verified == 1
    assert all(json.loads(line)["tenant"] == history.tenant for line in event_lines(bundle))


@pytest.mark.timeout(120)
async def test_every_tampering_of_an_export_is_named_at_its_first_position(
    bundle: Path,
) -> None:
    at = positions(bundle)
    checkpointed = {
        json.loads(line)["position"] for line in (bundle / CHECKPOINTS).read_text().splitlines()
    }

    def verdict(copy: Path) -> tuple[str, int | None, int | None]:
        first = verify_bundle(copy, [KEY.public]).first_problem
        assert first is not None, "tampering went unnoticed"
        return first.kind, first.position, first.after

    # Edit one byte of a state.
    copy = copy_of(bundle, "edited")
    lines = event_lines(copy)
    line = json.loads(lines[6])
    line["state"] = line["state"].replace('"tenant"', '"tenant" ', 1)
    lines[6] = json.dumps(line, ensure_ascii=False)
    write_lines(copy, lines)
    assert verdict(copy) == ("altered", at[6], None)

    # Delete an event that no checkpoint names: the gap is named by the event after it.
    index = next(i for i in range(10, 40) if at[i] not in checkpointed)
    copy = copy_of(bundle, "deleted")
    lines = event_lines(copy)
    del lines[index]
    write_lines(copy, lines)
    assert verdict(copy) == ("missing", at[index + 1], at[index - 1])

    # Insert a copy of an event at a free position between two others.
    index = next(i for i in range(1, 40) if at[i + 1] - at[i] > 1)
    copy = copy_of(bundle, "inserted")
    lines = event_lines(copy)
    forged = json.loads(lines[index])
    forged["position"] = at[index] + 1
    lines.insert(index + 1, json.dumps(forged, ensure_ascii=False))
    write_lines(copy, lines)
    assert verdict(copy)[:2] in {("inserted", at[index] + 1), ("altered", at[index] + 1)}

    # Swap two events.
    copy = copy_of(bundle, "swapped")
    lines = event_lines(copy)
    lines[20], lines[30] = lines[30], lines[20]
    write_lines(copy, lines)
    assert verdict(copy)[:2] == ("reordered", at[20])

    # Truncate the tail: a checkpoint names an event beyond the last one left.
    last_checkpoint = max(checkpointed)
    keep = at.index(last_checkpoint) - 2
    copy = copy_of(bundle, "truncated")
    write_lines(copy, event_lines(copy)[:keep])
    kind, position, after = verdict(copy)
    assert (kind, after) == ("truncated", at[keep - 1])
    assert position is not None
    assert position > at[keep - 1]

    # Re-sign a checkpoint with another key (also naming the genuine key's id).
    copy = copy_of(bundle, "resigned")
    lines = (copy / CHECKPOINTS).read_text().splitlines()
    original = json.loads(lines[0])
    forged_checkpoint = OTHER_KEY.sign(
        original["tenant"],
        original["position"],
        original["events"],
        bytes.fromhex(original["hash"]),
        original["signed_at_us"],
    )
    lines[0] = json.dumps({**forged_checkpoint.to_json(), "key_id": KEY.key_id})
    write_lines(copy, lines, CHECKPOINTS)
    assert verdict(copy)[:2] == ("checkpoint", original["position"])


@pytest.mark.timeout(120)
async def test_a_range_export_starts_mid_chain_and_still_catches_tampering(
    pool: asyncpg.Pool, history: History, signed: None, tmp_path: Path
) -> None:
    rows = await chain_rows(pool, history.tenant)
    since, until = rows[10]["notification_id"], rows[30]["notification_id"]
    out = tmp_path / "range.tar.gz"
    manifest = await export_bundle(
        pool, history.tenant, out, since=Bound(position=since), until=Bound(position=until)
    )
    assert manifest["chain_start"] == "mid-chain"
    assert manifest["events_before"] == 10
    assert (manifest["first_position"], manifest["last_position"]) == (since, until)
    assert manifest["counts"]["events"] == 21
    report = verify_bundle(out, [KEY.public])
    assert report.ok, report.problems
    # By time: the same events, as recorded_at grows with the chain.
    by_time = tmp_path / "by-time"
    await export_bundle(
        pool,
        history.tenant,
        by_time,
        since=Bound(time=rows[10]["recorded_at"]),
        until=Bound(time=rows[30]["recorded_at"]),
    )
    assert positions(by_time) == [row["notification_id"] for row in rows[10:31]]
    lines = event_lines(by_time)
    del lines[5]
    write_lines(by_time, lines)
    first = verify_bundle(by_time, [KEY.public]).first_problem
    assert first is not None
    assert first.kind == "missing"
    assert first.position in {rows[15]["notification_id"], rows[16]["notification_id"]}


def superuser_update(database_url: str, sql: str, *args: object) -> None:
    """What an operator with the database's superuser could do behind the application's back."""
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        conn.execute("ALTER TABLE ticketflow_events DISABLE TRIGGER USER")
        conn.execute(sql.encode(), args)
        conn.execute("ALTER TABLE ticketflow_events ENABLE TRIGGER USER")


@pytest.mark.timeout(120)
async def test_the_live_check_names_an_event_altered_in_place(servers: Servers) -> None:
    with new_database(servers) as database_url:
        service = service_for(settings_for(servers, database_url), database_url)
        tenant = random_tenant()
        try:
            completed_ticket(service, tenant)
        finally:
            service.close()
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        try:
            assert (await verify_live(pool, tenant)).ok
            rows = await chain_rows(pool, tenant)
            target = rows[4]["notification_id"]
            superuser_update(
                database_url,
                "UPDATE ticketflow_events SET state = convert_to(replace(convert_from(state,"
                " 'UTF8'), '\"tenant\":', '\"tenant\": '), 'UTF8') WHERE notification_id = %s",
                target,
            )
            first = (await verify_live(pool, tenant)).first_problem
            assert first is not None
            assert (first.kind, first.position) == ("altered", target)
        finally:
            await pool.close()


@pytest.mark.timeout(120)
async def test_the_migration_chains_the_events_recorded_before_it(servers: Servers) -> None:
    migrations = discover()
    chain = next(m for m in migrations if m.name == "0009_audit_chain.sql")
    with new_database(servers) as scratch_url:
        # A database as it was before the chain: migrations up to 0008, and events in it.
        with psycopg.connect(scratch_url, autocommit=True) as conn:
            conn.execute("DROP SCHEMA public CASCADE")
            conn.execute("CREATE SCHEMA public")
            for migration in migrations:
                if migration.version >= chain.version:
                    break
                conn.execute(migration.sql.encode())
            tenants = ["acme", "beta"]
            for index in range(6):
                state = json.dumps(
                    {
                        "timestamp": {
                            "_type_": "datetime_iso",
                            "_data_": f"2026-01-01T00:00:{index:02d}.000001+00:00",
                        },
                        "tenant": tenants[index % 2],
                        "n": index,
                    }
                ).encode()
                conn.execute(
                    "SELECT * FROM ticketflow_append(%s::uuid[], %s::bigint[], %s::text[],"
                    " %s::bytea[])",
                    ([uuid.uuid4()], [1], ["ticketflow.test.v1"], [state]),
                )
            conn.execute(chain.sql.encode())
        pool = await asyncpg.create_pool(scratch_url, min_size=1, max_size=2)
        try:
            for tenant in tenants:
                report = await verify_live(pool, tenant)
                assert report.ok, report.problems
                assert report.events == 3
            rows = await chain_rows(pool, "acme")
            assert [row["recorded_at"].second for row in rows] == [0, 2, 4]  # from their states
        finally:
            await pool.close()


@pytest.mark.timeout(120)
async def test_the_relay_sends_each_event_s_link(pool: asyncpg.Pool, history: History) -> None:
    reader = EventLogReader(pool)
    last: dict[str, str] = {}
    position = 0
    while batch := await reader.read_after(position, 500):
        for event in batch:
            headers = message_headers(event)
            assert event.hash is not None
            assert headers["tf-hash"] == event.hash.hex()
            assert headers["tf-prev-hash"] == last.get(event.tenant, "0" * 64)
            last[event.tenant] = headers["tf-hash"]
        position = batch[-1].position
    assert set(last) == {history.tenant, history.other}


@pytest.mark.timeout(180)
def test_the_cli_exports_and_verifies(history: History, signed: None, tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"TF_DATABASE_URL": history.database_url, "TF_DATA_DIR": str(tmp_path / "data")}
    out = tmp_path / "cli.tar.gz"
    result = runner.invoke(cli, ["audit", "export", "--tenant", history.tenant, str(out)], env=env)
    assert result.exit_code == 0, result.output
    key_file = tmp_path / "key.pem"
    key_file.write_text(KEY.public.pem)
    result = runner.invoke(cli, ["audit", "verify", str(out), "--key", str(key_file)])
    assert result.exit_code == 0, result.output
    assert "44 events" in result.output
    live = ["audit", "verify", "--live", "--tenant", history.tenant, "--key", str(key_file)]
    result = runner.invoke(cli, live, env=env)
    assert result.exit_code == 0, result.output
    # A tenant with no events (a misspelt one) verifies nothing, and says so.
    nobody = ["audit", "verify", "--live", "--tenant", "no-such-tenant"]
    result = runner.invoke(cli, nobody, env={**env, "COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    assert "no events of tenant 'no-such-tenant' are stored" in result.output
    # A tampered copy fails with exit 1 and names the first bad position.
    copy = tmp_path / "tampered"
    manifest = _unpack(out, copy)
    lines = event_lines(copy)
    swapped = json.loads(lines[3])["position"]
    lines[3], lines[4] = lines[4], lines[3]
    write_lines(copy, lines)
    result = runner.invoke(cli, ["audit", "verify", str(copy), "--key", str(key_file)])
    assert result.exit_code == 1
    assert f"position {swapped}: reordered" in result.output
    assert manifest["tenant"] == history.tenant
    result = runner.invoke(cli, ["audit", "verify", str(tmp_path / "nothing-here")])
    assert result.exit_code == 2


def _unpack(archive: Path, target: Path) -> dict[str, object]:
    import tarfile

    target.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    manifest: dict[str, object] = json.loads((target / "manifest.json").read_text())
    return manifest
