"""The tamper-evident event history: canonical bytes, the per-tenant hash chain, signed
checkpoints, and a streaming verifier. Pure Python, no database (docs/adr/0020-audit-chain.md).

Every stored event carries `hash = sha256(prev_hash || canonical_bytes(event))`, chaining it to
the previous event of the same tenant; a tenant's first event chains to `GENESIS` (32 zero
bytes). `canonical_bytes` is the layout the ADR defines; the database computes the same bytes
in `ticketflow_event_canonical()` (migrations/0009_audit_chain.sql) and a unit test holds the
two to the ADR's worked example.

At intervals the head of each tenant's chain is signed with Ed25519 (`checkpoint_message`).
`ChainWalk` checks a tenant's events in the order given: each event's hash against its fields,
each link against the event before, each checkpoint's signature and that it names an event of
the walk with the same hash. It keeps a bounded window of recent hashes, so it verifies a chain
of any length in constant memory.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from uuid import UUID

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

GENESIS = bytes(32)
"""The `prev_hash` of a tenant's first event."""
EVENT_DOMAIN = b"ticketflow.event.v1"
CHECKPOINT_DOMAIN = b"ticketflow.checkpoint.v1"
ALGORITHM = "Ed25519"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_I64 = struct.Struct(">q")
_U32 = struct.Struct(">I")


def _field(value: bytes) -> bytes:
    """A variable-length field: its length as a big-endian uint32, then its bytes."""
    return _U32.pack(len(value)) + value


def to_microseconds(moment: datetime) -> int:
    """Microseconds since 1970-01-01T00:00:00Z (exact: integer arithmetic)."""
    if moment.tzinfo is None:
        raise ValueError("a timestamp without a time zone is ambiguous")
    return (moment - EPOCH) // timedelta(microseconds=1)


def from_microseconds(value: int) -> datetime:
    return EPOCH + timedelta(microseconds=value)


def rfc3339(value: int) -> str:
    """`2026-12-01T16:00:43.123456Z` for microseconds since the epoch."""
    return from_microseconds(value).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """An RFC 3339 timestamp (`Z` or an offset); a naive one is refused."""
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone (add Z or an offset)")
    return moment


@dataclass(frozen=True)
class ChainFields:
    """What an event's hash covers. `state_sha256` is the sha256 of the stored state bytes."""

    tenant: str
    position: int
    aggregate_id: UUID
    version: int
    topic: str
    recorded_at_us: int
    state_sha256: bytes


def canonical_bytes(fields: ChainFields) -> bytes:
    """The canonical bytes of an event (ADR 20):

    `lp("ticketflow.event.v1") lp(tenant) i64(position) uuid(aggregate_id) i64(version)
    lp(topic) i64(recorded_at_us) sha256(state)`, where `lp(b)` is `u32(len(b)) || b`, integers
    are big-endian two's complement, strings UTF-8, and the UUID its 16 bytes (RFC 4122 order).
    """
    if len(fields.state_sha256) != 32:
        raise ValueError("state_sha256 must be 32 bytes")
    return b"".join(
        (
            _field(EVENT_DOMAIN),
            _field(fields.tenant.encode()),
            _I64.pack(fields.position),
            fields.aggregate_id.bytes,
            _I64.pack(fields.version),
            _field(fields.topic.encode()),
            _I64.pack(fields.recorded_at_us),
            fields.state_sha256,
        )
    )


def chain_hash(prev_hash: bytes, fields: ChainFields) -> bytes:
    """`sha256(prev_hash || canonical_bytes(fields))`."""
    if len(prev_hash) != 32:
        raise ValueError("prev_hash must be 32 bytes")
    return hashlib.sha256(prev_hash + canonical_bytes(fields)).digest()


# -- checkpoints and keys -------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A signed chain head: the tenant's `events`-th event is at `position` with `hash`."""

    tenant: str
    position: int
    events: int
    hash: bytes
    key_id: str
    signed_at_us: int
    signature: bytes

    def message(self) -> bytes:
        return checkpoint_message(
            self.tenant, self.position, self.events, self.hash, self.signed_at_us, self.key_id
        )

    def to_json(self) -> dict[str, object]:
        return {
            "tenant": self.tenant,
            "position": self.position,
            "events": self.events,
            "hash": self.hash.hex(),
            "key_id": self.key_id,
            "algorithm": ALGORITHM,
            "signed_at": rfc3339(self.signed_at_us),
            "signed_at_us": self.signed_at_us,
            "signature": base64.b64encode(self.signature).decode(),
        }

    @classmethod
    def from_json(cls, value: Mapping[str, object]) -> Checkpoint:
        return cls(
            tenant=str(value["tenant"]),
            position=_int(value["position"]),
            events=_int(value["events"]),
            hash=bytes.fromhex(str(value["hash"])),
            key_id=str(value["key_id"]),
            signed_at_us=_int(value["signed_at_us"]),
            signature=base64.b64decode(str(value["signature"]), validate=True),
        )


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not an integer")
    return value


