"""The hash chain's canonical bytes (against the ADR's worked example), checkpoints, and the bundle
verifier over random histories and every kind of tampering (docs/adr/0020-audit-chain.md)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.contract.audit import (
    GENESIS,
    ChainFields,
    PublicKey,
    SigningKey,
    canonical_bytes,
    chain_hash,
    checkpoint_message,
    parse_time,
    rfc3339,
    to_microseconds,
)
from streams.contract.audit_bundle import (
    EVENTS,
    BundleWriter,
    StoredChainEvent,
    VerifyReport,
    verify_bundle,
)

# -- the ADR's worked example: a real TicketCompleted as the store holds it -----------------------

EXAMPLE_STATE = (
    b'{"timestamp":{"_type_":"datetime_iso","_data_":"2026-12-01T16:13:30.404833+00:00"},'
    b'"tenant":"acme","traceparent":"00-ef1a8afe5b2eebe593e9928d9c300cf9-4e607b45fa7542b0-01",'
    b'"subtasks":4}'
)
EXAMPLE = ChainFields(
    tenant="acme",
    position=11,
    aggregate_id=UUID("23e5c27d-52ce-44bb-93f4-4ae6470bcebb"),
    version=11,
    topic="ticketflow.ticket.completed.v1",
    recorded_at_us=to_microseconds(parse_time("2026-12-01T16:13:30.411059Z")),
    state_sha256=hashlib.sha256(EXAMPLE_STATE).digest(),
)
EXAMPLE_PREV = bytes.fromhex("a961cd1a02c54b25c45148df8acbeb13f7022e8b969789a69d0558c1b39f112a")
EXAMPLE_CANONICAL = (
    "00000013" + b"ticketflow.event.v1".hex()
    + "00000004" + b"acme".hex()
    + "000000000000000b"
    + "23e5c27d52ce44bb93f44ae6470bcebb"
    + "000000000000000b"
    + "0000001e" + b"ticketflow.ticket.completed.v1".hex()
    + "00066194cea7a433"
    + "2fb3784edc577d00c4c229dd857785836c63e62065123b48b659f656ea3003a6"
)  # fmt: skip
EXAMPLE_HASH = "915095d57ffec30902a17d794fc3267714e36f58280a1603b380e5094837c069"


def test_the_worked_example_of_the_adr() -> None:
    assert EXAMPLE.recorded_at_us == 1796141610411059
    assert EXAMPLE.state_sha256.hex() == (
        "2fb3784edc577d00c4c229dd857785836c63e62065123b48b659f656ea3003a6"
    )
    assert canonical_bytes(EXAMPLE).hex() == EXAMPLE_CANONICAL
    assert chain_hash(EXAMPLE_PREV, EXAMPLE).hex() == EXAMPLE_HASH
    # Recomputed from the ADR's description alone, without this module's helpers:
    assert hashlib.sha256(EXAMPLE_PREV + bytes.fromhex(EXAMPLE_CANONICAL)).hexdigest() == (
        EXAMPLE_HASH
    )


def test_every_field_changes_the_hash() -> None:
    base = chain_hash(EXAMPLE_PREV, EXAMPLE)
    changes: dict[str, Any] = {
        "tenant": "acme2",
        "position": 12,
        "aggregate_id": UUID(int=1),
        "version": 12,
        "topic": "ticketflow.ticket.failed.v1",
        "recorded_at_us": EXAMPLE.recorded_at_us + 1,
        "state_sha256": hashlib.sha256(EXAMPLE_STATE + b" ").digest(),
    }
    for name, value in changes.items():
        assert chain_hash(EXAMPLE_PREV, dataclasses.replace(EXAMPLE, **{name: value})) != base
    assert chain_hash(GENESIS, EXAMPLE) != base


def test_length_prefixes_keep_fields_apart() -> None:
    # "ab" + "c" and "a" + "bc" must not collide (tenant and topic are both variable-length).
    one = dataclasses.replace(EXAMPLE, tenant="ab", topic="c")
    two = dataclasses.replace(EXAMPLE, tenant="a", topic="bc")
    assert canonical_bytes(one) != canonical_bytes(two)


def test_times_round_trip_exactly() -> None:
    for text in ("2026-12-01T16:13:30.411059Z", "1969-12-31T23:59:59.999999Z"):
        assert rfc3339(to_microseconds(parse_time(text))) == text
    with pytest.raises(ValueError, match="time zone"):
        parse_time("2026-12-01T16:13:30")


def test_a_checkpoint_verifies_with_its_key_only() -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    checkpoint = key.sign("acme", 11, 7, bytes.fromhex(EXAMPLE_HASH), 1796141610411059)
    assert len(checkpoint.key_id) == 16
    assert key.public.verifies(checkpoint)
    assert not other.public.verifies(checkpoint)
    assert not key.public.verifies(dataclasses.replace(checkpoint, position=12))
    assert not key.public.verifies(dataclasses.replace(checkpoint, events=8))
    assert checkpoint.message() == checkpoint_message(
        "acme", 11, 7, bytes.fromhex(EXAMPLE_HASH), 1796141610411059, key.key_id
    )
    again = PublicKey.from_json(key.public.to_json())
    assert again.key_id == key.key_id
    assert SigningKey.from_pem(key.pem()).key_id == key.key_id


# -- random histories ------------------------------------------------------------------------------

TENANT = "acme"


def build_history(
    states: list[bytes], gaps: list[int], first_position: int = 1
) -> list[StoredChainEvent]:
    """A tenant's chain: positions with gaps (other tenants' events between), hashes linked."""
    events = []
    prev = GENESIS
    position = first_position
    for index, (state, gap) in enumerate(zip(states, gaps, strict=True)):
        position += gap
        fields = ChainFields(
            TENANT,
            position,
            UUID(int=index % 3 + 1),
            index // 3 + 1,
            f"ticketflow.test.e{index % 4}.v1",
            1_796_000_000_000_000 + index * 1000,
            hashlib.sha256(state).digest(),
        )
        digest = chain_hash(prev, fields)
        events.append(
            StoredChainEvent(
                TENANT,
                position,
                fields.aggregate_id,
                fields.version,
                fields.topic,
                fields.recorded_at_us,
                state,
                prev,
                digest,
            )
        )
        prev = digest
    return events


def write_bundle(
    directory: Path,
    events: list[StoredChainEvent],
    key: SigningKey,
    checkpoint_every: int,
) -> Path:
    out = directory / "bundle"
    writer = BundleWriter(out, TENANT)
    for event in events:
        writer.add_event(event, frozenset({"password_hash"}))
    checkpoints = [
        key.sign(TENANT, event.position, index + 1, event.hash, 1_796_000_000_000_000 + index)
        for index, event in enumerate(events)
        if (index + 1) % checkpoint_every == 0
    ]
    writer.finish(checkpoints, [key.public], [], since=None, until=None, events_before=0)
    return out


def lines_of(bundle: Path) -> list[str]:
    return (bundle / EVENTS).read_text(encoding="utf-8").splitlines()


def rewrite(bundle: Path, lines: list[str]) -> None:
    (bundle / EVENTS).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def forged_after(event: StoredChainEvent, position: int) -> str:
    """A well-formed event at `position` chained right after `event`: what a forger who knows
    the format inserts."""
    state = b'{"tenant":"acme","forged":true}'
    fields = ChainFields(
        TENANT, position, UUID(int=99), 1, "ticketflow.test.forged.v1", event.recorded_at_us + 1,
        hashlib.sha256(state).digest(),
    )  # fmt: skip
    line = {
        "position": position,
        "tenant": TENANT,
        "aggregate_id": str(fields.aggregate_id),
        "version": 1,
        "topic": fields.topic,
        "recorded_at": rfc3339(fields.recorded_at_us),
        "recorded_at_us": fields.recorded_at_us,
        "state": state.decode(),
        "prev_hash": event.hash.hex(),
        "hash": chain_hash(event.hash, fields).hex(),
    }
    return json.dumps(line)


states = st.lists(
    st.builds(
        lambda tenant_extra, n: json.dumps({"tenant": TENANT, "n": n, "x": tenant_extra}).encode(),
        st.text(max_size=20),
        st.integers(),
    ),
    min_size=3,
    max_size=25,
)


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[StoredChainEvent], int]:
    chosen = draw(states)
    gaps = draw(st.lists(st.integers(2, 5), min_size=len(chosen), max_size=len(chosen)))
    return build_history(chosen, gaps), draw(st.integers(1, 6))


KEY = SigningKey.generate()
OTHER_KEY = SigningKey.generate()
Expected = tuple[str, int | None, int | None]
Tamper = Callable[[Path, list[StoredChainEvent], int, st.DataObject], Expected]


def edit_state(
    bundle: Path, events: list[StoredChainEvent], every: int, data: st.DataObject
) -> Expected:
    index = data.draw(st.integers(0, len(events) - 1), label="edited")
    lines = lines_of(bundle)
    line = json.loads(lines[index])
    line["state"] = line["state"].replace('"n":', '"n": ', 1)  # one byte more
    lines[index] = json.dumps(line, ensure_ascii=False)
    rewrite(bundle, lines)
    return ("altered", events[index].position, None)


def delete_event(
    bundle: Path, events: list[StoredChainEvent], every: int, data: st.DataObject
) -> Expected:
    index = data.draw(st.integers(0, len(events) - 2), label="deleted")
    lines = lines_of(bundle)
    del lines[index]
    rewrite(bundle, lines)
    if (index + 1) % every == 0:  # a signed checkpoint names the removed event itself
        return ("missing", events[index].position, None)
    after = events[index - 1].position if index else None
    return ("missing", events[index + 1].position, after)


def insert_event(
    bundle: Path, events: list[StoredChainEvent], every: int, data: st.DataObject
) -> Expected:
    index = data.draw(st.integers(0, len(events) - 2), label="inserted after")
    lines = lines_of(bundle)
    position = events[index].position + 1  # gaps are at least 2: a free position
    lines.insert(index + 1, forged_after(events[index], position))
    rewrite(bundle, lines)
    return ("inserted", position, events[index].position)


def swap_events(
    bundle: Path, events: list[StoredChainEvent], every: int, data: st.DataObject
) -> Expected:
    first = data.draw(st.integers(0, len(events) - 2), label="swapped")
    second = data.draw(st.integers(first + 1, len(events) - 1), label="with")
    lines = lines_of(bundle)
    lines[first], lines[second] = lines[second], lines[first]
    rewrite(bundle, lines)
    return ("reordered", events[first].position, None)


def truncate_tail(
    bundle: Path, events: list[StoredChainEvent], every: int, data: st.DataObject
) -> Expected:
    keep = data.draw(st.integers(1, len(events) - 1), label="kept")
    rewrite(bundle, lines_of(bundle)[:keep])
    return ("truncated", None, events[keep - 1].position)


TAMPERING: dict[str, Tamper] = {
    "edit a state byte": edit_state,
    "delete an event": delete_event,
    "insert an event": insert_event,
    "swap two events": swap_events,
    "truncate the tail": truncate_tail,
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=histories())
def test_an_untouched_bundle_verifies(history: tuple[list[StoredChainEvent], int]) -> None:
    events, every = history
    with tempfile.TemporaryDirectory() as scratch:
        report = verify_bundle(write_bundle(Path(scratch), events, KEY, every), [KEY.public])
    assert report.ok, report.problems
    assert report.events == len(events)
    assert report.signatures_verified == len(events) // every


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=histories(), how=st.sampled_from(sorted(TAMPERING)), data=st.data())
def test_the_first_tampered_position_is_named(
    history: tuple[list[StoredChainEvent], int], how: str, data: st.DataObject
) -> None:
    events, every = history
    with tempfile.TemporaryDirectory() as scratch:
        bundle = write_bundle(Path(scratch), events, KEY, every)
        kind, position, after = TAMPERING[how](bundle, events, every, data)
        report = verify_bundle(bundle, [KEY.public])
    first = report.first_problem
    assert first is not None, f"{how} went unnoticed"
    assert first.kind == kind, report.problems
    if position is not None:
        assert first.position == position, report.problems
    if after is not None:
        assert first.after == after, report.problems


@settings(max_examples=30, deadline=None)
@given(history=histories(), data=st.data())
def test_a_checkpoint_signed_by_another_key_is_named(
    history: tuple[list[StoredChainEvent], int], data: st.DataObject
) -> None:
    events, _ = history
    with tempfile.TemporaryDirectory() as scratch:
        bundle = write_bundle(Path(scratch), events, KEY, 1)
        index = data.draw(st.integers(0, len(events) - 1))
        path = bundle / "checkpoints.jsonl"
        lines = path.read_text().splitlines()
        forged = OTHER_KEY.sign(TENANT, events[index].position, index + 1, events[index].hash, 5)
        # The forger keeps the key id the bundle names, or names their own key: both fail.
        if data.draw(st.booleans()):
            forged = dataclasses.replace(forged, key_id=KEY.key_id)
        lines[index] = json.dumps(forged.to_json())
        path.write_text("".join(line + "\n" for line in lines))
        report = verify_bundle(bundle, [KEY.public])
    first = report.first_problem
    assert first is not None
    assert (first.kind, first.position) == ("checkpoint", events[index].position)


def test_rewriting_the_chain_after_an_edit_is_caught_by_a_checkpoint(tmp_path: Path) -> None:
    events = build_history([b'{"tenant":"acme","n":%d}' % n for n in range(12)], [1] * 12)
    bundle = write_bundle(tmp_path, events, KEY, 4)  # checkpoints at the 4th, 8th, 12th events
    # The forger edits event 6 and recomputes every hash from there: every link holds.
    edited = [*events[:5], dataclasses.replace(events[5], state=b'{"tenant":"acme","n":666}')]
    prev = events[4].hash
    rechained: list[StoredChainEvent] = []
    for event in [*edited[5:], *events[6:]]:
        digest = chain_hash(prev, event.fields())
        rechained.append(dataclasses.replace(event, prev_hash=prev, hash=digest))
        prev = digest
    writer_dir = tmp_path / "forged"
    writer = BundleWriter(writer_dir, TENANT)
    for event in [*events[:5], *rechained]:
        writer.add_event(event, frozenset())
    writer.finish([], [KEY.public], [], since=None, until=None, events_before=0)
    (bundle / EVENTS).write_bytes((writer_dir / EVENTS).read_bytes())
    report = verify_bundle(bundle, [KEY.public])
    first = report.first_problem
    assert first is not None
    # Named at the first checkpoint after the edit, with the last one that still held.
    expected = ("altered", events[7].position, events[3].position)
    assert (first.kind, first.position, first.after) == expected


def test_a_range_starts_from_the_recorded_link_of_its_first_event(tmp_path: Path) -> None:
    events = build_history([b'{"tenant":"acme","n":%d}' % n for n in range(10)], [1] * 10)
    out = tmp_path / "range"
    writer = BundleWriter(out, TENANT)
    for event in events[4:]:
        writer.add_event(event, frozenset())
    checkpoints = [KEY.sign(TENANT, events[7].position, 8, events[7].hash, 1)]
    manifest = writer.finish(checkpoints, [KEY.public], [], since="5", until=None, events_before=4)
    assert manifest["chain_start"] == "mid-chain"
    report = verify_bundle(out, [KEY.public])
    assert report.ok, report.problems
    lines = lines_of(out)
    del lines[2]  # events[6]
    rewrite(out, lines)
    first = verify_bundle(out, [KEY.public]).first_problem
    assert first is not None
    assert (first.kind, first.position, first.after) == (
        "missing",
        events[7].position,
        events[5].position,
    )


def test_private_fields_are_left_out_and_still_chained(tmp_path: Path) -> None:
    state = b'{"tenant":"acme","email":"a@acme.example","password_hash":"$argon2id$x"}'
    events = build_history([state, b'{"tenant":"acme"}'], [1, 1])
    bundle = write_bundle(tmp_path, events, KEY, 1)
    first_line = json.loads(lines_of(bundle)[0])
    assert "state" not in first_line
    assert "argon2" not in (bundle / EVENTS).read_text()
    assert first_line["redacted"] == ["password_hash"]
    assert first_line["public_state"]["email"] == "a@acme.example"
    report: VerifyReport = verify_bundle(bundle, [KEY.public])
    assert report.ok, report.problems
    assert report.redacted == 1
    # The state's sha256 is chained: changing it breaks the event's hash.
    lines = lines_of(bundle)
    first_line["state_sha256"] = "0" * 64
    lines[0] = json.dumps(first_line)
    rewrite(bundle, lines)
    problem = verify_bundle(bundle, [KEY.public]).first_problem
    assert problem is not None
    assert (problem.kind, problem.position) == ("altered", events[0].position)


def test_an_archive_bundle_verifies_like_a_directory(tmp_path: Path) -> None:
    events = build_history([b'{"tenant":"acme","n":%d}' % n for n in range(5)], [1] * 5)
    writer = BundleWriter(tmp_path / "b.tar.gz", TENANT)
    for event in events:
        writer.add_event(event, frozenset())
    writer.finish([], [KEY.public], [], since=None, until=None, events_before=0)
    assert (tmp_path / "b.tar.gz").is_file()
    report = verify_bundle(tmp_path / "b.tar.gz")
    assert report.ok, report.problems
    assert not report.keys_pinned
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.tar.gz"]  # no scratch left
