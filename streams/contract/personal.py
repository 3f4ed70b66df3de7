"""Personal data in events: encrypted per data subject, with keys kept outside the log
(docs/adr/0021-crypto-shredding.md).

A personal field of an event (an e-mail address) is stored, published and exported as an
*encrypted value*, a JSON object:

    {"enc": "v1", "subject": "<the data subject's UUID>", "ct": "<base64>"}

`ct` is base64 of a 12-byte random nonce followed by the AES-256-GCM ciphertext (and its 16-byte
tag) of the value's canonical JSON (`canonical_json`). The associated data binds the ciphertext
to where it was written: tenant, subject, aggregate id, event name and field, so a ciphertext
copied into another event or field does not decrypt. Each data subject (a user) has one random
256-bit key per tenant in `ticketflow_subject_keys`; erasing the subject destroys the key, and
from then on every reader shows `ERASED` instead of the value. The event store keeps the
ciphertext, so the hash chain, computed over the stored bytes, still verifies.

Events recorded before encryption existed (`ticketflow.user.registered.v1`) hold plain values:
their stored bytes cannot change, so readers hide them (`ERASED`) once their subject is erased.

A ticket's options that its pipeline marks personal (`"x-personal": true` on a property of the
`options_schema`) are encrypted the same way, one value per option, for the user who opened the
ticket: `seal_options` and `reveal_options`, with the field `options.<name>`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeAlias
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = (
        asyncpg.Pool | asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
    )

ENC_VERSION = "v1"
ERASED = "[erased]"
"""What every reader shows in place of a value whose subject was erased."""
KEY_BYTES = 32
NONCE_BYTES = 12
KEYS_TABLE = "ticketflow_subject_keys"
_AAD_LABEL = "ticketflow.personal.v1"
_BASE64 = r"^[A-Za-z0-9+/]+={0,2}$"
_BASE64_RE = re.compile(_BASE64)


class EncryptedValue(BaseModel):
    """A personal value, encrypted with its data subject's key (AES-256-GCM)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enc: Literal["v1"] = Field(description="The format of the encrypted value.")
    subject: UUID = Field(description="The data subject whose key encrypts the value (a user).")
    ct: str = Field(
        min_length=40,
        pattern=_BASE64,
        description=(
            "base64 of a 12-byte nonce, then the AES-256-GCM ciphertext and tag of the value's"
            " canonical JSON. It decrypts only with the subject's key, which integrators never"
            " hold; once the subject is erased nobody can decrypt it."
        ),
    )


class SubjectErased(Exception):
    """The subject was erased: nothing is encrypted for it any more."""


class PersonalDataError(ValueError):
    """An encrypted value that does not decrypt with its subject's key (altered or moved)."""


def is_encrypted(value: object) -> bool:
    """Whether `value` is the JSON form of an `EncryptedValue`."""
    return (
        isinstance(value, Mapping)
        and value.get("enc") == ENC_VERSION
        and set(value) == {"enc", "subject", "ct"}
        and isinstance(value.get("ct"), str)
    )


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def associated_data(
    *, tenant: str, subject: UUID, aggregate_id: UUID, event: str, field: str
) -> bytes:
    """What a ciphertext is bound to: the same value in another place does not decrypt."""
    material = {
        "label": _AAD_LABEL,
        "tenant": tenant,
        "subject": str(subject),
        "aggregate_id": str(aggregate_id),
        "event": event,
        "field": field,
    }
    return json.dumps(material, sort_keys=True, separators=(",", ":")).encode()


def encrypt(
    key: bytes,
    value: Any,
    *,
    tenant: str,
    subject: UUID,
    aggregate_id: UUID,
    event: str,
    field: str,
) -> EncryptedValue:
    """`value` (any JSON value) encrypted for `subject`, with a fresh random nonce."""
    if len(key) != KEY_BYTES:
        raise ValueError("a subject key is 32 bytes")
    nonce = os.urandom(NONCE_BYTES)
    plain = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    aad = associated_data(
        tenant=tenant, subject=subject, aggregate_id=aggregate_id, event=event, field=field
    )
    sealed = AESGCM(key).encrypt(nonce, plain, aad)
    return EncryptedValue(
        enc="v1", subject=subject, ct=base64.b64encode(nonce + sealed).decode("ascii")
    )


def decrypt(
    key: bytes,
    value: EncryptedValue | Mapping[str, Any],
    *,
    tenant: str,
    aggregate_id: UUID,
    event: str,
    field: str,
) -> Any:
    """The plain value; raises `PersonalDataError` when it does not decrypt here."""
    encrypted = value if isinstance(value, EncryptedValue) else EncryptedValue.model_validate(value)
    if not _BASE64_RE.match(encrypted.ct):
        raise PersonalDataError("the ciphertext is not base64")
    try:
        raw = base64.b64decode(encrypted.ct, validate=True)
    except binascii.Error:
        raise PersonalDataError("the ciphertext is not base64") from None
    aad = associated_data(
        tenant=tenant,
        subject=encrypted.subject,
        aggregate_id=aggregate_id,
        event=event,
        field=field,
    )
    try:
        plain = AESGCM(key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], aad)
    except InvalidTag:
        raise PersonalDataError(
            f"the encrypted {field} of a {event} event does not decrypt with its subject's key"
        ) from None
    return json.loads(plain)