def checkpoint_message(
    tenant: str, position: int, events: int, head: bytes, signed_at_us: int, key_id: str
) -> bytes:
    """What a checkpoint's Ed25519 signature covers (ADR 20): `lp("ticketflow.checkpoint.v1")
    lp(tenant) i64(position) i64(events) hash[32] i64(signed_at_us) lp(key_id)`."""
    if len(head) != 32:
        raise ValueError("a chain hash is 32 bytes")
    return b"".join(
        (
            _field(CHECKPOINT_DOMAIN),
            _field(tenant.encode()),
            _I64.pack(position),
            _I64.pack(events),
            head,
            _I64.pack(signed_at_us),
            _field(key_id.encode()),
        )
    )


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """The first 16 hex digits of the sha256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    """A checkpoint verification key, as `GET /audit/keys` and bundles carry it."""

    key: Ed25519PublicKey
    key_id: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_id", key_id_of(self.key))

    @property
    def pem(self) -> str:
        return self.key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    @property
    def raw_base64(self) -> str:
        raw = self.key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(raw).decode()

    def verifies(self, checkpoint: Checkpoint) -> bool:
        try:
            self.key.verify(checkpoint.signature, checkpoint.message())
        except InvalidSignature:
            return False
        return True

    def to_json(self) -> dict[str, str]:
        return {
            "key_id": self.key_id,
            "algorithm": ALGORITHM,
            "public_key_pem": self.pem,
            "public_key_base64": self.raw_base64,
        }

    @classmethod
    def from_pem(cls, pem: str | bytes) -> PublicKey:
        data = pem.encode() if isinstance(pem, str) else pem
        key = serialization.load_pem_public_key(data)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        return cls(key)

    @classmethod
    def from_json(cls, value: Mapping[str, object]) -> PublicKey:
        if value.get("algorithm", ALGORITHM) != ALGORITHM:
            raise ValueError(f"unsupported key algorithm {value.get('algorithm')!r}")
        key = cls.from_pem(str(value["public_key_pem"]))
        if "key_id" in value and value["key_id"] != key.key_id:
            raise ValueError(f"key id {value['key_id']} does not match its public key")
        return key


@dataclass(frozen=True)
class SigningKey:
    """The Ed25519 private key that signs checkpoints."""

    key: Ed25519PrivateKey

    @property
    def public(self) -> PublicKey:
        return PublicKey(self.key.public_key())

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(
        self, tenant: str, position: int, events: int, head: bytes, signed_at_us: int
    ) -> Checkpoint:
        key_id = self.key_id
        message = checkpoint_message(tenant, position, events, head, signed_at_us, key_id)
        return Checkpoint(
            tenant, position, events, head, key_id, signed_at_us, self.key.sign(message)
        )

    def pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: str | bytes) -> SigningKey:
        data = pem.encode() if isinstance(pem, str) else pem
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("the audit signing key must be an Ed25519 private key (PEM)")
        return cls(key)


# -- verification ---------------------------------------------------------------------------------

PROBLEM_ORDER = ("reordered", "inserted", "missing", "altered", "checkpoint", "truncated")


@dataclass(frozen=True)
class Problem:
    """What is wrong, and where: `position` is the first position affected (for a removal, the
    event after the gap, with `after` the last good one before it; None: not tied to one)."""

    kind: str
    """reordered, inserted, missing, altered, checkpoint, truncated or bundle."""
    position: int | None
    message: str
    after: int | None = None

    def sort_key(self) -> tuple[int, int]:
        rank = PROBLEM_ORDER.index(self.kind) if self.kind in PROBLEM_ORDER else len(PROBLEM_ORDER)
        return (self.position if self.position is not None else 2**63, rank)

    def __str__(self) -> str:
        where = f"position {self.position}" if self.position is not None else "bundle"
        return f"{where}: {self.kind}: {self.message}"


@dataclass(frozen=True)
class WalkedEvent:
    """One event as the walk sees it: its recorded links and whether its fields match its hash."""

    position: int
    prev_hash: bytes
    hash: bytes
    content_ok: bool
    content_error: str = ""


@dataclass(frozen=True)
class _Fork:
    """An event whose link skips the events before it, awaiting the next event's verdict."""

    position: int
    hash: bytes
    skipped_hash: bytes | None
    skipped_position: int | None
    linked_position: int | None
    first_skipped: int | None
    index: int


