"""Audit bundles: one tenant's chained events, signed checkpoints, public keys and blob manifest
in files that verify with no database (docs/adr/0020-audit-chain.md, "Bundles").

A bundle is a directory or a `.tar.gz` of the same files:

- `manifest.json`: format and version, tenant, range, counts, first and last positions, where
  the chain starts (`genesis` or `mid-chain`), and the sha256 and size of every other file;
- `events.jsonl`: one event a line, in position order, with every canonical field, the stored
  state (as `state`, its UTF-8 text, or `state_base64`), `prev_hash` and `hash`. An event that
  holds fields the contract keeps private (a password hash) carries `state_sha256` and
  `redacted` (the names left out) instead of its state, and `public_state` for reading;
- `checkpoints.jsonl`: the tenant's signed checkpoints within the range;
- `keys.json`: the public keys that signed them;
- `blobs.json`: the documents and outputs the events reference, by sha256, with media type,
  size and whether the store holds them; a blob deleted by retention is `purged`, naming the
  position of the `ticketflow.document.purged.v1` event that records it (a blob the store lacks
  with no such event is missing); `blobs/<sha256>` their contents when exported with them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from uuid import UUID

from streams.contract.audit import (
    GENESIS,
    ChainFields,
    ChainWalk,
    Checkpoint,
    Problem,
    PublicKey,
    WalkedEvent,
    chain_hash,
    parse_time,
    reorder_problem,
    rfc3339,
    state_sha256,
    to_microseconds,
)

FORMAT = "ticketflow-audit-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EVENTS = "events.jsonl"
CHECKPOINTS = "checkpoints.jsonl"
KEYS = "keys.json"
BLOBS = "blobs.json"
BLOB_DIR = "blobs"
_HEX64 = frozenset("0123456789abcdef")


def is_sha256_hex(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX64


def blob_references(state: Any) -> set[str]:
    """Every sha256 an event's state names in a field called `sha256` or `…_sha256` (documents,
    large outputs, prompts): the blobs a bundle's manifest accounts for."""
    found: set[str] = set()
    stack = [state]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if (key == "sha256" or key.endswith("_sha256")) and is_sha256_hex(item):
                    found.add(item)
                elif isinstance(item, dict | list):
                    stack.append(item)
        elif isinstance(value, list):
            stack.extend(value)
    return found


@dataclass(frozen=True)
class StoredChainEvent:
    """One event as the store holds it, with its links."""

    tenant: str
    position: int
    aggregate_id: UUID
    version: int
    topic: str
    recorded_at_us: int
    state: bytes
    prev_hash: bytes
    hash: bytes

    def fields(self) -> ChainFields:
        return ChainFields(
            self.tenant,
            self.position,
            self.aggregate_id,
            self.version,
            self.topic,
            self.recorded_at_us,
            state_sha256(self.state),
        )

    def walked(self) -> WalkedEvent:
        ok = chain_hash(self.prev_hash, self.fields()) == self.hash
        return WalkedEvent(self.position, self.prev_hash, self.hash, ok)


@dataclass(frozen=True)
class BlobEntry:
    sha256: str
    media_type: str | None
    size: int | None
    present: bool
    content_sha256_ok: bool | None = None
    """Whether the stored content hashes to its key (None: not checked)."""
    purged_at: int | None = None
    """Position of the event that records the blob's purge, when it was purged."""


def event_line(event: StoredChainEvent, private_fields: frozenset[str] = frozenset()) -> str:
    """The `events.jsonl` line of an event; a state holding any of `private_fields` is left out
    (its sha256 still chains it)."""
    line: dict[str, Any] = {
        "position": event.position,
        "tenant": event.tenant,
        "aggregate_id": str(event.aggregate_id),
        "version": event.version,
        "topic": event.topic,
        "recorded_at": rfc3339(event.recorded_at_us),
        "recorded_at_us": event.recorded_at_us,
    }
    parsed: Any = None
    text: str | None = None
    with contextlib.suppress(UnicodeDecodeError):
        text = event.state.decode("utf-8")
    if text is not None and private_fields:
        with contextlib.suppress(ValueError):
            parsed = json.loads(text)
    hidden = sorted(private_fields & set(parsed)) if isinstance(parsed, dict) else []
    if hidden:
        line["state_sha256"] = state_sha256(event.state).hex()
        line["redacted"] = hidden
        line["public_state"] = {k: v for k, v in parsed.items() if k not in hidden}
    elif text is not None:
        line["state"] = text
    else:
        line["state_base64"] = base64.b64encode(event.state).decode()
    line["prev_hash"] = event.prev_hash.hex()
    line["hash"] = event.hash.hex()
    return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