def subject_of(value: object, aggregate_id: UUID, aggregate: str) -> UUID | None:
    """The data subject of a personal field's stored value: an encrypted value names it; a plain
    value recorded before encryption belongs to its user (the aggregate of a user event)."""
    if is_encrypted(value):
        assert isinstance(value, Mapping)
        try:
            return UUID(str(value["subject"]))
        except ValueError:
            return None
    if aggregate == "user":
        return aggregate_id
    return None


def reveal(
    payload: Mapping[str, Any],
    personal_fields: Iterable[str],
    keys: Mapping[UUID, bytes | None],
    *,
    tenant: str,
    aggregate_id: UUID,
    aggregate: str,
    event: str,
) -> dict[str, Any]:
    """`payload` with each personal field decrypted, or `ERASED` where its subject's key is gone
    (or never existed). `keys`: subject → key, None for an erased subject. A plain value of an
    erased subject (an event recorded before encryption) is hidden as `ERASED` too."""
    revealed = dict(payload)
    for name in personal_fields:
        if name not in revealed or revealed[name] is None:
            continue
        value = revealed[name]
        subject = subject_of(value, aggregate_id, aggregate)
        if is_encrypted(value):
            key = keys.get(subject) if subject is not None else None
            if key is None:
                revealed[name] = ERASED
                continue
            try:
                revealed[name] = decrypt(
                    key, value, tenant=tenant, aggregate_id=aggregate_id, event=event, field=name
                )
            except PersonalDataError:
                revealed[name] = ERASED
        elif subject is not None and subject in keys and keys[subject] is None:
            revealed[name] = ERASED
    return revealed


async def load_keys(conn: Conn, tenant: str, subjects: Iterable[UUID]) -> dict[UUID, bytes | None]:
    """The keys of `subjects` in `tenant`: bytes, or None for an erased subject; a subject with
    no row is left out (no personal data was ever encrypted for it)."""
    wanted = sorted(set(subjects))
    if not wanted:
        return {}
    rows = await conn.fetch(
        f"SELECT subject, key FROM {KEYS_TABLE} WHERE tenant = $1 AND subject = ANY($2::uuid[])",
        tenant,
        wanted,
    )
    return {row["subject"]: (bytes(row["key"]) if row["key"] is not None else None) for row in rows}


async def erased_subjects(conn: Conn, tenant: str) -> set[UUID]:
    """Every erased subject of `tenant`."""
    rows = await conn.fetch(
        f"SELECT subject FROM {KEYS_TABLE} WHERE tenant = $1 AND key IS NULL", tenant
    )
    return {row["subject"] for row in rows}


OPTIONS_EVENT = "created"
"""The event whose `options` hold a ticket's personal options (`ticketflow.ticket.created.*`)."""


def option_field(name: str) -> str:
    """The field a personal option's ciphertext is bound to."""
    return f"options.{name}"


def seal_options(
    options: Mapping[str, Any],
    personal: Iterable[str],
    key: bytes,
    *,
    tenant: str,
    subject: UUID,
    ticket_id: UUID,
) -> dict[str, Any]:
    """`options` with the value of each personal option encrypted for `subject` (null and
    absent values stay as they are: there is nothing to hide)."""
    sealed = dict(options)
    for name in personal:
        if sealed.get(name) is None:
            continue
        sealed[name] = encrypt(
            key,
            sealed[name],
            tenant=tenant,
            subject=subject,
            aggregate_id=ticket_id,
            event=OPTIONS_EVENT,
            field=option_field(name),
        ).model_dump(mode="json")
    return sealed


def option_subjects(options: Mapping[str, Any], personal: Iterable[str]) -> set[UUID]:
    """The subjects whose keys the personal options' encrypted values need."""
    subjects = set()
    for name in personal:
        value = options.get(name)
        if is_encrypted(value):
            assert isinstance(value, Mapping)
            try:
                subjects.add(UUID(str(value["subject"])))
            except ValueError:
                continue
    return subjects


def reveal_options(
    options: Mapping[str, Any],
    personal: Iterable[str],
    keys: Mapping[UUID, bytes | None],
    *,
    tenant: str,
    ticket_id: UUID,
) -> dict[str, Any]:
    """`options` with each personal option decrypted, or `ERASED` where its subject's key is
    gone. Options recorded before the pipeline marked them (plain values) are left as they are:
    they name no subject."""
    revealed = dict(options)
    for name in personal:
        value = revealed.get(name)
        if not is_encrypted(value):
            continue
        assert isinstance(value, Mapping)
        try:
            subject: UUID | None = UUID(str(value["subject"]))
        except ValueError:
            subject = None
        key = keys.get(subject) if subject is not None else None
        if key is None:
            revealed[name] = ERASED
            continue
        try:
            revealed[name] = decrypt(
                key,
                value,
                tenant=tenant,
                aggregate_id=ticket_id,
                event=OPTIONS_EVENT,
                field=option_field(name),
            )
        except PersonalDataError:
            revealed[name] = ERASED
    return revealed