@dataclass
class ChainWalk:
    """Checks one tenant's chain, event by event, in constant memory.

    `start` is the `prev_hash` the first event must have: `GENESIS` for a chain from its first
    event, or None for a range that starts mid-chain (its first event's recorded `prev_hash` is
    taken as given: a removal just before it cannot be seen, only what follows). `start_events`
    is how many events of the tenant come before the first (0 from genesis; None: unknown), for
    checking the event counts that checkpoints sign. `keys` verify the checkpoints' signatures.
    """

    checkpoints: Iterable[Checkpoint]
    keys: Mapping[str, PublicKey]
    start: bytes | None = GENESIS
    start_events: int | None = 0
    window: int = 4096
    """How many recent hashes are kept to tell an inserted event from a removed one."""
    problems: list[Problem] = field(default_factory=list)
    events: int = 0
    last_position: int | None = None
    last_hash: bytes | None = None
    first_disorder: int | None = None
    """Index (in walk order) of the first event whose position is not above the one before."""
    checked_signatures: int = 0
    _by_position: dict[int, Checkpoint] = field(default_factory=dict)
    _matched: set[int] = field(default_factory=set)
    _recent: OrderedDict[bytes, tuple[int, int | None]] = field(default_factory=OrderedDict)
    _positions: dict[int, int] = field(default_factory=dict)
    _expected: bytes | None = None
    _problem_index: list[int] = field(default_factory=list)
    _last_matched: int | None = None
    _fork: _Fork | None = None

    def __post_init__(self) -> None:
        for checkpoint in self.checkpoints:
            self._check_signature(checkpoint)
            self._by_position[checkpoint.position] = checkpoint
        self._expected = self.start
        if self.start is not None:
            self._recent[self.start] = (-1, None)

    def _report(self, problem: Problem, index: int | None = None) -> None:
        self.problems.append(problem)
        self._problem_index.append(self.events if index is None else index)

    def _check_signature(self, checkpoint: Checkpoint) -> None:
        key = self.keys.get(checkpoint.key_id)
        if key is None:
            reason = f"checkpoint signed by unknown key {checkpoint.key_id}"
        elif not key.verifies(checkpoint):
            reason = f"checkpoint signature does not verify with key {checkpoint.key_id}"
        else:
            self.checked_signatures += 1
            return
        self._report(Problem("checkpoint", checkpoint.position, reason))

    def add(self, event: WalkedEvent) -> None:
        index = self.events
        disordered = self.last_position is not None and event.position <= self.last_position
        if disordered and self.first_disorder is None:
            self.first_disorder = index
        if self._expected is None:
            self._expected = event.prev_hash  # a range: start from its first recorded link
            self._recent[event.prev_hash] = (-1, None)
        if not event.content_ok:
            self._report(
                Problem(
                    "altered",
                    event.position,
                    event.content_error or "the event's fields do not match its recorded hash",
                )
            )
        link_checked = False
        if self._fork is not None:
            link_checked = self._settle_fork(event)
        if not link_checked and event.prev_hash != self._expected:
            self._broken_link(event, index)
        self.events += 1
        self._recent[event.hash] = (index, event.position)
        self._positions[index] = event.position
        self._positions.pop(index - self.window, None)
        while len(self._recent) > self.window:
            self._recent.popitem(last=False)
        self._expected = event.hash
        checkpoint = self._by_position.get(event.position)
        if checkpoint is not None:
            self._match(checkpoint, event, index)
        if self.last_position is None or event.position > self.last_position:
            self.last_position = event.position
        self.last_hash = event.hash

    def _broken_link(self, event: WalkedEvent, index: int) -> None:
        earlier = self._recent.get(event.prev_hash)
        if earlier is not None and earlier[0] < index - 1:
            # The event links back past the events before it: either those were inserted, or
            # this one was (a fork). The next event's link tells which; until then, pending.
            linked, linked_position = earlier
            self._fork = _Fork(
                event.position,
                event.hash,
                self.last_hash,
                self.last_position,
                linked_position,
                self._positions.get(linked + 1),
                index,
            )
            return
        before = f" (position {self.last_position})" if self.last_position is not None else ""
        self._report(
            Problem(
                "missing",
                event.position,
                f"its prev_hash is not the hash of the event before{before}: an event between "
                "them was removed, or this link was altered",
                after=self.last_position,
            )
        )

    def _settle_fork(self, event: WalkedEvent) -> bool:
        """Decides a pending fork with the event after it; True if this event's link is judged
        (it continues the chain the fork left)."""
        fork, self._fork = self._fork, None
        assert fork is not None
        if event.prev_hash == fork.skipped_hash:
            # The chain goes on from the event before the fork: the fork was inserted.
            self._report(
                Problem(
                    "inserted",
                    fork.position,
                    f"event {fork.position} links to the event at {fork.linked_position}, and "
                    f"the chain goes on from {fork.skipped_position}: it does not belong to it",
                    after=fork.skipped_position,
                ),
                fork.index,
            )
            self._expected = fork.skipped_hash
            return True
        self._report_skipped(fork)
        return False

    def _report_skipped(self, fork: _Fork) -> None:
        self._report(
            Problem(
                "inserted",
                fork.first_skipped,
                f"event {fork.position} links to "
                + (f"the event at {fork.linked_position}" if fork.linked_position else "the start")
                + f", so the events from position {fork.first_skipped} up to it do not belong "
                "to the chain",
                after=fork.linked_position,
            ),
            fork.index,
        )

    def _match(self, checkpoint: Checkpoint, event: WalkedEvent, index: int) -> None:
        self._matched.add(checkpoint.position)
        counted = None if self.start_events is None else self.start_events + index + 1
        if checkpoint.hash != event.hash:
            self._report(
                Problem(
                    "altered",
                    event.position,
                    f"the signed checkpoint at this position names hash "
                    f"{checkpoint.hash.hex()[:16]}…, the event has {event.hash.hex()[:16]}…: "
                    "the chain up to here was rewritten"
                    + (
                        f" after the last matching checkpoint ({self._last_matched})"
                        if self._last_matched is not None
                        else ""
                    ),
                    after=self._last_matched,
                )
            )
        elif counted is not None and checkpoint.events != counted:
            self._report(
                Problem(
                    "missing" if checkpoint.events > counted else "inserted",
                    event.position,
                    f"the signed checkpoint counts {checkpoint.events} events of the tenant up "
                    f"to here, the chain holds {counted}",
                    after=self._last_matched,
                )
            )
        self._last_matched = event.position

    def finish(self, expected_last: int | None = None) -> list[Problem]:
        """Every problem found, first (by position) first. `expected_last`: the position the
        source says its last event has (a bundle's manifest); fewer means a truncated tail."""
        if self._fork is not None:
            self._report_skipped(self._fork)
            self._fork = None
        problems = list(self.problems)
        if self.first_disorder is not None:
            # Links and counts after the first event out of place mean nothing.
            problems = [
                problem
                for problem, index in zip(self.problems, self._problem_index, strict=True)
                if index < self.first_disorder or problem.kind == "checkpoint"
            ]
        last = self.last_position
        for position, checkpoint in sorted(self._by_position.items()):
            if position in self._matched:
                continue
            if last is None or position > last:
                after = f", after the last event here ({last})" if last is not None else ""
                problems.append(
                    Problem(
                        "truncated",
                        position,
                        f"a signed checkpoint names position {position}{after}: "
                        "the events after the last one here were removed",
                        after=last,
                    )
                )
            else:
                problems.append(
                    Problem(
                        "missing",
                        position,
                        f"a signed checkpoint names the event at position {position} (hash "
                        f"{checkpoint.hash.hex()[:16]}…), which is not here",
                    )
                )
        if expected_last is not None and (last is None or last < expected_last):
            problems.append(
                Problem(
                    "truncated",
                    expected_last,
                    f"the last event should be at position {expected_last}, the last here is "
                    f"at {last}: the events after it were removed",
                    after=last,
                )
            )
        return sorted(problems, key=Problem.sort_key)


def reorder_problem(positions: Iterable[int]) -> Problem | None:
    """For positions in the order a source holds them: the first position out of place (the
    smallest one not where ascending order puts it), or None when they ascend strictly."""
    given = list(positions)
    ordered = sorted(given)
    for index, (actual, expected) in enumerate(zip(given, ordered, strict=True)):
        if index and ordered[index - 1] == expected:
            return Problem(
                "inserted", expected, f"position {expected} appears more than once", None
            )
        if actual != expected:
            return Problem(
                "reordered",
                expected,
                f"the event at position {expected} is out of order (found {actual} in its place)",
                after=ordered[index - 1] if index else None,
            )
    return None


def state_sha256(state: bytes | None) -> bytes:
    return hashlib.sha256(state or b"").digest()