class BundleWriter:
    """Writes a bundle into a scratch directory beside `out`, then moves it there: as a
    directory, or as a `.tar.gz` when `out` ends with `.tar.gz` or `.tgz`."""

    def __init__(self, out: Path, tenant: str) -> None:
        self.out = out
        self.tenant = tenant
        out.parent.mkdir(parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix=".audit-", dir=out.parent))
        self._events = (self._dir / EVENTS).open("w", encoding="utf-8")
        self.events = 0
        self.redacted = 0
        self.first: StoredChainEvent | None = None
        self.last: StoredChainEvent | None = None
        self.blobs: dict[str, set[int]] = {}
        self._closed = False

    @property
    def as_archive(self) -> bool:
        return self.out.name.endswith((".tar.gz", ".tgz"))

    def add_event(self, event: StoredChainEvent, private_fields: frozenset[str]) -> None:
        if event.tenant != self.tenant:
            raise ValueError(f"event {event.position} belongs to tenant {event.tenant}")
        line = event_line(event, private_fields)
        self.redacted += '"redacted":' in line
        self._events.write(line + "\n")
        self.events += 1
        if self.first is None:
            self.first = event
        self.last = event
        if b'sha256"' not in event.state:
            return
        with contextlib.suppress(UnicodeDecodeError, ValueError):
            for sha in blob_references(json.loads(event.state)):
                self.blobs.setdefault(sha, set()).add(event.position)

    def add_blob_content(self, sha256: str, content: bytes) -> None:
        (self._dir / BLOB_DIR).mkdir(exist_ok=True)
        (self._dir / BLOB_DIR / sha256).write_bytes(content)

    def finish(
        self,
        checkpoints: Sequence[Checkpoint],
        keys: Sequence[PublicKey],
        blobs: Sequence[BlobEntry],
        *,
        since: str | None,
        until: str | None,
        events_before: int | None,
    ) -> dict[str, Any]:
        """Writes the other files and the manifest, and moves the bundle to `out`."""
        self._events.close()
        self._write_lines(CHECKPOINTS, [json.dumps(c.to_json()) for c in checkpoints])
        self._write(KEYS, json.dumps({"keys": [k.to_json() for k in keys]}, indent=2))
        blob_rows = [
            {
                "sha256": blob.sha256,
                "media_type": blob.media_type,
                "size": blob.size,
                "present": blob.present,
                "content_sha256_ok": blob.content_sha256_ok,
                "referenced_by": sorted(self.blobs.get(blob.sha256, ())),
                **({"purged": {"position": blob.purged_at}} if blob.purged_at is not None else {}),
            }
            for blob in sorted(blobs, key=lambda b: b.sha256)
        ]
        self._write(BLOBS, json.dumps({"blobs": blob_rows}, indent=2))
        first, last = self.first, self.last
        starts_at_genesis = first is None or first.prev_hash == GENESIS
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "tenant": self.tenant,
            "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "range": {"since": since, "until": until},
            "chain_start": "genesis" if starts_at_genesis else "mid-chain",
            "events_before": 0 if starts_at_genesis else events_before,
            "counts": {
                "events": self.events,
                "redacted_events": self.redacted,
                "checkpoints": len(checkpoints),
                "keys": len(keys),
                "blobs": len(blob_rows),
                "blob_contents": len(list((self._dir / BLOB_DIR).glob("*")))
                if (self._dir / BLOB_DIR).exists()
                else 0,
            },
            "first_position": first.position if first else None,
            "last_position": last.position if last else None,
            "first_prev_hash": first.prev_hash.hex() if first else None,
            "last_hash": last.hash.hex() if last else None,
            "files": {
                name: _file_digest(self._dir / name) for name in (EVENTS, CHECKPOINTS, KEYS, BLOBS)
            },
        }
        self._write(MANIFEST, json.dumps(manifest, indent=2))
        self._move_into_place()
        self._closed = True
        return manifest

    def abort(self) -> None:
        if not self._closed:
            self._events.close()
            shutil.rmtree(self._dir, ignore_errors=True)
            self._closed = True

    def _write(self, name: str, text: str) -> None:
        (self._dir / name).write_text(text + "\n", encoding="utf-8")

    def _write_lines(self, name: str, lines: Sequence[str]) -> None:
        (self._dir / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    def _move_into_place(self) -> None:
        if self.as_archive:
            scratch = self.out.with_name(f".{self.out.name}.partial")
            with tarfile.open(scratch, "w:gz") as archive:
                for path in sorted(self._dir.rglob("*")):
                    if path.is_file():
                        archive.add(path, arcname=path.relative_to(self._dir).as_posix())
            os.replace(scratch, self.out)
            shutil.rmtree(self._dir, ignore_errors=True)
        else:
            if self.out.exists():
                raise FileExistsError(f"{self.out} exists")
            self._dir.rename(self.out)


def _file_digest(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"sha256": digest.hexdigest(), "bytes": size}


# -- reading and verifying ------------------------------------------------------------------------


class BundleError(ValueError):
    """A bundle that cannot be read at all (not a bundle, no manifest, unknown format)."""


class BundleReader:
    """Opens the files of a bundle directory or archive by name."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None
        if path.is_file():
            try:
                self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by close()
            except tarfile.TarError as error:
                raise BundleError(f"{path} is not a bundle archive: {error}") from None
        elif not path.is_dir():
            raise BundleError(f"{path} does not exist")

    def open(self, name: str) -> IO[bytes] | None:
        if self._tar is None:
            target = self.path / name
            return target.open("rb") if target.is_file() else None
        try:
            member = self._tar.getmember(name)
        except KeyError:
            return None
        return self._tar.extractfile(member) if member.isfile() else None

    def names(self) -> list[str]:
        if self._tar is None:
            return [p.relative_to(self.path).as_posix() for p in self.path.rglob("*")]
        return self._tar.getnames()

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@dataclass
class VerifyReport:
    tenant: str | None
    events: int = 0
    redacted: int = 0
    checkpoints: int = 0
    signatures_verified: int = 0
    keys: list[str] = field(default_factory=list)
    keys_pinned: bool = False
    blobs: int = 0
    blobs_purged: int = 0
    blob_contents_verified: int = 0
    first_position: int | None = None
    last_position: int | None = None
    chain_start: str | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_problem(self) -> Problem | None:
        return self.problems[0] if self.problems else None

    def summary(self) -> str:
        keys = ("pinned keys " if self.keys_pinned else "the bundle's own keys ") + (
            ", ".join(self.keys) or "(none)"
        )
        span = (
            f"positions {self.first_position}-{self.last_position}"
            if self.first_position is not None
            else "no events"
        )
        return (
            f"tenant {self.tenant}: {self.events} events ({span}, chain from {self.chain_start}; "
            f"{self.redacted} with private fields redacted), {self.checkpoints} checkpoints "
            f"({self.signatures_verified} signatures verified with {keys}), {self.blobs} blobs "
            f"({self.blob_contents_verified} contents verified, {self.blobs_purged} purged)"
        )


def _load_json(reader: BundleReader, name: str) -> Any:
    handle = reader.open(name)
    if handle is None:
        return None
    with handle:
        return json.loads(handle.read().decode("utf-8"))


def _digest_of(reader: BundleReader, name: str) -> dict[str, Any] | None:
    handle = reader.open(name)
    if handle is None:
        return None
    digest = hashlib.sha256()
    size = 0
    with handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"sha256": digest.hexdigest(), "bytes": size}


def walked_from_line(line: Mapping[str, Any], tenant: str) -> tuple[WalkedEvent, Any]:
    """Checks one `events.jsonl` line: recomputes its hash from its fields (and its state's
    sha256 from its state, where present). Returns the walk's view and the parsed state."""
    position = line["position"]
    if isinstance(position, bool) or not isinstance(position, int):
        raise ValueError("position is not an integer")
    prev_hash = bytes.fromhex(line["prev_hash"])
    recorded = bytes.fromhex(line["hash"])
    errors: list[str] = []
    state: Any = None
    if "state" in line or "state_base64" in line:
        raw = (
            line["state"].encode("utf-8")
            if "state" in line
            else base64.b64decode(line["state_base64"], validate=True)
        )
        digest = state_sha256(raw)
        if "state_sha256" in line and line["state_sha256"] != digest.hex():
            errors.append("its state does not match its state_sha256")
        if b'sha256"' in raw:  # only a state that names a blob needs parsing here
            with contextlib.suppress(ValueError):
                state = json.loads(raw)
    else:
        digest = bytes.fromhex(line["state_sha256"])
    recorded_at_us = line["recorded_at_us"]
    if to_microseconds(parse_time(line["recorded_at"])) != recorded_at_us:
        errors.append("its recorded_at and recorded_at_us disagree")
    if line["tenant"] != tenant:
        errors.append(f"it belongs to tenant {line['tenant']}, not {tenant}")
    fields = ChainFields(
        tenant=line["tenant"],
        position=position,
        aggregate_id=UUID(line["aggregate_id"]),
        version=line["version"],
        topic=line["topic"],
        recorded_at_us=recorded_at_us,
        state_sha256=digest,
    )
    if chain_hash(prev_hash, fields) != recorded:
        errors.append("its fields do not hash to its recorded hash (the event was altered)")
    return WalkedEvent(position, prev_hash, recorded, not errors, "; ".join(errors)), state


def verify_bundle(
    path: Path,
    trusted_keys: Sequence[PublicKey] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Verifies a bundle with no database. `trusted_keys`: check the checkpoints against these
    keys (obtained out of band, e.g. `GET /audit/keys`) rather than the bundle's own."""
    with BundleReader(path) as reader:
        manifest = _load_json(reader, MANIFEST)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleError(f"{path} has no {MANIFEST} of a {FORMAT}")
        if manifest.get("version") != FORMAT_VERSION:
            raise BundleError(f"bundle format version {manifest.get('version')} is not supported")
        tenant = str(manifest["tenant"])
        report = VerifyReport(tenant=tenant, chain_start=manifest.get("chain_start"))
        problems: list[Problem] = []
        for name, expected in dict(manifest.get("files", {})).items():
            actual = _digest_of(reader, name)
            if actual is None:
                problems.append(Problem("bundle", None, f"{name} is missing"))
            elif actual["sha256"] != expected.get("sha256"):
                problems.append(
                    Problem("bundle", None, f"{name} differs from the manifest's sha256")
                )

        bundle_keys = [
            PublicKey.from_json(k) for k in (_load_json(reader, KEYS) or {}).get("keys", [])
        ]
        keys = list(trusted_keys) if trusted_keys is not None else bundle_keys
        report.keys_pinned = trusted_keys is not None
        report.keys = [key.key_id for key in keys]
        checkpoints = list(_checkpoints(reader, tenant, problems))
        report.checkpoints = len(checkpoints)

        genesis = manifest.get("chain_start") == "genesis"
        walk = ChainWalk(
            checkpoints,
            {key.key_id: key for key in keys},
            start=GENESIS if genesis else None,
            start_events=0 if genesis else manifest.get("events_before"),
        )
        positions: list[int] = []
        referenced: dict[str, int] = {}
        purges: dict[int, str] = {}
        for walked, state, number in _events(reader, tenant, problems):
            walk.add(walked)
            positions.append(walked.position)
            _note_blobs(state, walked.position, referenced, purges)
            if on_progress is not None and number % 10_000 == 0:
                on_progress(number)
        report.events = walk.events
        report.signatures_verified = walk.checked_signatures
        report.first_position = positions[0] if positions else None
        report.last_position = walk.last_position
        manifest_last = manifest.get("last_position")
        problems.extend(walk.finish(expected_last=manifest_last))
        reordered = reorder_problem(positions)
        if reordered is not None:
            problems.append(reordered)
        counts = manifest.get("counts", {})
        if counts.get("events") != walk.events:
            problems.append(
                Problem(
                    "truncated" if (counts.get("events") or 0) > walk.events else "inserted",
                    None,
                    f"the manifest counts {counts.get('events')} events, the bundle holds "
                    f"{walk.events}",
                    after=walk.last_position,
                )
            )
        if counts.get("checkpoints") != len(checkpoints):
            problems.append(
                Problem(
                    "bundle",
                    None,
                    f"the manifest counts {counts.get('checkpoints')} checkpoints, the bundle "
                    f"holds {len(checkpoints)}",
                )
            )
        report.redacted = _count_redacted(reader)
        _check_blobs(reader, referenced, report, problems)
        _check_purges(reader, purges, positions, report, problems)
        report.problems = sorted(problems, key=Problem.sort_key)
        return report


def _checkpoints(
    reader: BundleReader, tenant: str, problems: list[Problem]
) -> Iterator[Checkpoint]:
    handle = reader.open(CHECKPOINTS)
    if handle is None:
        return
    with handle:
        for number, raw in enumerate(io.TextIOWrapper(handle, encoding="utf-8"), start=1):
            if not raw.strip():
                continue
            try:
                checkpoint = Checkpoint.from_json(json.loads(raw))
            except (ValueError, KeyError, TypeError) as error:
                problems.append(
                    Problem("checkpoint", None, f"{CHECKPOINTS} line {number}: {error}")
                )
                continue
            if checkpoint.tenant != tenant:
                problems.append(
                    Problem(
                        "checkpoint",
                        checkpoint.position,
                        f"checkpoint of another tenant ({checkpoint.tenant})",
                    )
                )
                continue
            yield checkpoint


def _events(
    reader: BundleReader, tenant: str, problems: list[Problem]
) -> Iterator[tuple[WalkedEvent, Any, int]]:
    handle = reader.open(EVENTS)
    if handle is None:
        problems.append(Problem("bundle", None, f"{EVENTS} is missing"))
        return
    previous: int | None = None
    with handle:
        for number, raw in enumerate(io.TextIOWrapper(handle, encoding="utf-8"), start=1):
            if not raw.strip():
                continue
            try:
                walked, state = walked_from_line(json.loads(raw), tenant)
            except (ValueError, KeyError, TypeError) as error:
                # An unreadable line: altered, at the position it claims if it still says one.
                position = _claimed_position(raw)
                problems.append(
                    Problem(
                        "altered",
                        position if position is not None else previous,
                        f"{EVENTS} line {number} cannot be read: {error}",
                    )
                )
                continue
            previous = walked.position
            yield walked, state, number


def _claimed_position(raw: str) -> int | None:
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        value = json.loads(raw).get("position")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _count_redacted(reader: BundleReader) -> int:
    handle = reader.open(EVENTS)
    if handle is None:
        return 0
    with handle:
        return sum(1 for raw in handle if b'"redacted":' in raw)


PURGE_STATE_TOPIC = "ticketflow.document.v1"


def _note_blobs(
    state: Any, position: int, referenced: dict[str, int], purges: dict[int, str]
) -> None:
    if state is None:
        return
    for sha in blob_references(state):
        referenced.setdefault(sha, position)
    if _is_purge(state):
        purges[position] = str(state["sha256"])


def _is_purge(state: Any) -> bool:
    """A `ticketflow.document.purged.v1` event's state (a document aggregate's only event)."""
    return (
        isinstance(state, dict)
        and state.get("originator_topic") == PURGE_STATE_TOPIC
        and state.get("reason") == "retention"
        and is_sha256_hex(state.get("sha256"))
    )


def _check_purges(
    reader: BundleReader,
    purges: Mapping[int, str],
    positions: Sequence[int],
    report: VerifyReport,
    problems: list[Problem],
) -> None:
    """A blob listed as `purged` is accepted (not missing) when the purge event it names, if
    within the bundle's range, is there and names that blob."""
    first, last = (positions[0], positions[-1]) if positions else (None, None)
    for entry in (_load_json(reader, BLOBS) or {}).get("blobs", []):
        purged = entry.get("purged")
        if purged is None:
            continue
        position = purged.get("position") if isinstance(purged, dict) else None
        sha = str(entry.get("sha256"))
        if not isinstance(position, int) or isinstance(position, bool):
            problems.append(Problem("bundle", None, f"blob {sha[:16]}… names no purge position"))
            continue
        within = first is not None and last is not None and first <= position <= last
        if within and purges.get(position) != sha:
            problems.append(
                Problem(
                    "bundle",
                    position,
                    f"blob {sha[:16]}… is listed as purged here, but no purge event here "
                    "records it",
                )
            )
            continue
        report.blobs_purged += 1


def _check_blobs(
    reader: BundleReader,
    referenced: Mapping[str, int],
    report: VerifyReport,
    problems: list[Problem],
) -> None:
    listed = {
        str(entry["sha256"]): entry for entry in (_load_json(reader, BLOBS) or {}).get("blobs", [])
    }
    report.blobs = len(listed)
    for sha, position in sorted(referenced.items(), key=lambda item: item[1]):
        if sha not in listed:
            problems.append(
                Problem(
                    "bundle",
                    position,
                    f"blob {sha[:16]}… that this event references is not in {BLOBS}",
                )
            )
    for sha, entry in listed.items():
        handle = reader.open(f"{BLOB_DIR}/{sha}")
        if handle is None:
            continue
        digest = hashlib.sha256()
        with handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != sha:
            positions = entry.get("referenced_by") or [None]
            problems.append(
                Problem(
                    "altered",
                    positions[0],
                    f"blob {sha[:16]}… does not hash to its name: its content was altered",
                )
            )
        else:
            report.blob_contents_verified += 1
